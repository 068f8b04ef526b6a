"""ctypes access to the libpq that psycopg already loaded.

psycopg 3 does not wrap ``PQsslAttribute``/``PQsslStruct``. We call them on
the live ``PGconn*`` through the *same* libpq instance psycopg uses: loading a
second copy would pair a PGconn with foreign code, and the TLS session belongs
to the OpenSSL that libpq was linked with. ``RTLD_NOLOAD`` makes "the same"
a guarantee: if the library is not already in the process, lookup fails
instead of loading it. Resolution happens once per process.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "EFFECTIVE_KEYS",
    "EnvironmentWatch",
    "LibpqUnavailable",
    "Resolution",
    "compiled_defaults",
    "conninfo",
    "effective_settings",
    "environment_snapshot",
    "environment_variables",
    "functions",
    "keyword_variables",
    "keywords",
    "loaded_libpq",
    "optional_function",
    "parse",
    "peer_address",
    "resolve",
    "secret_keywords",
    "socket_family",
    "ssl_attributes",
    "used_gssapi",
]

# typeshed names no public type for a foreign function pointer
_CFunc = Any

T = TypeVar("T")

_NOLOAD = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)


class LibpqUnavailable(RuntimeError):
    pass


def _bundled_candidates() -> list[str]:
    import psycopg_binary

    pkg = os.path.dirname(psycopg_binary.__file__)
    folders = [
        os.path.join(pkg, "..", "psycopg_binary.libs"),  # manylinux (auditwheel), Windows
        os.path.join(pkg, ".dylibs"),  # macOS (delocate)
    ]
    # A directory listing, not glob: glob compiles its pattern, a cost on every cold start.
    return [
        os.path.join(folder, name)
        for folder in folders
        for name in sorted(_listdir(folder))
        if name.startswith("libpq")
    ]


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _mapped_candidates() -> list[str]:
    """libpq files mapped into this process (Linux), for the C and Python builds."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libpq" in line and "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libpq"))


def _load_noload(paths: list[str]) -> ctypes.CDLL:
    for path in paths:
        try:
            return ctypes.CDLL(path, mode=_NOLOAD)
        except OSError:
            continue
    raise LibpqUnavailable(f"psycopg's libpq is not loaded from any of {paths!r}")


@functools.lru_cache(maxsize=1)
def loaded_libpq() -> ctypes.CDLL:
    """The libpq instance psycopg is using."""
    impl = psycopg.pq.__impl__
    if impl == "python":
        from psycopg.pq import _pq_ctypes

        # A handle of our own on psycopg's library: a CDLL caches its function objects,
        # and setting argtypes on psycopg's (PQconninfoFree, ...) would break its calls.
        return _load_noload([_pq_ctypes.pq._name])  # type: ignore[attr-defined]
    if impl == "binary":
        return _load_noload(_bundled_candidates())
    candidates = _mapped_candidates()
    if not candidates and sys.platform != "win32":
        import ctypes.util

        found = ctypes.util.find_library("pq")
        candidates = [found] if found else []
    return _load_noload(candidates)


class _Functions:
    __slots__ = ("i2d_x509", "peer_certificate", "ssl_attribute", "ssl_struct", "x509_free")

    def __init__(
        self,
        ssl_attribute: _CFunc,
        ssl_struct: _CFunc,
        peer_certificate: _CFunc | None,
        i2d_x509: _CFunc | None,
        x509_free: _CFunc | None,
    ) -> None:
        self.ssl_attribute = ssl_attribute
        self.ssl_struct = ssl_struct
        self.peer_certificate = peer_certificate
        self.i2d_x509 = i2d_x509
        self.x509_free = x509_free


def optional_function(lib: ctypes.CDLL, *names: str) -> _CFunc | None:
    # A dlopen handle resolves symbols in the library *and its dependencies*, so
    # OpenSSL functions come from the libssl/libcrypto this libpq is linked to.
    for name in names:
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def functions() -> _Functions:
    lib = loaded_libpq()
    # PQsslAttribute only reads libpq's state (every new connection asks it): called holding
    # the GIL, as psycopg's own accessors are, not releasing it and taking it back per call.
    attribute_type = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p)
    ssl_attribute = attribute_type(("PQsslAttribute", lib))
    ssl_struct = lib.PQsslStruct
    ssl_struct.restype = ctypes.c_void_p
    ssl_struct.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    peer = optional_function(lib, "SSL_get1_peer_certificate", "SSL_get_peer_certificate")
    i2d = optional_function(lib, "i2d_X509")
    free = optional_function(lib, "X509_free")
    if peer is not None and i2d is not None and free is not None:
        peer.restype = ctypes.c_void_p
        peer.argtypes = [ctypes.c_void_p]
        i2d.restype = ctypes.c_int
        i2d.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        free.restype = None
        free.argtypes = [ctypes.c_void_p]
    else:
        peer = i2d = free = None
    return _Functions(ssl_attribute, ssl_struct, peer, i2d, free)


# protocol and cipher are read by the post-handshake check itself (handshake.read_facts).
_ATTRIBUTES = (b"library", b"key_bits", b"compression", b"alpn")


def ssl_attributes(pgconn_ptr: int) -> dict[str, str | None]:
    """``PQsslAttribute`` for the names the check did not read; None when unset."""
    get = functions().ssl_attribute
    out: dict[str, str | None] = {}
    for name in _ATTRIBUTES:
        raw = get(pgconn_ptr, name)
        out[name.decode()] = raw.decode("ascii", "replace") if raw else None
    return out


# -- libpq's own view of connection parameters ----------------------------------------------

# A value libpq rejects only after it has resolved every parameter (explicit, service
# file, environment) and before it opens a socket: connectOptions2 validates sslmode,
# connectDBStart (the first I/O) never runs.
_PROBE_SSLMODE = "x-secure-pg-backend-probe"


@functools.lru_cache(maxsize=1)
def _defaults() -> tuple[pq.ConninfoOption, ...]:
    # libpq's option table (keyword, envvar, compiled default), in PQconndefaults' order.
    # Parsing an empty string gives the same table as PQconndefaults without its work:
    # that reads the environment and looks the user up in the password database (2x slower).
    return tuple(pq.Conninfo.parse(b""))


@functools.lru_cache(maxsize=1)
def keywords() -> frozenset[str]:
    """Every connection keyword this libpq accepts (``PQconndefaults``)."""
    return frozenset(opt.keyword.decode() for opt in _defaults())


# Options libpq hides but this backend judges by value (the policy names them in its
# refusals): a replication mode and a key log path are settings, not credentials.
_JUDGED_DEBUG_OPTIONS = frozenset({"replication", "sslkeylogfile"})


@functools.lru_cache(maxsize=1)
def secret_keywords() -> frozenset[str]:
    """Keywords whose values are secrets, as this libpq marks them in ``PQconndefaults``.

    ``*`` is libpq's mark for a password field (password, sslpassword, libpq 18's
    oauth_client_secret); ``D`` for an option never displayed, which is where libpq 18
    keeps the SCRAM client and server keys (they authenticate like the password). A
    hidden option a later libpq adds is therefore secret until this backend learns
    otherwise: the safe direction.
    """
    return frozenset(
        keyword
        for opt in _defaults()
        if opt.dispchar and opt.dispchar[:1] in (b"*", b"D")
        if (keyword := opt.keyword.decode()) not in _JUDGED_DEBUG_OPTIONS
    )


@functools.lru_cache(maxsize=1)
def compiled_defaults() -> Mapping[str, str | None]:
    return {opt.keyword.decode(): _text(opt.compiled) for opt in _defaults()}


@functools.lru_cache(maxsize=1)
def keyword_variables() -> Mapping[str, str]:
    """keyword -> the environment variable libpq reads for it."""
    return {opt.keyword.decode(): opt.envvar.decode() for opt in _defaults() if opt.envvar}


@functools.lru_cache(maxsize=1)
def environment_variables() -> tuple[str, ...]:
    """The environment variables libpq reads for parameters, plus its file locations."""
    names = set(keyword_variables().values())
    names.update(("PGSERVICE", "PGSERVICEFILE", "PGSYSCONFDIR", "PGREQUIRESSL", "HOME"))
    return tuple(sorted(names))


# Where an ``environment_snapshot`` holds PGSERVICE's value (None: unset, "" still names the
# default service): first, so that the verdict's key tells a named service (whose file's
# contents it cannot hold) by an index.
SERVICE_AT = 0


@functools.lru_cache(maxsize=1)
def _snapshot_names() -> tuple[Any, ...]:
    rest = [name for name in environment_variables() if name != "PGSERVICE"]
    names = ("PGSERVICE", *rest, "SSL_CERT_FILE")
    if isinstance(getattr(os.environ, "_data", None), dict) and os.name == "posix":
        return tuple(os.fsencode(name) for name in names)
    return names


def environment_snapshot() -> tuple[Any, ...]:
    """The values of every variable libpq (or ``sslrootcert=system``) reads, cheaply.

    CPython keeps os.environ's raw bytes in ``_data``; reading that skips decoding ~40
    values on every new connection, which ``os.environ.get`` and ``os.environb.get`` do
    (a Python-level call per name, an order of magnitude slower; docs/performance.md), and
    the public API offers no cheap way to tell that the environment changed. Elsewhere (or
    if ``_data`` is ever not a dict) the public mapping is used.
    """
    raw = getattr(os.environ, "_data", None)
    names = _snapshot_names()
    if isinstance(raw, dict) and names and isinstance(names[0], bytes):
        return tuple(map(raw.get, names))
    return tuple(map(os.environ.get, names))


class EnvironmentWatch:
    """Whether any variable libpq reads changed since the watch was made.

    A new connection asks it: the ~40 variables libpq reads (``environment_snapshot``) are
    looked up by name and compared with what they were, each by identity first (an unchanged
    variable is the very object). A change anywhere else in the environment is not seen, and
    what the look costs does not grow with the environment: comparing the whole mapping with a
    copy touched every variable's name and value per connection, some 600 more cache lines in
    a container with 150 service variables (docs/performance.md).
    """

    __slots__ = ("snapshot",)

    def __init__(self) -> None:
        self.snapshot = environment_snapshot()

    def unchanged(self) -> bool:
        return environment_snapshot() == self.snapshot


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


class Resolution:
    """What libpq would use for a set of parameters, or why it cannot use them."""

    __slots__ = ("error", "values")

    def __init__(self, values: Mapping[str, str], error: str | None) -> None:
        self.values = values  # every keyword with a value, as libpq filled it in
        self.error = error  # libpq's own message when the parameters are unusable


def conninfo(params: Mapping[str, str]) -> str:
    """The connection string psycopg builds from keyword parameters (psycopg's own code)."""
    return make_conninfo("", **params)


def resolve(params: Mapping[str, str]) -> Resolution:
    """Let libpq resolve ``params`` (service file, environment, defaults) without any I/O.

    ``PQconnectStart`` parses the string and fills in every parameter exactly as a real
    connection would, then fails on the probe sslmode before touching the network;
    ``PQconninfo`` then reports the values it settled on. libpq's rules (which service
    file, which section, which of two repeated keys, service before environment) are
    applied by libpq itself, so they cannot drift from ours.

    Without a password libpq also looks the password up in its password file while it
    resolves, opening the file before it checks what it is: a FIFO there would block this
    process for ever, before any rule could refuse it (E016). So unless ``params`` name one
    themselves, the parameters are resolved with a password file that cannot be opened, and
    which password file libpq would use is read from a second resolution given a stand-in
    password (with one, libpq opens no password file).
    """
    own_passfile = not params.get("passfile")
    values, message = _probe({**params, "passfile": _NO_FILE} if own_passfile else params)
    if own_passfile:
        values.pop("passfile", None)
        named, _ = _probe({**params, "password": _STAND_IN_PASSWORD})
        if "passfile" in named:
            values["passfile"] = named["passfile"]
    if _PROBE_SSLMODE in message:
        return Resolution(values, None)
    return Resolution(values, " ".join(message.split()) or "libpq rejected the parameters")


# A path no file can have (its parent is not a directory): libpq's fopen fails, reads nothing.
_NO_FILE = "/dev/null/secure-pg-backend-no-passfile"
_STAND_IN_PASSWORD = "x-secure-pg-backend-probe"  # never sent: the probe stops before any I/O


def _probe(params: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """libpq's values for ``params`` and its message, from ``PQconnectStart`` stopped by
    the probe sslmode before any I/O."""
    conn = pq.PGconn.connect_start(conninfo({**params, "sslmode": _PROBE_SSLMODE}).encode())
    try:
        values = {
            opt.keyword.decode(): text for opt in conn.info if (text := _text(opt.val)) is not None
        }
        message = _text(conn.error_message) or ""
    finally:
        conn.finish()
    values.pop("sslmode", None)
    return values, message


def parse(conninfo_string: str) -> dict[str, str]:
    """``PQconninfoParse`` (psycopg's ``conninfo_to_dict``): the explicit keywords of a
    connection string, as libpq reads them."""
    return {key: str(value) for key, value in conninfo_to_dict(conninfo_string).items()}


# -- facts of an established connection -----------------------------------------------------

# Effective settings the post-handshake check compares with the decision.
EFFECTIVE_KEYS = frozenset(
    {
        "sslmode",
        "sslrootcert",
        "gssencmode",
        "sslkeylogfile",
        "ssl_min_protocol_version",
        "sslnegotiation",
    }
)


class _ConninfoOption(ctypes.Structure):
    _fields_ = [
        ("keyword", ctypes.c_char_p),
        ("envvar", ctypes.c_char_p),
        ("compiled", ctypes.c_char_p),
        ("val", ctypes.c_char_p),
        ("label", ctypes.c_char_p),
        ("dispchar", ctypes.c_char_p),
        ("dispsize", ctypes.c_int),
    ]


@functools.lru_cache(maxsize=1)
def _conninfo_functions() -> tuple[_CFunc, _CFunc, tuple[tuple[int, bytes], ...]]:
    lib = loaded_libpq()
    conninfo_fn, free_fn = lib.PQconninfo, lib.PQconninfoFree
    conninfo_fn.restype = ctypes.POINTER(_ConninfoOption)
    conninfo_fn.argtypes = [ctypes.c_void_p]
    free_fn.restype = None
    free_fn.argtypes = [ctypes.POINTER(_ConninfoOption)]
    # PQconninfo lists libpq's options in the order of PQconndefaults: look up only ours.
    wanted = tuple(
        (index, opt.keyword)
        for index, opt in enumerate(_defaults())
        if opt.keyword.decode() in EFFECTIVE_KEYS
    )
    return conninfo_fn, free_fn, wanted


def effective_settings(pgconn: Any) -> dict[str, str]:
    """``PQconninfo`` of a live connection: the values libpq actually used.

    Read through ctypes at the known positions of the few keywords the check needs
    (each confirmed by name): converting all ~50 options to Python on every connection
    would cost several times more.
    """
    conninfo_fn, free_fn, wanted = _conninfo_functions()
    options = conninfo_fn(pgconn.pgconn_ptr)
    if not options:
        raise MemoryError("PQconninfo returned NULL")
    try:
        out: dict[str, str] = {}
        for index, keyword in wanted:
            option = options[index]
            if option.keyword != keyword:  # pragma: no cover - a libpq with another layout
                return _effective_by_name(pgconn)
            if option.val is not None:
                out[keyword.decode()] = option.val.decode("utf-8", "surrogateescape")
        return out
    finally:
        free_fn(options)


def _effective_by_name(pgconn: Any) -> dict[str, str]:
    return {
        key: text
        for opt in pgconn.info
        if (key := opt.keyword.decode()) in EFFECTIVE_KEYS and (text := _text(opt.val)) is not None
    }


@functools.lru_cache(maxsize=1)
def _has_used_gssapi() -> bool:
    return psycopg.capabilities.has_used_gssapi()  # libpq >= 16 at build and run time


def used_gssapi(pgconn: Any) -> bool | None:
    """``PQconnectionUsedGSSAPI``; None where libpq (< 16) or psycopg cannot tell.

    The post-handshake check then relies on the effective gssencmode, which is an
    equally strong fact: with gssencmode=disable libpq never starts GSSAPI encryption.
    """
    return bool(pgconn.used_gssapi) if _has_used_gssapi() else None


def socket_family(pgconn: Any) -> int:
    """The address family of the connection's socket (AF_UNIX, AF_INET, AF_INET6)."""
    sock = socket.socket(fileno=pgconn.socket)  # reads the family from the descriptor
    try:
        return int(sock.family)
    finally:
        sock.detach()  # the descriptor stays libpq's


def peer_address(pgconn: Any) -> str | None:
    """The IP address at the other end of the connection's TCP socket (getpeername on
    libpq's descriptor); None for a Unix-domain socket or a socket without a peer."""
    sock = socket.socket(fileno=pgconn.socket)
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return str(sock.getpeername()[0])
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor stays libpq's

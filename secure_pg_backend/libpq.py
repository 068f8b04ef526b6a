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
import datetime as dt
import functools
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

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


def _optional(lib: ctypes.CDLL, *names: str) -> _CFunc | None:
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
    ssl_attribute = lib.PQsslAttribute
    ssl_attribute.restype = ctypes.c_char_p
    ssl_attribute.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ssl_struct = lib.PQsslStruct
    ssl_struct.restype = ctypes.c_void_p
    ssl_struct.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    peer = _optional(lib, "SSL_get1_peer_certificate", "SSL_get_peer_certificate")
    i2d = _optional(lib, "i2d_X509")
    free = _optional(lib, "X509_free")
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


def peer_certificate_der(pgconn_ptr: int) -> bytes | None:
    """DER of the server's leaf certificate, read from the live TLS session."""
    fns = functions()
    if fns.peer_certificate is None or fns.i2d_x509 is None or fns.x509_free is None:
        return None
    ssl_ptr = fns.ssl_struct(pgconn_ptr, b"OpenSSL")
    if not ssl_ptr:
        return None
    x509 = fns.peer_certificate(ssl_ptr)
    if not x509:
        return None
    try:
        return _der(fns.i2d_x509, x509)
    finally:
        fns.x509_free(x509)


def _der(i2d_x509: _CFunc, x509: int) -> bytes | None:
    size = i2d_x509(x509, None)
    if size <= 0:
        return None
    buf = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buf))  # i2d advances the pointer it gets
    if i2d_x509(x509, ctypes.byref(cursor)) != size:
        return None
    return buf.raw


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


@functools.lru_cache(maxsize=1)
def _snapshot_names() -> tuple[Any, ...]:
    names = (*environment_variables(), "SSL_CERT_FILE")
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
    """
    probe = {**params, "sslmode": _PROBE_SSLMODE}
    conn = pq.PGconn.connect_start(conninfo(probe).encode())
    try:
        values = {
            opt.keyword.decode(): text for opt in conn.info if (text := _text(opt.val)) is not None
        }
        message = _text(conn.error_message) or ""
    finally:
        conn.finish()
    values.pop("sslmode", None)
    if _PROBE_SSLMODE in message:
        return Resolution(values, None)
    return Resolution(values, " ".join(message.split()) or "libpq rejected the parameters")


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


# -- the server certificate's notAfter, decoded by the session's own OpenSSL -----------------
# The start-up log line and the expiry warning need one date; parsing the whole certificate with
# `cryptography` costs an import of tens of milliseconds on the first connection (and, on a pool's
# worker thread, puts Rust frames on a thread the interpreter may stop at exit).


class _Tm(ctypes.Structure):
    # ISO C's nine ints; glibc and the BSDs add tm_gmtoff and tm_zone. Room for them is harmless
    # where the C library has none (OpenSSL only writes its own struct tm).
    _fields_ = [
        *[
            (name, ctypes.c_int)
            for name in ("sec", "min", "hour", "mday", "mon", "year", "wday", "yday", "isdst")
        ],
        ("gmtoff", ctypes.c_long),
        ("zone", ctypes.c_char_p),
    ]


class _TimeFunctions:
    __slots__ = ("asn1_time_to_tm", "d2i_x509", "get0_not_after", "get0_not_before", "x509_free")

    def __init__(
        self,
        d2i_x509: _CFunc,
        get0_not_after: _CFunc,
        get0_not_before: _CFunc,
        asn1_time_to_tm: _CFunc,
        x509_free: _CFunc,
    ) -> None:
        self.d2i_x509 = d2i_x509
        self.get0_not_after = get0_not_after
        self.get0_not_before = get0_not_before
        self.asn1_time_to_tm = asn1_time_to_tm
        self.x509_free = x509_free


@functools.lru_cache(maxsize=1)
def _time_functions() -> _TimeFunctions | None:
    """OpenSSL >= 1.1.1's functions, or None (another TLS library, or an older OpenSSL)."""
    try:
        lib = loaded_libpq()
    except (LibpqUnavailable, OSError):
        return None
    d2i = _optional(lib, "d2i_X509")
    not_after = _optional(lib, "X509_get0_notAfter")
    not_before = _optional(lib, "X509_get0_notBefore")
    to_tm = _optional(lib, "ASN1_TIME_to_tm")
    free = _optional(lib, "X509_free")
    if d2i is None or not_after is None or not_before is None or to_tm is None or free is None:
        return None
    d2i.restype = ctypes.c_void_p
    d2i.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
    for get0 in (not_after, not_before):
        get0.restype = ctypes.c_void_p
        get0.argtypes = [ctypes.c_void_p]
    to_tm.restype = ctypes.c_int
    to_tm.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Tm)]
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    return _TimeFunctions(d2i, not_after, not_before, to_tm, free)


def certificate_not_after(der: bytes) -> dt.datetime | None:
    """notAfter (UTC) of a DER certificate; None if this OpenSSL cannot say.

    Decoding DER (``d2i_X509``) initializes OpenSSL's decoders and digests, work that
    OpenSSL undoes again at exit, a cost a cold start should not pay. For a live connection,
    ``peer_not_after`` reads the certificate the TLS session already decoded.
    """
    fns = _time_functions()
    return None if fns is None else _decoded(der, lambda x509: _not_after(fns, x509))


def _decoded(der: bytes, read: Callable[[int], T]) -> T | None:
    """``read(X509*)`` of a DER certificate decoded by libpq's OpenSSL; None if it cannot."""
    fns = _time_functions()
    if fns is None:
        return None
    cursor = ctypes.c_char_p(der)  # d2i advances the pointer it gets; `der` stays alive
    x509 = fns.d2i_x509(None, ctypes.byref(cursor), len(der))
    if not x509:
        return None
    try:
        return read(x509)
    finally:
        fns.x509_free(x509)


def peer_not_after(pgconn_ptr: int) -> dt.datetime | None:
    """notAfter (UTC) of the certificate the server presented in this live TLS session."""
    fns, time_fns = functions(), _time_functions()
    if time_fns is None or fns.peer_certificate is None or fns.x509_free is None:
        return None
    ssl_ptr = fns.ssl_struct(pgconn_ptr, b"OpenSSL")
    x509 = fns.peer_certificate(ssl_ptr) if ssl_ptr else None
    if not x509:
        return None
    try:
        return _not_after(time_fns, x509)
    finally:
        fns.x509_free(x509)  # SSL_get1_peer_certificate took a reference


def _not_after(fns: _TimeFunctions, x509: int) -> dt.datetime | None:
    return _asn1_time(fns, fns.get0_not_after(x509))


def _asn1_time(fns: _TimeFunctions, asn1_time: int | None) -> dt.datetime | None:
    tm = _Tm()
    if not asn1_time or fns.asn1_time_to_tm(asn1_time, ctypes.byref(tm)) != 1:
        return None
    return dt.datetime(
        tm.year + 1900, tm.mon + 1, tm.mday, tm.hour, tm.min, tm.sec, tzinfo=dt.timezone.utc
    )


# -- certificate text: the one escaping rule ------------------------------------------------
# A certificate's names are chosen by whoever got it signed, and a CA that checks the host names
# signs whatever subject it is asked for: a CN holding a newline and an ANSI escape made dbtls
# print a forged line and clear the screen. Every form a person or a log pipeline reads (the
# log line and its fields, dbtls and --json, repr and as_dict, messages, the health check)
# shows certificate text through ``certificate_text`` only; the raw names stay in the
# certificate itself (``PeerCertificate.certificate()``, the DER).
#
# The rule is OpenSSL's RFC 2253 printing with ASN1_STRFLGS_ESC_CTRL, which the OpenTelemetry
# fields always used: a control character becomes a backslash and two upper-case hex digits
# (newline \0A, ESC \1B, DEL \7F). It extends, in the same form (OpenSSL's ASN1_STRFLGS_ESC_MSB:
# each UTF-8 byte), to what moves or reorders text without being ASCII: C1 controls (U+009B is
# a CSI to some terminals), the line and paragraph separators (str.splitlines and log viewers
# break lines there) and the bidirectional overrides ("Trojan Source"); and to lone surrogates,
# which no UTF-8 output could print. Backslashes are left alone: both OpenSSL's and
# cryptography's RFC 2253/4514 strings escape them already, so the rule is idempotent.
_UNSAFE_TEXT = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def certificate_text(text: str) -> str:
    """``text`` (a certificate's name, or a message quoting one) with every control character,
    line separator and bidirectional override escaped as OpenSSL escapes them (``\\0A``)."""
    return _UNSAFE_TEXT.sub(_hex_bytes, text)


def _hex_bytes(match: re.Match[str]) -> str:
    return "".join(f"\\{byte:02X}" for byte in match.group().encode("utf-8", "surrogatepass"))


# -- a certificate's subject and issuer, by the same OpenSSL ---------------------------------
# For the start-up log record's OpenTelemetry fields (signals.otel_server_fields), which must not
# import ``cryptography`` (the first connection never does). RFC 2253 order and escaping, as
# ``PeerCertificate.subject`` (cryptography's RFC 4514 string) shows them, with UTF-8 kept as is
# (XN_FLAG_RFC2253 without ASN1_STRFLGS_ESC_MSB), then ``certificate_text`` for what OpenSSL
# leaves unescaped there (C1 controls and the rest beyond ASCII).
_XN_FLAGS = 0x313 | 0x10000 | 0x100000 | 0x1000000
_BIO_CTRL_INFO = 3  # BIO_get_mem_data


class _NameFunctions:
    __slots__ = ("bio_ctrl", "bio_free", "bio_new", "bio_s_mem", "issuer", "print_ex", "subject")

    def __init__(self, **functions: _CFunc) -> None:
        for name, function in functions.items():
            setattr(self, name, function)

    bio_ctrl: _CFunc
    bio_free: _CFunc
    bio_new: _CFunc
    bio_s_mem: _CFunc
    issuer: _CFunc
    print_ex: _CFunc
    subject: _CFunc


@functools.lru_cache(maxsize=1)
def _name_functions() -> _NameFunctions | None:
    """OpenSSL's name printing, or None (another TLS library, or libpq not loaded)."""
    try:
        lib = loaded_libpq()
    except (LibpqUnavailable, OSError):
        return None
    found = {
        "bio_ctrl": _optional(lib, "BIO_ctrl"),
        "bio_free": _optional(lib, "BIO_free"),
        "bio_new": _optional(lib, "BIO_new"),
        "bio_s_mem": _optional(lib, "BIO_s_mem"),
        "issuer": _optional(lib, "X509_get_issuer_name"),
        "print_ex": _optional(lib, "X509_NAME_print_ex"),
        "subject": _optional(lib, "X509_get_subject_name"),
    }
    functions = {name: fn for name, fn in found.items() if fn is not None}
    if len(functions) != len(found):
        return None
    pointer = ctypes.c_void_p
    for name, restype, argtypes in (
        ("bio_ctrl", ctypes.c_long, [pointer, ctypes.c_int, ctypes.c_long, pointer]),
        ("bio_free", ctypes.c_int, [pointer]),
        ("bio_new", pointer, [pointer]),
        ("bio_s_mem", pointer, []),
        ("issuer", pointer, [pointer]),
        ("print_ex", ctypes.c_int, [pointer, pointer, ctypes.c_int, ctypes.c_ulong]),
        ("subject", pointer, [pointer]),
    ):
        functions[name].restype = restype
        functions[name].argtypes = argtypes
    return _NameFunctions(**functions)


def certificate_names(der: bytes) -> tuple[str, str] | None:
    """(subject, issuer) of a DER certificate as RFC 2253 strings; None if this OpenSSL cannot
    say (the report's ``peer_certificate`` then has them, parsed by ``cryptography``)."""
    fns = _name_functions()
    return None if fns is None else _decoded(der, lambda x509: _names(fns, x509))


def _names(fns: _NameFunctions, x509: int) -> tuple[str, str] | None:
    subject = _print_name(fns, fns.subject(x509))
    issuer = _print_name(fns, fns.issuer(x509))
    return None if subject is None or issuer is None else (subject, issuer)


def _print_name(fns: _NameFunctions, name: int | None) -> str | None:
    if not name:
        return None
    bio = fns.bio_new(fns.bio_s_mem())
    if not bio:
        return None
    try:
        if fns.print_ex(bio, name, 0, _XN_FLAGS) < 0:
            return None
        data = ctypes.c_void_p()
        size = fns.bio_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.byref(data))
        if size == 0:
            return ""
        if size < 0 or not data.value:
            return None
        return certificate_text(ctypes.string_at(data.value, size).decode("utf-8", "replace"))
    finally:
        fns.bio_free(bio)


# -- the client certificate this side holds in the live session -------------------------------
# libpq loads OPTIONS['sslcert'] (or ~/.postgresql/postgresql.crt) into the session whenever the
# file exists and sslcertmode is not 'disable'; OpenSSL sends it when the server asks for one.
# ``SSL_get_certificate`` returns the session's own pointer (no reference taken: never freed).
# A connection without a client certificate pays two ctypes calls that return NULL.


@functools.lru_cache(maxsize=1)
def _local_certificate() -> _CFunc | None:
    try:
        get = _optional(loaded_libpq(), "SSL_get_certificate")
    except (LibpqUnavailable, OSError):
        return None
    if get is not None:
        get.restype = ctypes.c_void_p
        get.argtypes = [ctypes.c_void_p]
    return get


def _local_x509(pgconn_ptr: int) -> int | None:
    get = _local_certificate()
    if get is None:
        return None
    ssl_ptr = functions().ssl_struct(pgconn_ptr, b"OpenSSL")
    x509 = get(ssl_ptr) if ssl_ptr else None
    return int(x509) if x509 else None


def client_certificate_der(pgconn_ptr: int) -> bytes | None:
    """DER of the client certificate in this live TLS session; None when there is none."""
    i2d = functions().i2d_x509
    x509 = _local_x509(pgconn_ptr) if i2d is not None else None
    return _der(i2d, x509) if x509 else None


def decodes_times() -> bool:
    """Whether libpq's OpenSSL can decode a certificate's validity (OpenSSL >= 1.1.1)."""
    return _time_functions() is not None


def client_validity(pgconn_ptr: int) -> tuple[dt.datetime, dt.datetime] | None:
    """(notBefore, notAfter), UTC, of the client certificate in this live TLS session, decoded
    by the session's OpenSSL; None without one (or where that OpenSSL cannot say)."""
    time_fns = _time_functions()
    x509 = _local_x509(pgconn_ptr) if time_fns is not None else None
    if not x509 or time_fns is None:
        return None
    not_before = _asn1_time(time_fns, time_fns.get0_not_before(x509))
    not_after = _not_after(time_fns, x509)
    return None if not_before is None or not_after is None else (not_before, not_after)


def client_certificate_names(pgconn_ptr: int) -> tuple[str, str] | None:
    """(subject, issuer) of the client certificate in this live session, as
    ``certificate_names`` prints them, from the session's own X509 (no DER decoding)."""
    fns = _name_functions()
    x509 = _local_x509(pgconn_ptr) if fns is not None else None
    return _names(fns, x509) if x509 and fns is not None else None

"""The TLS policy: libpq parameters in, forced parameters (or a refusal) out.

The judgment, in one module: ``judge`` (the gate, at the end) takes one DATABASES entry to
the keywords for ``psycopg.connect`` or a refusal (``Verdict``), asking libpq itself to resolve
the parameters (``libpq.resolve``, no I/O). Everything else here is pure functions over dicts,
like psycopg's ``conninfo``. First ``screen`` (E009, E011):
which keys and characters a DATABASES entry may hold at all. Then the rules, whose input is a
``Request``:
the keywords the settings pass explicitly and what libpq resolved them to (service
file, environment, defaults; see ``libpq.resolve``). Each rule on the settings is one
small function named after its check id (``e001_sslmode`` is ``secure_pg_backend.E001``;
``RULES``); the file rules E005, E006, E016 and E018 are ``check_files``. Which function reports
each id, what it means and its fix are in ``errors.CHECKS``. The same rules serve the
connection gate, the system checks and ``dbshell``; ``check_link`` holds the post-handshake
rules.
The only I/O is ``stat``: on the files libpq will open (``check_files``, before every
physical connection, never cached) and, for ``sslrootcert='system'``, on the store's candidates.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from django.utils.module_loading import import_string

from . import libpq
from .compat import NEWER_KEYWORDS, too_new_violation
from .errors import (
    ROOT_FIX,
    ProviderConfigurationError,
    SecurePolicyError,
    Violation,
    relative_note,
)

SSLMODE = "verify-full"
GSSENCMODE = "disable"
DEFAULT_MIN_PROTOCOL = "TLSv1.2"
PROTOCOL_RANK = {"TLSv1": 10, "TLSv1.1": 11, "TLSv1.2": 12, "TLSv1.3": 13}
ACCEPTED_PROTOCOLS = ("TLSv1.2", "TLSv1.3")
DEFAULT_CONNECT_TIMEOUT = "10"  # seconds, when neither the settings nor PGCONNECT_TIMEOUT say

# OPTIONS keys this backend reads itself; libpq never sees them.
ALLOW_UNIX_SOCKET = "allow_unix_socket"
ALLOW_LEGACY_CIPHERS = "allow_legacy_ciphers"
# A sidecar on this machine (Cloud SQL Auth Proxy, AlloyDB Auth Proxy, pgproxy) does the
# verified TLS to the server; this process talks plaintext TCP to it over loopback (E019).
ALLOW_LOCAL_PROXY = "allow_local_proxy"
PASSWORD_PROVIDER = "password_provider"
CONNECT_RETRY = (
    "connect_retry"  # seconds of retries for transient connect failures (pipeline.Retry)
)
BACKEND_OPTIONS = frozenset(
    {ALLOW_UNIX_SOCKET, ALLOW_LEGACY_CIPHERS, ALLOW_LOCAL_PROXY, PASSWORD_PROVIDER, CONNECT_RETRY}
)
OPT_INS = (ALLOW_UNIX_SOCKET, ALLOW_LEGACY_CIPHERS, ALLOW_LOCAL_PROXY)
# What the backend sends a local proxy instead of the TLS keywords: no TLS and no GSSAPI on the
# loopback leg (the proxy speaks neither; the server's certificate is the proxy's to verify).
LOCAL_PROXY_SSLMODE = "disable"


KEYLOG = "sslkeylogfile"
WEAKENING_KEYWORDS = {
    "requiressl": "is libpq's deprecated predecessor of sslmode",
    KEYLOG: "writes the TLS session keys to a file, so anyone who reads it can decrypt "
    "the captured traffic",
}

# Records here (and in errors, libpq, handshake) are plain slotted classes: these modules are
# imported by every process that connects, and defining a frozen dataclass or a
# typing.NamedTuple (which compiles its constructor with eval) costs far more at import
# (docs/performance.md, cold start).
_EMPTY: Mapping[str, Any] = MappingProxyType({})

_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


def option_name(key: str) -> str:
    """How messages name a setting."""
    return f"OPTIONS[{key!r}]"


def remove_hint(key: str) -> str:
    """The fix for a setting that must go, in both places it can come from."""
    return f"remove {option_name(key)} (from a DATABASE_URL: its ?{key}= query key)"


class Request:
    """Everything one alias's connection would use, as libpq sees it."""

    __slots__ = (
        "alias",
        "environ",
        "envvars",
        "explicit",
        "keywords",
        "options",
        "origins",
        "resolved",
    )

    def __init__(
        self,
        alias: str,
        explicit: Mapping[str, str],  # keywords the settings pass, as strings
        resolved: Mapping[str, str],  # libpq's value for every keyword that has one
        options: Mapping[str, Any] = _EMPTY,  # the backend's own OPTIONS
        environ: Mapping[str, str] = _EMPTY,
        keywords: frozenset[str] = frozenset(),  # what this libpq accepts
        origins: Mapping[str, str] = _EMPTY,  # keyword -> setting name
        envvars: Mapping[str, str] = _EMPTY,  # keyword -> libpq's variable
    ) -> None:
        self.alias = alias
        self.explicit = explicit
        self.resolved = resolved
        self.options = options
        self.environ = environ
        self.keywords = keywords
        self.origins = origins
        self.envvars = envvars

    def origin(self, key: str) -> str:
        """Where a resolved value came from, in the user's terms."""
        if key in self.origins:
            return self.origins[key]
        if key in self.explicit:
            return option_name(key)
        variable = self.envvars.get(key)
        value = self.resolved.get(key)
        if variable and value is not None and self.environ.get(variable) == value:
            return variable
        service = self.explicit.get("service") or self.environ.get("PGSERVICE")
        if service:
            return f"the pg_service.conf entry {service!r}"
        return "libpq's default"


class Decision:
    """What the backend forces on libpq for one alias, and what it allowed.

    Shared by every connection of the alias while the settings are unchanged: never mutated.
    """

    __slots__ = (
        "alias",
        "allow_legacy_ciphers",
        "allow_local_proxy",
        "allow_unix_socket",
        "direct_key",
        "files",
        "hosts",
        "keylog_keyword",
        "min_protocol",
        "root_cert",
        "root_cert_source",
    )

    def __init__(
        self,
        alias: str,
        hosts: tuple[str, ...],
        root_cert: str,
        root_cert_source: str,
        min_protocol: str = DEFAULT_MIN_PROTOCOL,
        allow_unix_socket: bool = False,
        allow_legacy_ciphers: bool = False,
        keylog_keyword: bool = False,  # this libpq knows sslkeylogfile: send it empty
        files: tuple[FileNeed, ...] = (),  # checked before each physical connection
        direct_key: DirectKey | None = None,  # direct TLS by default, learned per endpoint
        allow_local_proxy: bool = False,  # E019 passed: one loopback TCP address
    ) -> None:
        self.alias = alias
        self.allow_local_proxy = allow_local_proxy
        self.direct_key = direct_key
        self.hosts = hosts
        self.root_cert = root_cert
        self.root_cert_source = root_cert_source
        self.min_protocol = min_protocol
        self.allow_unix_socket = allow_unix_socket
        self.allow_legacy_ciphers = allow_legacy_ciphers
        self.keylog_keyword = keylog_keyword
        self.files = files

    @property
    def forced(self) -> dict[str, str]:
        """Keywords passed explicitly, so no environment or service file can change them."""
        if self.allow_local_proxy:  # plaintext to the loopback sidecar, and only to it
            forced = {"sslmode": LOCAL_PROXY_SSLMODE, "gssencmode": GSSENCMODE}
            if self.keylog_keyword:
                forced[KEYLOG] = ""
            return forced
        forced = {
            "sslmode": SSLMODE,
            "gssencmode": GSSENCMODE,
            "ssl_min_protocol_version": self.min_protocol,
            "sslrootcert": self.root_cert,
        }
        if self.keylog_keyword:
            forced[KEYLOG] = ""
        return forced

    @property
    def host_display(self) -> str | None:
        return ",".join(self.hosts) or None


class Evaluation:
    """Result of ``evaluate``: a decision when no rule is broken, else violations.

    ``files``: what libpq would open, for the file rules (checked when used, not here).
    """

    __slots__ = ("alias", "decision", "files", "host", "violations")

    def __init__(
        self,
        alias: str,
        host: str | None,
        violations: tuple[Violation, ...] = (),
        decision: Decision | None = None,
        files: tuple[FileNeed, ...] = (),
    ) -> None:
        self.alias = alias
        self.host = host
        self.violations = violations
        self.decision = decision
        self.files = decision.files if decision is not None else files


def is_socket_host(host: str) -> bool:
    """libpq's rule for a Unix-domain socket: an absolute path or ``@abstract`` name."""
    return host.startswith(("/", "@")) or bool(_WINDOWS_PATH.match(host))


def _split(value: str | None) -> list[str]:
    # libpq splits host lists on commas and keeps empty elements (they mean "default").
    return value.split(",") if value is not None else []


# -- rules on what the settings ask for ---------------------------------------------------
_SSLMODE_WHY = {
    "disable": "never uses TLS",
    "allow": "tries plaintext first",
    "prefer": "silently falls back to plaintext",
    "require": "encrypts but never checks the server's certificate, so a "
    "machine-in-the-middle can read credentials and data",
    "verify-ca": "checks the certificate chain but not the host name, so any "
    "certificate from the same CA (another customer's, on a shared CA) is accepted",
}


def e001_sslmode(req: Request) -> Violation | None:
    value = req.options.get("sslmode", SSLMODE)
    if value == SSLMODE:
        return None
    why = _SSLMODE_WHY.get(value if isinstance(value, str) else "", "is not a mode this accepts")
    return Violation(
        "E001",
        f"{option_name('sslmode')} is {value!r}, which {why}.",
        f"{remove_hint('sslmode')}; this backend always uses 'verify-full'.",
    )


def e002_gssencmode(req: Request) -> Violation | None:
    if "gssencmode" not in req.options or req.options["gssencmode"] == GSSENCMODE:
        return None
    return Violation(
        "E002",
        f"{option_name('gssencmode')} is {req.options['gssencmode']!r}: with Kerberos "
        "credentials present libpq would encrypt with GSSAPI instead of TLS, and no server "
        "certificate would be checked.",
        f"{remove_hint('gssencmode')}; this backend always sends 'disable'.",
    )


def _min_protocol(req: Request) -> str:
    value = req.options.get("ssl_min_protocol_version", DEFAULT_MIN_PROTOCOL)
    return value if value in ACCEPTED_PROTOCOLS else DEFAULT_MIN_PROTOCOL


def e003_protocol(req: Request) -> Violation | None:
    minimum = req.options.get("ssl_min_protocol_version", DEFAULT_MIN_PROTOCOL)
    if minimum not in ACCEPTED_PROTOCOLS:
        return Violation(
            "E003",
            f"{option_name('ssl_min_protocol_version')} is {minimum!r}; TLS versions before "
            "1.2 are broken and not allowed.",
            f"{remove_hint('ssl_min_protocol_version')} (default 'TLSv1.2') or set 'TLSv1.3'.",
        )
    maximum = req.options.get("ssl_max_protocol_version")
    if maximum is None or (
        maximum in ACCEPTED_PROTOCOLS and PROTOCOL_RANK[maximum] >= PROTOCOL_RANK[minimum]
    ):
        return None
    return Violation(
        "E003",
        f"{option_name('ssl_max_protocol_version')} is {maximum!r}, below the minimum "
        f"{minimum!r}: no acceptable TLS version is left.",
        f"{remove_hint('ssl_max_protocol_version')} or set it to 'TLSv1.3'.",
    )


def e007_weakening(req: Request) -> Violation | None:
    for keyword, why in WEAKENING_KEYWORDS.items():
        if keyword in req.options:
            return Violation(
                "E007",
                f"{option_name(keyword)} is set; it {why}.",
                f"{remove_hint(keyword)}; this backend sets the TLS parameters itself.",
            )
    if req.resolved.get(KEYLOG):  # from a service file (or any source libpq reads)
        return Violation(
            "E007",
            f"{req.origin(KEYLOG)} sets {KEYLOG!r} to {req.resolved[KEYLOG]!r}; it "
            f"{WEAKENING_KEYWORDS[KEYLOG]}.",
            f"remove {KEYLOG} from there.",
        )
    return None


def e008_opt_ins(req: Request) -> Violation | None:
    for key in OPT_INS:
        value = req.options.get(key, False)
        if not isinstance(value, bool):
            return Violation(
                "E008",
                f"OPTIONS[{key!r}] is {value!r}; opt-ins must be exactly True or False.",
                f"set OPTIONS[{key!r}] = True to opt in, or remove it.",
            )
    return None


def e017_connect_retry(req: Request) -> Violation | None:
    value = req.options.get(CONNECT_RETRY, 0)
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 3600:
        return None
    return Violation(
        "E017",
        f"{option_name(CONNECT_RETRY)} is {value!r}; it is the number of seconds to keep "
        "retrying a connection that failed for a transient reason (a restart, a failover).",
        f"set {option_name(CONNECT_RETRY)} to a number of seconds from 0 (no retries) to "
        "3600, or remove it (default 5).",
    )


# -- rules on where libpq will connect ------------------------------------------------------
def _entries(req: Request) -> list[tuple[str, str]]:
    """(host name, address) for every host entry libpq will try, by libpq's pairing."""
    hosts, addrs = _split(req.resolved.get("host")), _split(req.resolved.get("hostaddr"))
    count = max(len(hosts), len(addrs), 1)
    hosts += [""] * (count - len(hosts))
    addrs += [""] * (count - len(addrs))
    return list(zip(hosts, addrs, strict=True))


def e012_host_lists(req: Request) -> Violation | None:
    hosts, addrs = _split(req.resolved.get("host")), _split(req.resolved.get("hostaddr"))
    if addrs and not hosts:
        problem = (
            f"{req.origin('hostaddr')} is {req.resolved['hostaddr']!r} but no host name is set; "
            "verify-full checks the certificate against the host name, so one is needed."
        )
        return Violation("E012", problem)
    if addrs and len(hosts) != len(addrs):
        problem = (
            f"{req.origin('hostaddr')} lists {len(addrs)} address(es) but {req.origin('host')} "
            f"lists {len(hosts)} host name(s); verify-full needs a name for every address."
        )
        return Violation("E012", problem)
    for number, (name, addr) in enumerate(_entries(req), start=1):
        if addr and (not name or is_socket_host(name)):
            problem = (
                f"host entry {number} has the address {addr!r} but the host name {name!r}; "
                "verify-full checks the certificate against the host name, so one is needed."
            )
            return Violation("E012", problem)
    return None


def e004_socket(req: Request) -> Violation | None:
    if req.options.get(ALLOW_UNIX_SOCKET) is True:
        return None
    sockets = [
        name for name, addr in _entries(req) if not addr and (not name or is_socket_host(name))
    ]
    if not sockets:
        return None
    if any(sockets):
        shown = ", ".join(repr(s) for s in sockets if s)
        problem = f"{req.origin('host')} names a Unix-domain socket ({shown})"
    elif req.resolved.get("host") is None:
        problem = "no host is set anywhere, so libpq would use its default Unix-domain socket"
    else:
        problem = (
            f"{req.origin('host')} has an empty host entry, which libpq takes as its default "
            "Unix-domain socket"
        )
    return Violation(
        "E004", problem + "; libpq ignores sslmode on sockets and would connect without TLS."
    )


def local_proxy(req: Request) -> bool:
    return req.options.get(ALLOW_LOCAL_PROXY) is True


def loopback_address(text: str) -> bool:
    """A literal IPv4 address in 127.0.0.0/8 or the IPv6 loopback ``::1`` (never a name:
    DNS or /etc/hosts could point a name anywhere; nor a scoped ``::1%eth0``)."""
    if "%" in text:
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:  # a name, anything else
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def e019_local_proxy(req: Request) -> Violation | None:
    if not local_proxy(req):
        return None
    entries = _entries(req)
    host = req.resolved.get("host")
    problem = None
    if len(entries) != 1:
        problem = f"{req.origin('host')} lists {len(entries)} hosts; a local proxy is one address"
    else:
        name, addr = entries[0]
        if not addr and (not name or is_socket_host(name)):
            problem = (
                f"{req.origin('host')} is {host!r}, a Unix-domain socket (that is "
                "OPTIONS['allow_unix_socket'])"
                if name
                else "no host is set, so libpq would use its default Unix-domain socket"
            )
        elif addr:
            if not loopback_address(addr):
                problem = (
                    f"{req.origin('hostaddr')} is {addr!r}, not a loopback address "
                    "(127.0.0.0/8 or ::1)"
                )
            elif name != "localhost" and not loopback_address(name):
                problem = (
                    f"{req.origin('host')} is {name!r}; with hostaddr only 'localhost' or the "
                    "loopback address itself names a local proxy"
                )
        elif not loopback_address(name):
            problem = (
                f"{req.origin('host')} is {name!r}, not a literal loopback address "
                "(127.0.0.0/8 or ::1); a name could resolve anywhere"
            )
    if problem is None:
        return None
    return Violation(
        "E019",
        f"{problem}, but {option_name(ALLOW_LOCAL_PROXY)} is set: the connection would carry "
        "the password and the data without TLS, so it must stay on this machine.",
    )


# -- the root of trust ----------------------------------------------------------------------
# Which file is the root of trust is configuration, judged once per settings; whether that
# file is usable right now is not, and is checked before every physical connection
# (``check_files``): a CA bundle being replaced must not strand a thread or a pool.
DEFAULT_ROOT_SOURCE = "~/.postgresql/root.crt"


class RootOfTrust:
    __slots__ = ("path", "source", "violation")

    def __init__(self, path: str, source: str, violation: Violation | None = None) -> None:
        self.path = path
        self.source = source
        self.violation = violation


def home_directory(environ: Mapping[str, str]) -> str:
    """libpq's home directory: HOME, else the password database's."""
    return environ.get("HOME") or os.path.expanduser("~")


def _in_dot_postgresql(environ: Mapping[str, str], name: str) -> str:
    return os.path.join(home_directory(environ), ".postgresql", name)


def root_of_trust(req: Request) -> RootOfTrust:
    """The CA file libpq will trust: explicit, service, PGSSLROOTCERT, then ~/.postgresql."""
    value = req.resolved.get("sslrootcert")
    if value is None:
        return RootOfTrust(_in_dot_postgresql(req.environ, "root.crt"), DEFAULT_ROOT_SOURCE)
    origin = req.origin("sslrootcert")
    if value == "system":
        from .truststore import SystemTrustStoreError, system_trust_file  # only for "system"

        try:
            path, where = system_trust_file(req.environ)
        except SystemTrustStoreError as exc:
            return RootOfTrust(
                "", "", Violation("E006", f"{origin} is 'system', but {exc}", exc.fix)
            )
        return RootOfTrust(path, f"system ({where})")
    if not value.strip():
        return RootOfTrust(
            "", "", Violation("E006", f"{origin} is {value!r}, which is empty.", ROOT_FIX)
        )
    return RootOfTrust(os.path.expanduser(value), origin)


def e006_root_cert(req: Request) -> Violation | None:
    if local_proxy(req):  # no TLS on this leg: the sidecar verifies the server
        return None
    return root_of_trust(req).violation


# -- the files libpq opens, checked before each physical connection ---------------------------
REGULAR, DIRECTORY = "file", "directory"
KEY = "private key"  # a regular file that libpq also refuses when others may read it (E018)
KEY_WITHOUT_PASSPHRASE = "private key, no sslpassword"  # ... and must not be encrypted (E018)
MISSING = "does not exist"
LOOSE_KEY = "can be read or written by group or others"
ENCRYPTED_KEY = "is an encrypted private key"


class FileNeed:
    """A file libpq opens for a connection: where it is, who set it, what it must be.

    ``required``: a missing file is refused (the root of trust); libpq skips the others
    when they do not exist. Anything present of the wrong type (a FIFO would block libpq
    while it holds the GIL, a directory fails obscurely) is refused by name. ``companion``:
    for the client key, the client certificate, without which libpq never reads the key.
    """

    __slots__ = ("code", "companion", "kind", "origin", "path", "required")

    def __init__(
        self,
        code: str,
        origin: str,
        path: str,
        kind: str = REGULAR,
        required: bool = False,
        companion: str | None = None,
    ) -> None:
        self.code = code
        self.origin = origin
        self.path = path
        self.kind = kind
        self.required = required
        self.companion = companion


def file_problem(path: str, kind: str = REGULAR, companion: str | None = None) -> str | None:
    """Why ``path`` is not a usable file (or directory), checked with ``stat`` only.

    Never ``open`` before ``stat`` said it is a regular file: a FIFO or a device would block
    or have side effects. The one file read is a client key without ``sslpassword`` (is it
    encrypted?), once per version of the file.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if kind == DIRECTORY:
        if not stat.S_ISDIR(info.st_mode):
            return "is not a directory"
    elif stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    elif not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a FIFO, socket or device)"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    if kind in (KEY, KEY_WITHOUT_PASSPHRASE):
        return _key_problem(path, info, kind, companion)
    return None


def _key_problem(path: str, info: os.stat_result, kind: str, companion: str | None) -> str | None:
    # libpq judges key permissions outside Windows only.
    problem = key_mode_problem(info.st_uid, info.st_mode) if os.name != "nt" else None
    if problem is None and kind == KEY_WITHOUT_PASSPHRASE and _encrypted_pem(path, info):
        # OpenSSL would ask for the passphrase on the terminal, if the process has one, and
        # the connection would wait there for ever (measured: libpq 18); else it fails.
        problem = ENCRYPTED_KEY
    # libpq reads the key only after loading a certificate: a lone key is never judged.
    if problem is not None and (companion is None or os.path.exists(companion)):
        return problem
    return None


# What _encrypted_pem found, per (path, inode, mtime, size): a stat is all later connections pay.
_ENCRYPTION_SEEN: dict[tuple[str, int, int, int], bool] = {}
_PEM_ENCRYPTED = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def _encrypted_pem(path: str, info: os.stat_result) -> bool:
    """Whether a key file is PEM encrypted with a passphrase (PKCS#8 or OpenSSL's own form)."""
    key = (path, info.st_ino, info.st_mtime_ns, info.st_size)
    found = _ENCRYPTION_SEEN.get(key)
    if found is None:
        try:  # a regular file a moment ago; O_NONBLOCK in case it was swapped for a FIFO
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            try:
                head = os.read(fd, 65536)
            finally:
                os.close(fd)
        except OSError:
            return False  # libpq will say why it cannot read it
        found = any(marker in head for marker in _PEM_ENCRYPTED)
        if len(_ENCRYPTION_SEEN) > 64:  # renewed keys leave old entries behind
            _ENCRYPTION_SEEN.clear()
        _ENCRYPTION_SEEN[key] = found
    return found


def key_mode_problem(uid: int, mode: int) -> str | None:
    """libpq's rule on a client key (fe-secure-openssl.c): nothing for group or others when
    the user owns it (0600 or less), at most group read when root owns it (0640 or less)."""
    loose = (
        (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO) if uid == 0 else stat.S_IRWXG | stat.S_IRWXO
    )
    if mode & loose:
        owner = "root" if uid == 0 else "the user"
        return f"{LOOSE_KEY} (mode {stat.S_IMODE(mode):04o}, owned by {owner})"
    return None


def _file_need(
    req: Request,
    keyword: str,
    default: str | None,
    kind: str = REGULAR,
    companion: FileNeed | None = None,
) -> FileNeed | None:
    value = req.resolved.get(keyword)
    along = companion.path if companion is not None else None
    if value:
        return FileNeed("E016", req.origin(keyword), os.path.expanduser(value), kind, False, along)
    if default is None:
        return None
    return FileNeed("E016", f"libpq's default {keyword} ({default})", default, kind, False, along)


def file_needs(req: Request, root: RootOfTrust) -> tuple[FileNeed, ...]:
    """Every file libpq may open for this connection (root, client cert and key, CRLs, passfile)."""
    env = req.environ
    passfile = _file_need(req, "passfile", os.path.join(home_directory(env), ".pgpass"))
    if local_proxy(req):  # sslmode=disable: libpq opens none of the TLS files
        return (passfile,) if passfile is not None else ()
    if root.source == DEFAULT_ROOT_SOURCE:
        needs = [FileNeed("E005", DEFAULT_ROOT_SOURCE, root.path, required=True)]
    elif root.source.startswith("system"):
        needs = [
            FileNeed("E006", f"the system trust store ({root.source})", root.path, required=True)
        ]
    else:
        needs = [FileNeed("E006", req.origin("sslrootcert"), root.path, required=True)]
    client_cert = req.resolved.get("sslcertmode") != "disable"
    cert = _file_need(req, "sslcert", _in_dot_postgresql(env, "postgresql.crt"))
    key_kind = KEY if req.resolved.get("sslpassword") else KEY_WITHOUT_PASSPHRASE
    candidates = [
        cert if client_cert else None,
        _file_need(req, "sslkey", _in_dot_postgresql(env, "postgresql.key"), key_kind, cert)
        if client_cert
        else None,
        _file_need(req, "sslcrl", _in_dot_postgresql(env, "root.crl")),
        _file_need(req, "sslcrldir", None, DIRECTORY),
        passfile,
    ]
    return tuple(needs + [need for need in candidates if need is not None])


def service_file_needs(service: str | None, environ: Mapping[str, str]) -> tuple[FileNeed, ...]:
    """The service files libpq reads while resolving a named service (before any rule)."""
    if not service:
        return ()
    user_file = environ.get("PGSERVICEFILE")
    needs = [
        FileNeed("E016", "PGSERVICEFILE", user_file)
        if user_file
        else FileNeed(
            "E016",
            "libpq's default service file",
            os.path.join(home_directory(environ), ".pg_service.conf"),
        )
    ]
    sysconf = environ.get("PGSYSCONFDIR")
    if sysconf:
        needs.append(
            FileNeed(
                "E016", "PGSYSCONFDIR's pg_service.conf", os.path.join(sysconf, "pg_service.conf")
            )
        )
    return tuple(needs)


def file_problems(needs: tuple[FileNeed, ...]) -> list[tuple[FileNeed, str]]:
    """What is wrong with the files now: ``stat`` only, so cheap enough for every connection."""
    found = []
    for need in needs:
        problem = file_problem(need.path, need.kind, need.companion)
        if problem is not None and (need.required or problem != MISSING):
            found.append((need, problem))
    return found


def check_files(needs: tuple[FileNeed, ...]) -> tuple[Violation, ...]:
    """The file rules (E005, E006, E016, E018) as violations, for the checks and dbshell."""
    return tuple(file_violation(need, problem) for need, problem in file_problems(needs))


def file_violation(need: FileNeed, problem: str) -> Violation:
    if need.code == "E005":
        return Violation(
            "E005",
            f"no root of trust: {option_name('sslrootcert')} is not set, nor PGSSLROOTCERT, nor "
            f"a service entry's sslrootcert, and {need.path} is not a readable file, so the "
            "server's certificate cannot be verified.",
        )
    relative = relative_note(need.path)  # "does not exist" from / but not from the project
    if need.code == "E006":
        return Violation(
            "E006", f"{need.origin} is {need.path!r}, which {problem}.{relative}", ROOT_FIX
        )
    if problem == ENCRYPTED_KEY:
        return Violation(
            "E018",
            f"{need.origin} is {need.path!r}, an encrypted private key, and "
            f"{option_name('sslpassword')} is not set: OpenSSL would ask for the passphrase on "
            "the terminal, and the connection wait there (or fail without one).",
            f"set {option_name('sslpassword')} to the key's passphrase, or store the key "
            "unencrypted with mode 0600.",
        )
    if problem.startswith(LOOSE_KEY):
        return Violation(
            "E018",
            f"{need.origin} is {need.path!r}, which {problem}; libpq refuses to use such a "
            "client key.",
            f"chmod 600 {need.path} (as the user that runs Django), or chmod 640 if root owns it.",
        )
    wanted = "a directory" if need.kind == DIRECTORY else "a regular file"
    return Violation(
        "E016",
        f"{need.origin} is {need.path!r}, which {problem}; libpq opens it for every "
        "connection and would block or fail on anything but " + wanted + "." + relative,
        f"point {need.origin} at {wanted} (or remove what is at {need.path}).",
    )


RULES: tuple[Callable[[Request], Violation | None], ...] = (
    e001_sslmode,
    e002_gssencmode,
    e003_protocol,
    e012_host_lists,
    e004_socket,
    e006_root_cert,
    e007_weakening,
    e008_opt_ins,
    e017_connect_retry,
    e019_local_proxy,
)


def host_display(req: Request) -> str | None:
    return req.resolved.get("host") or req.resolved.get("hostaddr") or None


def evaluate(req: Request) -> Evaluation:
    """Apply every rule; a decision only when none is broken."""
    violations = tuple(v for rule in RULES if (v := rule(req)) is not None)
    proxy = local_proxy(req)
    trust = RootOfTrust("", "") if proxy else root_of_trust(req)
    files = file_needs(req, trust) if trust.violation is None else ()
    if violations:
        return Evaluation(req.alias, host_display(req), violations, None, files)
    decision = Decision(
        alias=req.alias,
        hosts=tuple(name for name, _ in _entries(req)),
        root_cert=trust.path,
        root_cert_source=trust.source,
        min_protocol=_min_protocol(req),
        allow_unix_socket=req.options.get(ALLOW_UNIX_SOCKET) is True,
        allow_legacy_ciphers=req.options.get(ALLOW_LEGACY_CIPHERS) is True,
        keylog_keyword=KEYLOG in req.keywords,
        files=files,
        direct_key=None if proxy else direct_key(req),
        allow_local_proxy=proxy,
    )
    return Evaluation(req.alias, host_display(req), (), decision)


def final_parameters(
    decision: Decision, req: Request, compiled: Mapping[str, str | None]
) -> dict[str, str]:
    """The keywords handed to libpq: everything it resolved that matters, made explicit.

    Values from the environment or a service file are passed explicitly too (where
    they differ from libpq's compiled default), so the connection libpq makes is the
    one judged here: nothing is left for it to look up again that could differ.
    """
    params = {
        key: value
        for key, value in req.resolved.items()
        if key in req.explicit or value != compiled.get(key)
    }
    if "service" in req.explicit:
        params["service"] = req.explicit["service"]
    # libpq waits for ever by default: an address that accepts TCP and never answers
    # would hold a request (and a pool worker) for minutes. An explicit value, 0 too, wins.
    params.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    params.update(decision.forced)
    return params


# -- direct TLS by default: whether it applies ------------------------------------------
# When nothing sets sslnegotiation, new connections start TLS directly where the server is known
# to do it (``handshake.negotiate``, which learns per endpoint). Here: the endpoint, or None where
# the default does not apply.

DirectKey = tuple[str, str, str]  # the host, hostaddr and port lists libpq resolved
NEGOTIATION = "sslnegotiation"


def direct_key(req: Request) -> DirectKey | None:
    """The endpoint whose direct TLS is learned, or None where the default does not apply:
    this libpq predates the keyword, something sets it (OPTIONS, ``PGSSLNEGOTIATION``, a
    service, whose file may name it), or a host entry is a Unix-domain socket."""
    if NEGOTIATION not in req.keywords or NEGOTIATION in req.explicit:
        return None
    variable = req.envvars.get(NEGOTIATION)
    if variable and variable in req.environ:
        return None
    if req.explicit.get("service") or req.environ.get("PGSERVICE"):
        return None
    if req.resolved.get(NEGOTIATION, "postgres") != "postgres":
        return None
    if any(not addr and (not name or is_socket_host(name)) for name, addr in _entries(req)):
        return None
    get = req.resolved.get
    return (get("host") or "", get("hostaddr") or "", get("port") or "")


def e009_assembled(decision: Decision, parsed: Mapping[str, str]) -> Violation | None:
    """The assembled connection string, read back by libpq's parser, carries the policy."""
    for key, value in decision.forced.items():
        if parsed.get(key, "") != value:
            return Violation(
                "E009",
                f"libpq would read {key}={parsed.get(key)!r} from the connection string "
                f"instead of {value!r}.",
                "remove the setting that changes it; only exact libpq keywords are accepted.",
            )
    return None


# -- screening: allowed keys and characters (E009, E011), before anything reads the entry ----
# psycopg escapes values but not keys, and libpq skips whitespace around a key and lets
# a later duplicate win, so ``" sslmode"`` would override ``"sslmode"``. libpq also
# receives the connection string as a C string, so a NUL byte in any value cuts off
# everything after it, the forced keywords included. Hence an allowlist: every OPTIONS
# key is exactly a libpq keyword (libpq's own list), a psycopg or Django connection
# argument, or one of this backend's; no field holds a control character. Pure
# functions; the libpq keyword list is passed in (``screen``, the gate's first step).

# Arguments of psycopg.Connection.connect that are not libpq keywords.
PSYCOPG_ARGUMENTS = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)
# OPTIONS keys Django's postgresql backend reads and removes before connecting.
DJANGO_OPTIONS = frozenset({"pool", "server_side_binding", "isolation_level", "assume_role"})
# Pool arguments that would bypass the parameters judged here.
POOL_BYPASSES = frozenset({"conninfo", "kwargs"})
FIELDS = ("HOST", "PORT", "NAME", "USER", "PASSWORD")

_SCALARS = (str, bytes, int, float, os.PathLike)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def allowed_keys(keywords: frozenset[str]) -> frozenset[str]:
    # Weakening keywords pass here so the policy refuses them with the specific reason
    # (E007), even where this libpq does not know them.
    return keywords | PSYCOPG_ARGUMENTS | DJANGO_OPTIONS | BACKEND_OPTIONS | set(WEAKENING_KEYWORDS)


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, os.PathLike):
        return str(os.fspath(value))
    return None


def control_character(value: Any) -> str | None:
    """The first control character in a text value, as its repr (for messages), or None."""
    text = _text(value)
    match = _CONTROL.search(text) if text is not None else None
    return repr(match.group()) if match else None


def _character_violation(name: str, value: Any, secret: bool) -> Violation | None:
    found = control_character(value)
    if found is None:
        return None
    shown = "" if secret else f" ({value!r})"
    return Violation(
        "E011",
        f"{name}{shown} contains the control character {found}; libpq reads values as C "
        "strings, so a NUL would cut off the TLS settings that follow it.",
        f"remove the character from {name}.",
    )


def _shape_violation(
    name: str, key: Any, value: Any, keywords: frozenset[str], secret: bool
) -> Violation | None:
    # psycopg would send str() of anything; a list (a repeated DATABASE_URL query key, as
    # dj-database-url returns it) would reach libpq as "[5, 5]".
    if key not in keywords or value is None or isinstance(value, _SCALARS):
        return None
    return Violation(
        "E011",
        f"{name} is a {type(value).__name__}{'' if secret else f' ({value!r})'}; libpq takes "
        "exactly one value.",
        f"give {name} one value (in a DATABASE_URL: the query key once).",
    )


def _nested(prefix: str, options: Mapping[Any, Any]) -> Iterator[tuple[str, Any, Any]]:
    for key, value in options.items():
        yield f"{prefix}[{key!r}]", key, value


def _key_violation(name: str, key: Any, allowed: frozenset[str]) -> Violation | None:
    if isinstance(key, str) and key in allowed:
        return None
    if isinstance(key, str) and key in NEWER_KEYWORDS:  # a real keyword, for a newer libpq
        return too_new_violation(name, key)
    if key == "conninfo":
        return Violation(
            "E009",
            f"{name} is not accepted: a connection string would reach libpq unchecked.",
            "give each libpq keyword as its own OPTIONS key (host, port, sslrootcert, ...).",
        )
    guess = difflib.get_close_matches(str(key).strip().lower(), sorted(allowed), n=1)
    suggestion = f"did you mean {guess[0]!r}?" if guess else "see libpq's parameter list"
    fix = f"use the exact keyword ({suggestion}) or remove it."
    if isinstance(key, str) and key != key.strip():
        fix += " In a DATABASE_URL, '+' and '%20' in a query key decode to spaces."
    return Violation(
        "E009",
        f"{name} is not a libpq keyword, a psycopg or Django connection argument, or an "
        "option of this backend; libpq would skip the whitespace around a key and let a "
        "later duplicate override the TLS settings.",
        fix,
    )


def _pool_violations(pool: Any) -> Iterator[Violation | None]:
    if not isinstance(pool, Mapping):
        return
    for name, key, value in _nested("OPTIONS['pool']", pool):
        if key in POOL_BYPASSES:
            yield Violation(
                "E009",
                f"{name} is not accepted: the pool would hand it to libpq unchecked.",
                "put libpq keywords directly in OPTIONS; the pool uses those.",
            )
        yield _character_violation(name, value, secret=False)


def screen(
    settings_dict: Mapping[str, Any],
    keywords: frozenset[str],
    secret_keywords: frozenset[str] = frozenset(),
) -> list[Violation]:
    """Every key and character problem in one DATABASES entry.

    Values are never echoed for PASSWORD, for the keywords libpq marks secret
    (``libpq.secret_keywords``, passed in) or for keys this libpq does not know (a
    newer libpq's secret, say ``oauth_client_secret`` on libpq 15, is refused by name).
    """
    found: list[Violation | None] = [
        _character_violation(field, settings_dict.get(field), secret=field == "PASSWORD")
        for field in FIELDS
    ]
    options = settings_dict.get("OPTIONS") or {}
    allowed = allowed_keys(keywords)
    for name, key, value in _nested("OPTIONS", options):
        secret = key in secret_keywords or key not in allowed
        found.append(_key_violation(_named(key, name), key, allowed))
        found.append(_character_violation(_named(key, name), value, secret=secret))
        found.append(_shape_violation(_named(key, name), key, value, keywords, secret))
    found.extend(_pool_violations(options.get("pool")))
    return [v for v in found if v is not None]


def _named(key: Any, fallback: str) -> str:
    return option_name(key) if isinstance(key, str) and key.isidentifier() else fallback


# -- the password provider: a fresh password for each physical connection ----------------
# Short-lived credentials (IAM tokens) expire, and Django computes the connection parameters
# once per connect (its pool, once at construction): a provider is called for each new
# physical connection instead, after the policy has passed. A string names one only where
# settings code vouches for it (a built-in's path, or one listed in
# settings.SECURE_PG_BACKEND_PASSWORD_PROVIDERS): dj-database-url copies a URL's query keys
# into OPTIONS, and a URL must never make the process import or call code (E015, before any
# import). Its value is screened like a setting (a NUL would cut off the TLS keywords after
# it), never stored, logged or shown, and placed last in the connection parameters.
FIELD = f"OPTIONS[{PASSWORD_PROVIDER!r}]"
# Settings code lists here the dotted paths of its own providers it lets OPTIONS name.
ALLOWED_SETTING = "SECURE_PG_BACKEND_PASSWORD_PROVIDERS"

# It returns the password (a str) or ``provider.Credentials``.
Provider = Callable[[str, Mapping[str, Any]], object]
# Strings that name a provider without settings code listing them: this package's own.
BUILTIN_PROVIDERS = ("secure_pg_backend.credentials.aws_rds_iam",)


def _configuration_error(alias: str, host: str | None, problem: str, fix: str) -> Exception:
    return ProviderConfigurationError(alias, host, problem, fix)


def provider_violation(alias: str, settings_dict: Mapping[str, Any]) -> Violation | None:
    """E015 when OPTIONS['password_provider'] cannot be used (for the gate and the checks)."""
    try:
        load_provider(alias, settings_dict)
    except ProviderConfigurationError as exc:
        return Violation("E015", exc.problem, exc.fix)
    return None


def provider_name(provider: object) -> str:
    """The dotted name errors show for a provider (a path as given, else module.qualname)."""
    if isinstance(provider, str):
        return provider
    if isinstance(provider, functools.partial):
        return f"functools.partial({provider_name(provider.func)}, ...)"
    module = getattr(provider, "__module__", None) or type(provider).__module__
    name = getattr(provider, "__qualname__", None) or type(provider).__qualname__
    return f"{module}.{name}"


@functools.lru_cache(maxsize=32)
def _import(path: str) -> Any:
    return import_string(path)


def _allowed_paths() -> tuple[str, ...]:
    from django.conf import settings

    listed = getattr(settings, ALLOWED_SETTING, ())
    return tuple(listed) if isinstance(listed, list | tuple | frozenset | set) else ()


def _named_provider(alias: str, host: str | None, path: str) -> Any:
    """The provider a string names; nothing is imported unless settings code allowed it."""
    if path not in BUILTIN_PROVIDERS and path not in _allowed_paths():
        # Never echo more than a name: the string may be anything a URL carried.
        shown = path if path.replace(".", "").replace("_", "").isalnum() else "a string"
        raise _configuration_error(
            alias,
            host,
            f"{FIELD} is {shown!r}, a dotted path settings code has not allowed; this "
            "backend imports nothing a DATABASE_URL can name (dj-database-url copies its "
            "query keys into OPTIONS).",
            f"in settings, set {FIELD} to the function itself, or add its dotted path to "
            f"settings.{ALLOWED_SETTING} (a list); built-in: "
            f"{', '.join(repr(name) for name in BUILTIN_PROVIDERS)}.",
        )
    try:
        return _import(path)
    except ImportError as exc:
        raise _configuration_error(
            alias,
            host,
            f"{FIELD} is {path!r}, which cannot be imported ({exc}).",
            f"list the dotted path of a function (alias, settings_dict) -> password in "
            f"settings.{ALLOWED_SETTING}, or set {FIELD} to the function itself.",
        ) from None


def load_provider(alias: str, settings_dict: Mapping[str, Any]) -> tuple[Provider, str] | None:
    """The configured provider and its name, or None; ImproperlyConfigured when unusable."""
    options: Mapping[str, Any] = settings_dict.get("OPTIONS") or {}
    value = options.get(PASSWORD_PROVIDER)
    if value is None:
        return None
    host = settings_dict.get("HOST") or None
    example = "'secure_pg_backend.credentials.aws_rds_iam'"
    provider = _named_provider(alias, host, value) if isinstance(value, str) else value
    if not callable(provider):
        raise _configuration_error(
            alias,
            host,
            f"{FIELD} is {provider_name(value)!r}, a {type(provider).__name__}, not a callable.",
            f"set it to a function (alias, settings_dict) -> password or its dotted path, "
            f"e.g. {example}.",
        )
    if settings_dict.get("PASSWORD"):
        raise _configuration_error(
            alias,
            host,
            f"both PASSWORD and {FIELD} are set; it is unclear which one should be used.",
            f"remove PASSWORD (the provider supplies it for every connection) or {FIELD}.",
        )
    return provider, provider_name(value)


def has_provider(settings_dict: Mapping[str, Any]) -> bool:
    """Whether a provider is configured (cheap: a connection without one never imports
    ``provider``)."""
    options = settings_dict.get("OPTIONS") or {}
    return options.get(PASSWORD_PROVIDER) is not None


def password_for(alias: str, settings_dict: Mapping[str, Any]) -> str | None:
    """The provider's password for one new physical connection; None when none is configured.

    Asking, screening, caching and the user a provider may return are ``provider``'s.
    """
    from .provider import credentials_for  # it imports this module

    answer = credentials_for(alias, settings_dict)
    return None if answer is None else answer.password


def with_password(
    alias: str, settings_dict: Mapping[str, Any], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Connection parameters with the provider's user and password (``provider``); without
    a provider, the parameters as they are (no copy on every new connection)."""
    if not has_provider(settings_dict):
        return params if isinstance(params, dict) else dict(params)
    from .provider import with_credentials  # it imports this module

    return with_credentials(alias, settings_dict, params)


# -- the gate: one alias's settings to the keywords for psycopg.connect, or a refusal ----------
# The exact parameters psycopg will hand libpq, judged before any network I/O. Input: one
# DATABASES entry and the parameters Django's ``get_connection_params`` built from it. Steps:
# screen keys and characters (``screen``); let libpq resolve the libpq keywords (service file,
# environment, defaults) without I/O; apply the rules to what libpq resolved; make every
# resolved value explicit, add the forced keywords, and read the string psycopg will assemble
# back through libpq's own parser. The result is the keyword dict for ``psycopg.connect`` or a
# ``SecurePolicyError``.


class Verdict(Evaluation):
    """The gate's answer: the policy's evaluation, plus the parameters for psycopg.connect
    when the connection is allowed.

    ``violations`` are about the configuration and may be cached with it. The state of the
    files libpq opens is not part of it: ``file_violations`` holds what the gate found
    before resolving a service (service files), and ``check_files`` looks again, at every
    physical connection.
    """

    __slots__ = ("file_violations", "params")

    def __init__(
        self,
        alias: str,
        host: str | None,
        violations: tuple[Violation, ...] = (),
        decision: Decision | None = None,
        params: Mapping[str, Any] | None = None,
        file_violations: tuple[Violation, ...] = (),
        files: tuple[FileNeed, ...] = (),
    ) -> None:
        super().__init__(alias, host, violations, decision, files)
        self.params = params
        self.file_violations = file_violations

    def check_files(self) -> tuple[Violation, ...]:
        """The file rules, now: ``stat`` only, never cached."""
        return self.file_violations or check_files(self.files)

    def now(self) -> Verdict:
        """This verdict with the files' current state: what the checks and dbshell report."""
        files = self.check_files()
        if not files:
            return self
        return Verdict(self.alias, self.host, self.violations + files)

    def raise_if_refused(self, password: object = None) -> None:
        """Offline callers (dbshell): refuse on the configuration and the files alike."""
        verdict = self.now()
        if verdict.decision is None:
            raise SecurePolicyError(self.alias, self.host, verdict.violations, password=password)


def _as_text(value: Any) -> str:
    # What psycopg's make_conninfo sends for a value (it calls str()).
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _origins(settings_dict: Mapping[str, Any]) -> dict[str, str]:
    fields = {"host": "HOST", "port": "PORT", "dbname": "NAME", "user": "USER"}
    return {key: field for key, field in fields.items() if settings_dict.get(field)}


def _request(
    alias: str,
    settings_dict: Mapping[str, Any],
    explicit: dict[str, str],
    resolved: Mapping[str, str],
) -> Request:
    return Request(
        alias=alias,
        explicit=explicit,
        resolved=resolved,
        options=settings_dict.get("OPTIONS") or {},
        environ=os.environ,
        keywords=libpq.keywords(),
        origins=_origins(settings_dict),
        envvars=libpq.keyword_variables(),
    )


def judge(alias: str, settings_dict: Mapping[str, Any], conn_params: Mapping[str, Any]) -> Verdict:
    """Decide for one connection; never raises for a policy reason (see ``Verdict``)."""
    screened = screen(settings_dict, libpq.keywords(), libpq.secret_keywords())
    provider = provider_violation(alias, settings_dict)
    if provider is not None:
        screened.append(provider)
    if screened:
        return Verdict(alias, settings_dict.get("HOST") or None, tuple(screened))
    keywords = libpq.keywords()
    explicit = {k: _as_text(v) for k, v in conn_params.items() if k in keywords and v is not None}
    # libpq reads a named service's files while resolving, holding the GIL: a FIFO there
    # would freeze the process, so they are looked at first (and never cached, see base).
    service = explicit.get("service") or os.environ.get("PGSERVICE")
    blocked = check_files(service_file_needs(service, os.environ))
    if blocked:
        return Verdict(alias, settings_dict.get("HOST") or None, file_violations=blocked)
    resolution = libpq.resolve(explicit)
    if resolution.error and not resolution.values:  # nothing resolved: libpq's reason only
        return Verdict(
            alias, settings_dict.get("HOST") or None, (_libpq_refused(resolution.error),)
        )
    request = _request(alias, settings_dict, explicit, resolution.values)
    evaluation = evaluate(request)
    violations = evaluation.violations
    if resolution.error and not violations:
        violations = (_libpq_refused(resolution.error),)
    if violations or evaluation.decision is None:
        return Verdict(alias, evaluation.host, violations, files=evaluation.files)
    decision = evaluation.decision
    final = final_parameters(decision, request, libpq.compiled_defaults())
    assembled = e009_assembled(decision, libpq.parse(libpq.conninfo(final)))
    if assembled is not None:
        return Verdict(alias, evaluation.host, (assembled,))
    others = {
        k: v for k, v in conn_params.items() if k not in keywords and k not in BACKEND_OPTIONS
    }
    return Verdict(alias, evaluation.host, (), decision, {**final, **others})


def _libpq_refused(message: str) -> Violation:
    return Violation("E013", f"libpq cannot use these parameters: {message}.")

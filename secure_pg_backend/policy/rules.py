"""The rules on what libpq resolved, one small function per check id (``e001_sslmode`` is
``secure_pg_backend.E001``; ``RULES``), and ``evaluate``: every rule over one ``Request``, a
``Decision`` when none is broken. Pure functions; the only I/O is ``stat`` on the system
store's candidates for ``sslrootcert='system'``."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping

from ..checkids import ROOT_FIX
from ..errors import Violation, option_name, remove_hint
from ..files import DIRECTORY, KEY, KEY_WITHOUT_PASSPHRASE, REGULAR, FileNeed, home_directory
from .terms import (
    ACCEPTED_PROTOCOLS,
    ALLOW_LEGACY_CIPHERS,
    ALLOW_LOCAL_PROXY,
    ALLOW_UNIX_SOCKET,
    CONNECT_RETRY,
    DEFAULT_MIN_PROTOCOL,
    GSSENCMODE,
    KEYLOG,
    NEGOTIATION,
    OPT_INS,
    PROTOCOL_RANK,
    SSLMODE,
    WEAKENING_KEYWORDS,
    Decision,
    DirectKey,
    Request,
    Verdict,
    _split,
    is_socket_host,
)

__all__ = [
    "DEFAULT_ROOT_SOURCE",
    "RULES",
    "RootOfTrust",
    "direct_key",
    "e001_sslmode",
    "e002_gssencmode",
    "e003_protocol",
    "e004_socket",
    "e006_root_cert",
    "e007_weakening",
    "e008_opt_ins",
    "e012_host_lists",
    "e017_connect_retry",
    "e019_local_proxy",
    "evaluate",
    "file_needs",
    "host_display",
    "local_proxy",
    "loopback_address",
    "root_of_trust",
]

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


def _in_dot_postgresql(environ: Mapping[str, str], name: str) -> str:
    return os.path.join(home_directory(environ), ".postgresql", name)


def root_of_trust(req: Request) -> RootOfTrust:
    """The CA file libpq will trust: explicit, service, PGSSLROOTCERT, then ~/.postgresql."""
    value = req.resolved.get("sslrootcert")
    if value is None:
        return RootOfTrust(_in_dot_postgresql(req.environ, "root.crt"), DEFAULT_ROOT_SOURCE)
    origin = req.origin("sslrootcert")
    if value == "system":
        from ..truststore import SystemTrustStoreError, system_trust_file  # only for "system"

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
    # libpq reads a password file only when no password is given (fe-connect.c): then its
    # default ~/.pgpass is one more file per connection; an explicit passfile is checked as set.
    default_passfile = (
        None if req.resolved.get("password") else os.path.join(home_directory(env), ".pgpass")
    )
    passfile = _file_need(req, "passfile", default_passfile)
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


def evaluate(req: Request) -> Verdict:
    """Apply every rule; a decision only when none is broken."""
    violations = tuple(v for rule in RULES if (v := rule(req)) is not None)
    proxy = local_proxy(req)
    trust = RootOfTrust("", "") if proxy else root_of_trust(req)
    files = file_needs(req, trust) if trust.violation is None else ()
    if violations:
        return Verdict(req.alias, host_display(req), violations, files=files)
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
    return Verdict(req.alias, host_display(req), (), decision)


# -- direct TLS by default: whether it applies ------------------------------------------
# When nothing sets sslnegotiation, new connections start TLS directly where the server is known
# to do it (``handshake.negotiate``, which learns per endpoint). Here: the endpoint, or None where
# the default does not apply.


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

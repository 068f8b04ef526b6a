"""The TLS policy: Django settings in, libpq parameters (or a refusal) out.

Pure functions over dicts, like psycopg's ``conninfo``: no Django connection,
no network. The same rules serve the connection path (``enforce``), the system
checks (``evaluate``), ``dbshell`` and the post-handshake check (``check_link``).
The only I/O is reading the environment and asking whether the root-certificate
file and the service file exist and can be read.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SecurePolicyError, Violation
from .truststore import SystemTrustStoreError, system_trust_file

__all__ = [
    "BACKEND_OPTIONS",
    "Decision",
    "Evaluation",
    "LinkFacts",
    "apply",
    "check_link",
    "enforce",
    "evaluate",
    "fingerprint",
    "is_socket_host",
    "libpq_environment",
]

SSLMODE = "verify-full"
GSSENCMODE = "disable"
DEFAULT_MIN_PROTOCOL = "TLSv1.2"
PROTOCOL_RANK = {"TLSv1": 10, "TLSv1.1": 11, "TLSv1.2": 12, "TLSv1.3": 13}
ACCEPTED_PROTOCOLS = ("TLSv1.2", "TLSv1.3")

# OPTIONS keys this backend reads itself; libpq never sees them.
ALLOW_UNIX_SOCKET = "allow_unix_socket"
ALLOW_LEGACY_CIPHERS = "allow_legacy_ciphers"
BACKEND_OPTIONS = frozenset({ALLOW_UNIX_SOCKET, ALLOW_LEGACY_CIPHERS})

# libpq keywords that can only weaken what this backend enforces.
WEAKENING_KEYWORDS = {
    "requiressl": "is libpq's deprecated predecessor of sslmode",
    "sslkeylogfile": "writes the TLS session keys to a file, so anyone who reads "
    "it can decrypt the captured traffic",
}

# Check ids (``secure_pg_backend.E00x``); one code per rule.
E_SSLMODE = "E001"
E_GSSENC = "E002"
E_PROTOCOL = "E003"
E_SOCKET = "E004"
E_NO_ROOT_CERT = "E005"
E_BAD_ROOT_CERT = "E006"
E_WEAKENING = "E007"
E_OPT_IN = "E008"

_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class Decision:
    """What the backend forces on libpq for one alias, and what it allowed."""

    alias: str
    hosts: tuple[str, ...]
    root_cert: str
    root_cert_source: str
    min_protocol: str = DEFAULT_MIN_PROTOCOL
    allow_unix_socket: bool = False
    allow_legacy_ciphers: bool = False

    @property
    def forced(self) -> dict[str, str]:
        """libpq keywords passed explicitly, so no env var or service file can lower them."""
        return {
            "sslmode": SSLMODE,
            "gssencmode": GSSENCMODE,
            "ssl_min_protocol_version": self.min_protocol,
            "sslrootcert": self.root_cert,
        }

    @property
    def host_display(self) -> str | None:
        return ",".join(self.hosts) or None


@dataclass(frozen=True)
class Evaluation:
    """Result of ``evaluate``: a decision when no rule is broken, else violations."""

    alias: str
    host: str | None
    violations: tuple[Violation, ...] = ()
    decision: Decision | None = None


def is_socket_host(host: str) -> bool:
    """True for what libpq treats as a Unix-domain socket: empty, a path, or ``@abstract``."""
    host = host.strip()
    return host == "" or host.startswith(("/", "@")) or bool(_WINDOWS_PATH.match(host))


def _split_hosts(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(part.strip() for part in str(value).split(","))


def _service_entry(name: str, environ: Mapping[str, str]) -> dict[str, str] | None:
    """Find a pg_service.conf section the way libpq does (user file, then system file)."""
    candidates = []
    if environ.get("PGSERVICEFILE"):
        candidates.append(environ["PGSERVICEFILE"])
    else:
        candidates.append(os.path.join(os.path.expanduser("~"), ".pg_service.conf"))
    if environ.get("PGSYSCONFDIR"):
        candidates.append(os.path.join(environ["PGSYSCONFDIR"], "pg_service.conf"))
    candidates.append("/etc/postgresql-common/pg_service.conf")
    for path in candidates:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except (OSError, configparser.Error):
            continue
        if parser.has_section(name):
            return dict(parser.items(name))
    return None


def _check_root_file(path: str, origin: str) -> Violation | None:
    try:
        with open(path, "rb"):
            pass
    except IsADirectoryError:
        problem = f"{origin} is {path!r}, which is a directory, not a certificate file."
    except FileNotFoundError:
        problem = f"{origin} is {path!r}, which does not exist."
    except OSError as exc:
        problem = f"{origin} is {path!r}, which cannot be read ({exc.strerror})."
    else:
        return None
    return Violation(
        E_BAD_ROOT_CERT,
        problem,
        "set OPTIONS['sslrootcert'] to a readable file with your provider's CA "
        "bundle (PEM), or to 'system' for a server with a publicly trusted certificate.",
    )


def _root_of_trust(
    options: Mapping[str, Any], service: Mapping[str, str] | None, environ: Mapping[str, str]
) -> tuple[str, str, Violation | None]:
    """Return (path, source, violation) for the CA file libpq will trust."""
    if "sslrootcert" in options:
        value, origin = options["sslrootcert"], "OPTIONS['sslrootcert']"
    elif environ.get("PGSSLROOTCERT"):
        value, origin = environ["PGSSLROOTCERT"], "PGSSLROOTCERT"
    elif service and service.get("sslrootcert"):
        value, origin = service["sslrootcert"], "pg_service.conf sslrootcert"
    else:
        default = os.path.join(os.path.expanduser("~"), ".postgresql", "root.crt")
        if os.path.exists(default):
            value, origin = default, "~/.postgresql/root.crt"
        else:
            return (
                "",
                "",
                Violation(
                    E_NO_ROOT_CERT,
                    "no root of trust: OPTIONS has no 'sslrootcert', PGSSLROOTCERT is unset "
                    f"and {default} does not exist, so the server's certificate cannot be "
                    "verified.",
                    "set OPTIONS['sslrootcert'] to the CA bundle your provider publishes "
                    "(e.g. the RDS global bundle), or to 'system' when the server has a "
                    "certificate from a public CA.",
                ),
            )
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        return (
            "",
            "",
            Violation(
                E_BAD_ROOT_CERT,
                f"{origin} is {value!r}; it must be a file path or 'system'.",
                "set OPTIONS['sslrootcert'] to the path of a PEM CA bundle, or to 'system'.",
            ),
        )
    if value == "system":
        try:
            path, where = system_trust_file(environ)
        except SystemTrustStoreError as exc:
            return "", "", Violation(E_BAD_ROOT_CERT, f"{origin} is 'system', but {exc}", exc.fix)
        return path, f"system ({where})", None
    value = os.path.expanduser(value)
    return value, origin, _check_root_file(value, origin)


def evaluate(
    alias: str, settings_dict: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Evaluation:
    """Apply every rule to one ``DATABASES`` entry; collect all violations."""
    environ = os.environ if environ is None else environ
    options: Mapping[str, Any] = settings_dict.get("OPTIONS") or {}
    violations: list[Violation] = []

    sslmode = options.get("sslmode", SSLMODE)
    if sslmode != SSLMODE:
        why = {
            "disable": "never uses TLS",
            "allow": "tries plaintext first",
            "prefer": "silently falls back to plaintext",
            "require": "encrypts but never checks the server's certificate, so a "
            "machine-in-the-middle can read credentials and data",
            "verify-ca": "checks the certificate chain but not the host name, so any "
            "certificate from the same CA (another customer's, on a shared CA) is accepted",
        }.get(sslmode if isinstance(sslmode, str) else "", "is not a mode this backend accepts")
        violations.append(
            Violation(
                E_SSLMODE,
                f"OPTIONS['sslmode'] is {sslmode!r}, which {why}.",
                "remove OPTIONS['sslmode'] (this backend always uses 'verify-full') "
                "or set it to exactly 'verify-full'.",
            )
        )

    if "gssencmode" in options and options["gssencmode"] != GSSENCMODE:
        violations.append(
            Violation(
                E_GSSENC,
                f"OPTIONS['gssencmode'] is {options['gssencmode']!r}: with Kerberos "
                "credentials present libpq would encrypt with GSSAPI instead of TLS, and "
                "no server certificate would be checked.",
                "remove OPTIONS['gssencmode'] (this backend always sends 'disable').",
            )
        )

    min_protocol = options.get("ssl_min_protocol_version", DEFAULT_MIN_PROTOCOL)
    if min_protocol not in ACCEPTED_PROTOCOLS:
        violations.append(
            Violation(
                E_PROTOCOL,
                f"OPTIONS['ssl_min_protocol_version'] is {min_protocol!r}; "
                "TLS versions before 1.2 are broken and not allowed.",
                "remove it (default 'TLSv1.2') or set 'TLSv1.3'.",
            )
        )
        min_protocol = DEFAULT_MIN_PROTOCOL
    max_protocol = options.get("ssl_max_protocol_version")
    if max_protocol is not None and (
        max_protocol not in ACCEPTED_PROTOCOLS
        or PROTOCOL_RANK[max_protocol] < PROTOCOL_RANK[min_protocol]
    ):
        violations.append(
            Violation(
                E_PROTOCOL,
                f"OPTIONS['ssl_max_protocol_version'] is {max_protocol!r}, below the "
                f"minimum {min_protocol!r}: no acceptable TLS version is left.",
                "remove OPTIONS['ssl_max_protocol_version'] or set it to 'TLSv1.3'.",
            )
        )

    for keyword, why in WEAKENING_KEYWORDS.items():
        if keyword in options:
            violations.append(
                Violation(
                    E_WEAKENING,
                    f"OPTIONS[{keyword!r}] is set; it {why}.",
                    f"remove OPTIONS[{keyword!r}]; this backend sets the TLS parameters itself.",
                )
            )

    flags: dict[str, bool] = {}
    for key in (ALLOW_UNIX_SOCKET, ALLOW_LEGACY_CIPHERS):
        value = options.get(key, False)
        if not isinstance(value, bool):
            violations.append(
                Violation(
                    E_OPT_IN,
                    f"OPTIONS[{key!r}] is {value!r}; opt-ins must be exactly True or False.",
                    f"set OPTIONS[{key!r}] = True to opt in, or remove it.",
                )
            )
            value = False
        flags[key] = value

    # Where will libpq connect? HOST wins over OPTIONS['host'] (Django's order),
    # then the service file; PGHOST and libpq's default socket are refused.
    service_name = options.get("service")
    service = _service_entry(str(service_name), environ) if service_name else None
    # libpq fills every keyword not passed explicitly from the service entry (named in
    # OPTIONS, else by PGSERVICE), so a service file could turn on the key log that OPTIONS
    # may not. requiressl there is moot: the explicit sslmode outranks it.
    filler_name = service_name or environ.get("PGSERVICE")
    filler = service if service_name else None
    if filler_name and not service_name:
        filler = _service_entry(str(filler_name), environ)
    if filler and "sslkeylogfile" in filler:
        violations.append(
            Violation(
                E_WEAKENING,
                f"the pg_service.conf entry {str(filler_name)!r} sets 'sslkeylogfile'; it "
                f"{WEAKENING_KEYWORDS['sslkeylogfile']}.",
                "remove sslkeylogfile from that service entry.",
            )
        )
    host_value = settings_dict.get("HOST") or options.get("host")
    # An explicit OPTIONS value, even "", outranks the service entry in libpq
    # (psycopg passes "" on; only None is dropped): host="" means the default socket.
    if not host_value and service is not None and options.get("host") is None:
        host_value = service.get("host")
    hosts = _split_hosts(host_value)
    hostaddr = options.get("hostaddr")
    if hostaddr is None:
        hostaddr = (service or {}).get("hostaddr")
    host_display = ",".join(hosts) or (str(hostaddr) if hostaddr else None)

    # No host but a hostaddr is plain TCP; a service file we cannot read is left
    # to libpq, and the post-handshake check refuses a socket it may pick.
    tcp_or_unknown = not hosts and bool(hostaddr or (service_name and service is None))
    if not tcp_or_unknown and not flags[ALLOW_UNIX_SOCKET]:
        sockets = [h for h in hosts or ("",) if is_socket_host(h)]
        if sockets:
            shown = ", ".join(repr(h) for h in sockets)
            violations.append(
                Violation(
                    E_SOCKET,
                    (
                        f"HOST names a Unix-domain socket ({shown})"
                        if any(sockets)
                        else "the host is empty, so libpq would use PGHOST or its default "
                        "Unix-domain socket"
                    )
                    + "; libpq ignores sslmode on sockets and would connect without TLS.",
                    "set HOST to the server's DNS name (as on its certificate), or, for a "
                    "server on this machine, opt in with OPTIONS['allow_unix_socket'] = True.",
                )
            )

    root_cert, root_source, root_violation = _root_of_trust(options, service, environ)
    if root_violation:
        violations.append(root_violation)

    if violations:
        return Evaluation(alias, host_display, tuple(violations), None)
    decision = Decision(
        alias=alias,
        hosts=hosts,
        root_cert=root_cert,
        root_cert_source=root_source,
        min_protocol=min_protocol,
        allow_unix_socket=flags[ALLOW_UNIX_SOCKET],
        allow_legacy_ciphers=flags[ALLOW_LEGACY_CIPHERS],
    )
    return Evaluation(alias, host_display, (), decision)


# Environment variables the rules above read. A decision may be reused while these,
# HOST and OPTIONS are unchanged; add any variable a new rule reads.
ENVIRONMENT_INPUTS = (
    "PGSSLROOTCERT",
    "PGSERVICEFILE",
    "PGSYSCONFDIR",
    "PGSERVICE",
    "SSL_CERT_FILE",
    "HOME",
)


def fingerprint(
    settings_dict: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[Any, ...] | None:
    """A key under which a decision can be reused, or None when it must be re-evaluated.

    With a service file involved the decision also depends on that file's contents,
    so it is never reused. Files the decision names (the root certificate) are read
    again by libpq on every connection, which reports them missing in its own words.
    """
    environ = os.environ if environ is None else environ
    options = settings_dict.get("OPTIONS") or {}
    if options.get("service") or environ.get("PGSERVICE"):
        return None
    return (
        settings_dict.get("HOST"),
        repr(options),
        tuple(environ.get(name) for name in ENVIRONMENT_INPUTS),
    )


def enforce(
    alias: str, settings_dict: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Decision:
    """``evaluate`` or raise ``SecurePolicyError`` (an ``ImproperlyConfigured``)."""
    result = evaluate(alias, settings_dict, environ)
    if result.decision is None:
        raise SecurePolicyError(
            alias, result.host, result.violations, password=settings_dict.get("PASSWORD")
        )
    return result.decision


def apply(decision: Decision, params: Mapping[str, Any]) -> dict[str, Any]:
    """Connection parameters with the backend's own keys removed and the policy forced."""
    out = {k: v for k, v in params.items() if k not in BACKEND_OPTIONS}
    out.update(decision.forced)
    return out


def libpq_environment(decision: Decision) -> dict[str, str]:
    """The policy as libpq environment variables (for psql and other libpq tools)."""
    return {
        "PGSSLMODE": SSLMODE,
        "PGGSSENCMODE": GSSENCMODE,
        "PGSSLMINPROTOCOLVERSION": decision.min_protocol,
        "PGSSLROOTCERT": decision.root_cert,
    }


# -- the live link -------------------------------------------------------------

_AEAD_MARKERS = ("GCM", "CHACHA20-POLY1305", "CCM")
_FORWARD_SECRET_PREFIXES = ("ECDHE-", "DHE-")


@dataclass(frozen=True)
class LinkFacts:
    """What libpq says about an established connection (no SQL involved)."""

    host: str
    ssl_in_use: bool
    protocol: str | None
    cipher: str | None
    used_gssapi: bool = False


def cipher_is_strong(protocol: str | None, cipher: str | None) -> bool:
    """TLS 1.3 suites, or TLS 1.2 with forward secrecy and an AEAD cipher."""
    if not cipher:
        return False
    if protocol == "TLSv1.3" or cipher.startswith("TLS_"):
        return True
    return cipher.startswith(_FORWARD_SECRET_PREFIXES) and any(
        marker in cipher for marker in _AEAD_MARKERS
    )


def check_link(decision: Decision, facts: LinkFacts) -> tuple[str, str] | None:
    """Return (problem, fix) when the established link breaks the policy, else None."""
    if facts.used_gssapi:
        return (
            "the connection is encrypted with GSSAPI instead of TLS; no certificate was checked.",
            "make sure gssencmode=disable reaches libpq (remove it from OPTIONS and "
            "pg_service.conf).",
        )
    if not facts.ssl_in_use:
        if is_socket_host(facts.host):
            if decision.allow_unix_socket:
                return None
            return (
                f"libpq connected over the Unix-domain socket {facts.host!r}, without TLS "
                "(the host probably came from pg_service.conf or PGHOST).",
                "set HOST to the server's DNS name, or opt in with "
                "OPTIONS['allow_unix_socket'] = True for a server on this machine.",
            )
        return (
            "the connection is not using TLS.",
            "enable ssl on the server and check that nothing rewrites sslmode.",
        )
    rank = PROTOCOL_RANK.get(facts.protocol or "", 0)
    if rank < PROTOCOL_RANK[decision.min_protocol]:
        return (
            f"the server negotiated {facts.protocol}, below the minimum {decision.min_protocol}.",
            "upgrade the server's TLS configuration (ssl_min_protocol_version).",
        )
    if not decision.allow_legacy_ciphers and not cipher_is_strong(facts.protocol, facts.cipher):
        return (
            f"the server negotiated the cipher {facts.cipher} over {facts.protocol}, which "
            "lacks forward secrecy or authenticated encryption.",
            "configure the server's ssl_ciphers for ECDHE with AES-GCM or CHACHA20-POLY1305 "
            "(or TLS 1.3); for a legacy server you cannot change, opt out of this rule "
            "only with OPTIONS['allow_legacy_ciphers'] = True.",
        )
    return None

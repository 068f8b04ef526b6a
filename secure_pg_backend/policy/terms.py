"""The policy's terms: what it forces on libpq, the options it reads, and its two records:
``Request`` (what the settings ask for, as libpq resolved it) and ``Decision`` (what is forced
on every connection of an alias, and what it allowed)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import SecurePolicyError, Violation, option_name
from ..files import FileNeed, check_files

__all__ = [
    "ACCEPTED_PROTOCOLS",
    "ALLOW_LEGACY_CIPHERS",
    "ALLOW_LOCAL_PROXY",
    "ALLOW_UNIX_SOCKET",
    "BACKEND_OPTIONS",
    "CONNECT_RETRY",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MIN_PROTOCOL",
    "GSSENCMODE",
    "KEYLOG",
    "LOCAL_PROXY_SSLMODE",
    "NEGOTIATION",
    "OPT_INS",
    "PASSWORD_PROVIDER",
    "PROTOCOL_RANK",
    "SSLMODE",
    "WEAKENING_KEYWORDS",
    "Decision",
    "DirectKey",
    "Request",
    "Verdict",
    "is_socket_host",
]

SSLMODE = "verify-full"
NEGOTIATION = "sslnegotiation"
DirectKey = tuple[str, str, str]  # the host, hostaddr and port lists libpq resolved
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
CONNECT_RETRY = "connect_retry"  # seconds of retries for transient connect failures (retry.Retry)
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
        "forced",
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
        # Keywords passed explicitly, so no environment or service file can change them:
        # read on every connection (judged, then checked on the link), so built once.
        self.forced = self._forced()

    def _forced(self) -> Mapping[str, str]:
        """Keywords passed explicitly, so no environment or service file can change them."""
        if self.allow_local_proxy:  # plaintext to the loopback sidecar, and only to it
            forced = {"sslmode": LOCAL_PROXY_SSLMODE, "gssencmode": GSSENCMODE}
            if self.keylog_keyword:
                forced[KEYLOG] = ""
            return MappingProxyType(forced)
        forced = {
            "sslmode": SSLMODE,
            "gssencmode": GSSENCMODE,
            "ssl_min_protocol_version": self.min_protocol,
            "sslrootcert": self.root_cert,
        }
        if self.keylog_keyword:
            forced[KEYLOG] = ""
        return MappingProxyType(forced)

    @property
    def host_display(self) -> str | None:
        return ",".join(self.hosts) or None


def is_socket_host(host: str) -> bool:
    """libpq's rule for a Unix-domain socket: an absolute path or ``@abstract`` name."""
    return host.startswith(("/", "@")) or bool(_WINDOWS_PATH.match(host))


def _split(value: str | None) -> list[str]:
    # libpq splits host lists on commas and keeps empty elements (they mean "default").
    return value.split(",") if value is not None else []


class Verdict:
    """The policy's answer for one alias: a ``Decision`` and the parameters for
    ``psycopg.connect`` when the connection is allowed, else the broken rules.

    ``violations`` are about the configuration and may be cached with it. The state of the
    files libpq opens is not part of it: ``file_violations`` holds what the gate found
    before resolving a service (service files), and ``check_files`` looks again, at every
    physical connection. ``files``: what libpq would open, for the file rules.
    """

    __slots__ = ("alias", "decision", "file_violations", "files", "host", "params", "violations")

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
        self.alias = alias
        self.host = host
        self.violations = violations
        self.decision = decision
        self.params = params
        self.file_violations = file_violations
        self.files = decision.files if decision is not None else files

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

"""Exceptions and the one place refusal messages are worded."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.utils import OperationalError

REDACTED = "********"


def secret_values(settings_dict: Mapping[str, Any]) -> tuple[str, ...]:
    """Every secret a DATABASES entry holds: PASSWORD and each OPTIONS value whose keyword
    libpq marks secret (``libpq.secret_keywords``). The one list every message is cleaned of."""
    from .libpq import secret_keywords  # psycopg is loaded by then; errors stays import-light

    options = settings_dict.get("OPTIONS") or {}
    found = [settings_dict.get("PASSWORD")]
    if isinstance(options, Mapping):
        hidden = secret_keywords()
        found.extend(value for key, value in options.items() if key in hidden)
    return tuple(value for value in found if isinstance(value, str) and value)


def redact(text: str, secrets: object) -> str:
    """Remove every secret from ``text``: messages may quote user-supplied values.

    ``secrets`` is one secret or several (``secret_values``); anything not a non-empty
    string is ignored. Longest first, so a secret containing another is removed whole.
    """
    if isinstance(secrets, str):
        secrets = (secrets,)
    if not isinstance(secrets, Iterable):
        return text
    for secret in sorted((s for s in secrets if isinstance(s, str) and s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def location(alias: str, host: str | None) -> str:
    """How every message names the configuration at fault: ``DATABASES['x'] (host 'h')``."""
    where = f"DATABASES[{alias!r}]"
    return f"{where} (host {host!r})" if host else where


class Violation:
    """One broken rule: the check id it is reported under, what is wrong, the fix.

    A slotted class like the policy's other records (see ``policy``): a NamedTuple compiles
    its constructor with eval when defined, on every process start.
    """

    __slots__ = ("code", "fix", "problem")

    def __init__(self, code: str, problem: str, fix: str) -> None:
        self.code = code  # "E001": also the system check id suffix
        self.problem = problem
        self.fix = fix

    def __repr__(self) -> str:
        return f"Violation({self.code!r}, {self.problem!r}, {self.fix!r})"

    def render(self, alias: str, host: str | None) -> str:
        return f"{location(alias, host)}: {self.problem} Fix: {self.fix}"


class SecurePolicyError(ImproperlyConfigured):
    """The settings would allow a connection that is not verified TLS.

    Raised before any network I/O; ``violations`` holds every broken rule.
    """

    def __init__(
        self, alias: str, host: str | None, violations: Sequence[Violation], password: object = None
    ) -> None:
        self.alias = alias
        self.host = host
        self.violations = tuple(violations)
        lines = [v.render(alias, host) for v in self.violations]
        head = "secure_pg_backend refused the database settings"
        if len(lines) == 1:
            message = f"{head}: {lines[0]}"
        else:
            message = head + ":\n" + "\n".join(f"  - {line}" for line in lines)
        super().__init__(redact(message, password))


class InsecureConnectionError(OperationalError):
    """A connection was made but did not meet the policy (or TLS verification failed).

    The connection has been closed before any query was sent on it. A subclass
    of Django's ``OperationalError`` so existing error handling keeps working.
    """

    def __init__(self, message: str, *, alias: str = "", host: str | None = None) -> None:
        super().__init__(message)
        self.alias = alias
        self.host = host

    def copy(self) -> InsecureConnectionError:
        """A fresh instance, so one refusal can be raised in several threads."""
        return type(self)(str(self), alias=self.alias, host=self.host)


def link_message(alias: str, host: str | None, problem: str, fix: str) -> str:
    where = location(alias, host)
    return f"secure_pg_backend refused the connection for {where}: {problem} Fix: {fix}"


# libpq's wording (stable across libpq 12-18) -> what it means and how to fix it.
_LIBPQ_TLS_ERRORS = (
    (
        "does not match host name",
        "the server's certificate is not valid for the host name connected to "
        "(a machine-in-the-middle, or the wrong name in HOST).",
        "set HOST to a name listed on the certificate; to reach it by IP, keep the "
        "name in HOST and put the IP in OPTIONS['hostaddr'].",
    ),
    (
        "certificate verify failed",
        "the server's certificate is not signed by a CA in the root certificate file "
        "(or is expired or not yet valid).",
        "set OPTIONS['sslrootcert'] to the CA bundle that issued the server's "
        "certificate (see docs/cloud-providers.md), or renew it if expired.",
    ),
    (
        "server does not support SSL",
        "the server does not offer TLS.",
        "enable ssl on the server (ssl = on with a certificate); this backend never "
        "falls back to plaintext.",
    ),
    (
        "root certificate file",
        "libpq could not use the root certificate file.",
        "point OPTIONS['sslrootcert'] at a readable PEM CA bundle.",
    ),
    (
        # libpq 17+, sslnegotiation=direct: "...established without ALPN protocol negotiation
        # extension" or "...with unexpected ALPN protocol"
        "ALPN",
        "direct TLS negotiation did not select ALPN 'postgresql': the peer is not known "
        "to be a PostgreSQL server (cross-protocol attacks).",
        "connect to a PostgreSQL 17+ server (or a proxy that negotiates ALPN 'postgresql'), "
        "or remove OPTIONS['sslnegotiation'].",
    ),
    (
        "ssl error",
        "the TLS handshake failed.",
        "check the server's TLS configuration (protocol versions and ciphers) "
        "against this backend's minimum; with OPTIONS['sslnegotiation'] = 'direct' the "
        "server must be PostgreSQL 17 or newer.",
    ),
    (
        "ssl syscall error",
        "the TLS connection broke during the handshake.",
        "check that the port is a PostgreSQL server (or PgBouncer) with TLS enabled.",
    ),
)


def explain_libpq_error(
    exc: BaseException, alias: str, host: str | None, password: object = None
) -> InsecureConnectionError | None:
    """Turn a libpq TLS failure into an error that names alias, host and the fix."""
    if isinstance(exc, InsecureConnectionError):
        return exc
    text = str(exc)
    lowered = text.lower()
    for needle, problem, fix in _LIBPQ_TLS_ERRORS:
        if needle.lower() in lowered:
            detail = " ".join(text.split())
            message = link_message(alias, host, f"{problem} libpq said: {detail}.", fix)
            return InsecureConnectionError(redact(message, password), alias=alias, host=host)
    return None

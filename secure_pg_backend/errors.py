"""Exceptions and the one place refusal messages are worded."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.utils import OperationalError

from .checkids import CHECKS

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

    The id must be in ``checkids.CHECKS`` (a ``KeyError`` where a new id is made up); the
    fix is the table's unless the caller words one with the specifics at fault.

    A slotted class like the policy's other records (see ``policy``): a NamedTuple compiles
    its constructor with eval when defined, on every process start.
    """

    __slots__ = ("code", "fix", "problem")

    def __init__(self, code: str, problem: str, fix: str | None = None) -> None:
        entry = CHECKS[code]
        self.code = code  # "E001": also the system check id suffix (``CheckId.id``)
        self.problem = problem
        self.fix = entry.fix if fix is None else fix

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

    #: What kind of refusal (``faults.Cause.name``: "untrusted", "hostname", "file", ...).
    cause = "policy"

    def __init__(
        self, message: str, *, alias: str = "", host: str | None = None, cause: str | None = None
    ) -> None:
        super().__init__(message)
        self.alias = alias
        self.host = host
        if cause is not None:
            self.cause = cause

    def copy(self) -> InsecureConnectionError:
        """A fresh instance, so one refusal can be raised in several threads."""
        return type(self)(str(self), alias=self.alias, host=self.host, cause=self.cause)


class ConnectionFileError(InsecureConnectionError):
    """A file libpq needs for this connection is missing or unusable *now* (E005, E006, E016).

    Found at connection time, so an ``OperationalError`` like every other connection-time
    failure; nothing is cached: the next physical connection looks at the files again.
    """

    cause = "file"

    violations: tuple[Violation, ...] = ()

    @classmethod
    def from_violations(
        cls, alias: str, host: str | None, violations: Sequence[Violation]
    ) -> ConnectionFileError:
        lines = [v.render(alias, host) for v in violations]
        head = "secure_pg_backend could not open a connection"
        message = (
            f"{head}: {lines[0]}"
            if len(lines) == 1
            else head + ":\n" + "\n".join(f"  - {line}" for line in lines)
        )
        error = cls(message, alias=alias, host=host)
        error.violations = tuple(violations)
        return error

    def copy(self) -> ConnectionFileError:
        error = super().copy()
        assert isinstance(error, ConnectionFileError)
        error.violations = self.violations
        return error


def link_message(alias: str, host: str | None, problem: str, fix: str) -> str:
    where = location(alias, host)
    return f"secure_pg_backend refused the connection for {where}: {problem} Fix: {fix}"

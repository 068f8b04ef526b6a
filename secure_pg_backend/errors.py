"""The exceptions every refusal is raised as, ``Violation`` (one broken rule), how messages
name the configuration at fault, and ``redact``/``secret_values``: what every message is
cleaned of. The vocabulary they draw on: ``checkids`` (every check id) and ``causes`` (why an
attempt failed); ``refusals`` words a failed attempt.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.utils import OperationalError

from .checkids import CHECKS

__all__ = [
    "CONFIGURATION",
    "FILE_UNUSABLE",
    "NO_CONNECTION",
    "REDACTED",
    "REFUSED",
    "SETTINGS_REFUSED",
    "TLS_REFUSED",
    "ConnectionFileError",
    "CredentialProviderError",
    "InsecureConnectionError",
    "ProviderConfigurationError",
    "SecurePolicyError",
    "Violation",
    "link_message",
    "location",
    "option_name",
    "outcome",
    "redact",
    "relative_note",
    "remove_hint",
    "secret_values",
    "without_alias",
]

REDACTED = "********"

# What kind of failure a connection attempt ended in, as ``dbtls`` (and its --json ``cause``)
# and the online checks report it: each exception class below carries its own (``outcome``).
SETTINGS_REFUSED = "settings refused"
FILE_UNUSABLE = "file unusable"
TLS_REFUSED = "TLS refused"
CONFIGURATION = "configuration"
NO_CONNECTION = "could not connect"


def outcome(exc: BaseException) -> str:
    """The kind of failure an exception is, by its class (``outcome`` on this module's
    exceptions): any other ImproperlyConfigured is raised before a server is asked anything
    (Django refusing a combination of settings, an optional package missing); the rest (server
    down, wrong password, missing database) could not connect."""
    found: str | None = getattr(exc, "outcome", None)
    if isinstance(found, str):
        return found
    return CONFIGURATION if isinstance(exc, ImproperlyConfigured) else NO_CONNECTION


# -- redaction and locations ------------------------------------------------------------------


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


def option_name(key: str) -> str:
    """How messages name a setting."""
    return f"OPTIONS[{key!r}]"


def remove_hint(key: str) -> str:
    """The fix for a setting that must go, in both places it can come from."""
    return f"remove {option_name(key)} (from a DATABASE_URL: its ?{key}= query key)"


def location(alias: str, host: str | None) -> str:
    """How every message names the configuration at fault: ``DATABASES['x'] (host 'h')``."""
    where = f"DATABASES[{alias!r}]"
    return f"{where} (host {host!r})" if host else where


class Violation:
    """One broken rule: the check id it is reported under, what is wrong, the fix.

    The id must be in ``CHECKS`` (a ``KeyError`` where a new id is made up); the
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

    outcome = SETTINGS_REFUSED

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

    @classmethod
    def misassembled(cls, alias: str, why: str) -> SecurePolicyError:
        """E020: the wrapper class never reaches the policy (``base.misassembly`` says why)."""
        problem, _, fix = why.partition(" Fix: ")
        return cls(alias, None, [Violation("E020", problem[:1].upper() + problem[1:], fix)])


class InsecureConnectionError(OperationalError):
    """A connection was made but did not meet the policy (or TLS verification failed).

    The connection has been closed before any query was sent on it. A subclass
    of Django's ``OperationalError`` so existing error handling keeps working.
    """

    outcome = TLS_REFUSED

    #: What kind of refusal (``Cause.name``: "untrusted", "hostname", "file", ...).
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

    outcome = FILE_UNUSABLE

    cause = "file"

    violations: tuple[Violation, ...] = ()
    replaced = False  # every file at fault was there before and is missing now (being replaced)

    @classmethod
    def from_violations(
        cls, alias: str, host: str | None, violations: Sequence[Violation], replaced: bool = False
    ) -> ConnectionFileError:
        lines = [v.render(alias, host) for v in violations]
        head = "secure_pg_backend could not open a connection"
        message = (
            f"{head}: {lines[0]}"
            if len(lines) == 1
            else head + ":\n" + "\n".join(f"  - {line}" for line in lines)
        )
        error = cls(message, alias=alias, host=host)
        error.violations, error.replaced = tuple(violations), replaced
        return error

    def copy(self) -> ConnectionFileError:
        error = super().copy()
        assert isinstance(error, ConnectionFileError)
        error.violations, error.replaced = self.violations, self.replaced
        return error


class CredentialProviderError(InsecureConnectionError):
    """The password provider raised or returned no usable password; nothing was sent.

    A subclass of ``InsecureConnectionError`` (so of Django's ``OperationalError``):
    the backend could not open the connection, and Django's pool hands it to waiting
    requests at once instead of letting them time out.
    """

    outcome = NO_CONNECTION  # the password provider failed, not TLS


class ProviderConfigurationError(ImproperlyConfigured):
    """The provider setting itself is unusable; the gate reports it as E015 before any I/O."""

    def __init__(self, alias: str, host: str | None, problem: str, fix: str) -> None:
        super().__init__(f"{location(alias, host)}: {problem} Fix: {fix}")
        self.problem, self.fix = problem, fix


REFUSED = "secure_pg_backend refused the connection for "


def link_message(
    alias: str, host: str | None, problem: str, fix: str, details: Sequence[str] = ()
) -> str:
    """A refusal for a terminal: one first line that names the alias once and says what is
    wrong and the fix, then the details (what the server presented, libpq's words), indented."""
    first = f"{REFUSED}{location(alias, host)}: {problem} Fix: {fix}"
    return "\n".join([first, *(f"  {line}" for line in details)])


def without_alias(text: str, alias: str, host: str | None) -> str:
    """A message for a place that already names the alias (``manage.py check`` shows it as the
    object, ``dbtls`` as the line's label): its first ``DATABASES['alias']`` made
    ``host 'h'``, so the alias is named once."""
    where = location(alias, host)
    if where not in text:
        return text
    return text.replace(where, f"host {host!r}" if host else "these settings", 1)


def relative_note(path: str) -> str:
    """What a message adds about a relative file path: where it resolves now (``""`` for an
    absolute one). libpq opens it against the process's current directory, which differs
    between ``manage.py`` in the project, a service manager and a container's WORKDIR."""
    if not path or os.path.isabs(path):
        return ""
    cwd = os.getcwd()
    return (
        f" {path!r} is a relative path: it resolves against the current directory, now "
        f"{cwd!r} (so {os.path.join(cwd, path)!r}); use an absolute path, for example one "
        "built from BASE_DIR."
    )

"""The one place refusals are worded: every check id, the exceptions, redaction.

* ``CHECKS``: every check id in one table, with what it means, how to fix it and the rule
  that reports it. The gate, the system checks, ``dbshell`` and the online checks report
  under these ids and nowhere else define one: ``Violation`` looks its id up here (an
  unknown id is a ``KeyError`` in the code that made it, not a silent new id) and takes the
  fix from here unless the fix names specifics of the settings at fault (which key, which
  value). ``docs/checks.md`` shows ``markdown_table()`` verbatim
  (``tests/test_checkids.py`` keeps them equal).
* The exceptions every refusal is raised as, and how they name the configuration at fault.
* ``redact``/``secret_values``: what every message is cleaned of.

Plain strings and slotted classes: this module is imported by every process that connects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.utils import OperationalError

REDACTED = "********"

# -- every check id ---------------------------------------------------------------------------
PREFIX = "secure_pg_backend."
ERROR, WARNING = "Error", "Warning"

# The fixes several rules share, worded once.
HOST_FIX = "set HOST to the server's DNS name (as on its certificate)"
ROOT_FIX = (
    "set OPTIONS['sslrootcert'] to a readable file with your provider's CA bundle (PEM), "
    "or to 'system' for a server with a publicly trusted certificate."
)


class CheckId:
    """One check id: ``rule`` names the function that reports it (module-relative)."""

    __slots__ = ("code", "fix", "level", "meaning", "online", "rule")

    def __init__(
        self,
        code: str,
        rule: str,
        meaning: str,  # Markdown, for docs/checks.md
        fix: str,  # plain text: used verbatim by messages whose fix has no specifics
        level: str = ERROR,
        online: bool = False,  # needs a connection (manage.py check --database)
    ) -> None:
        self.code = code
        self.rule = rule
        self.meaning = meaning
        self.fix = fix
        self.level = level
        self.online = online

    @property
    def id(self) -> str:
        """The system check id: ``secure_pg_backend.E001``."""
        return PREFIX + self.code

    @property
    def kind(self) -> str:
        return f"{self.level} (online)" if self.online else self.level


_TABLE = (
    CheckId(
        "E001",
        "policy.e001_sslmode",
        '`OPTIONS["sslmode"]` is anything but `"verify-full"` (`disable`, `allow`, `prefer`, '
        "`require`, `verify-ca`, other spellings)",
        "remove it; this backend always uses 'verify-full'.",
    ),
    CheckId(
        "E002",
        "policy.e002_gssencmode",
        '`OPTIONS["gssencmode"]` is not `"disable"`: with Kerberos credentials libpq would '
        "encrypt with GSSAPI instead of TLS",
        "remove it; this backend always sends 'disable'.",
    ),
    CheckId(
        "E003",
        "policy.e003_protocol",
        "`ssl_min_protocol_version` below `TLSv1.2` (or not a TLS version), or "
        "`ssl_max_protocol_version` below the minimum",
        "remove them (default minimum 'TLSv1.2') or set 'TLSv1.3'.",
    ),
    CheckId(
        "E004",
        "policy.e004_socket",
        "`HOST` is empty, a socket directory or an `@abstract` socket: libpq ignores "
        "`sslmode` on Unix sockets",
        f"{HOST_FIX}, or, for a server on this machine, opt in with "
        "OPTIONS['allow_unix_socket'] = True.",
    ),
    CheckId(
        "E005",
        "policy.check_files",
        "no root of trust: no `sslrootcert`, no `PGSSLROOTCERT`, no `~/.postgresql/root.crt`",
        ROOT_FIX,
    ),
    CheckId(
        "E006",
        "policy.e006_root_cert",
        "the root certificate is missing, a directory, unreadable or not a string, or "
        '`"system"` could not be resolved (e.g. `SSL_CERT_FILE` names a missing file)',
        ROOT_FIX + " For 'system': install ca-certificates or fix SSL_CERT_FILE.",
    ),
    CheckId(
        "E007",
        "policy.e007_weakening",
        '`OPTIONS["requiressl"]` (sslmode\'s deprecated ancestor) or `OPTIONS["sslkeylogfile"]` '
        "(writes the TLS session keys to a file) is set",
        "remove it; this backend sets the TLS parameters itself.",
    ),
    CheckId(
        "E008",
        "policy.e008_opt_ins",
        "`allow_unix_socket` or `allow_legacy_ciphers` is not exactly `True`/`False`",
        "set it to True to opt in, or remove it.",
    ),
    CheckId(
        "E009",
        "policy.screen",
        "an `OPTIONS` key that is not a libpq keyword, a psycopg or Django connection argument "
        "or an option of this backend (including the same keyword with spaces around it, which "
        "libpq would read as a later duplicate), a libpq keyword this process's libpq is too "
        "old for, or `conninfo` in `OPTIONS` or `OPTIONS['pool']`, which would reach libpq "
        "unchecked",
        "use the exact keyword (the message suggests the closest one) or remove it; give each "
        "libpq keyword as its own OPTIONS key.",
    ),
    CheckId(
        "E010",
        "validation.DatabaseValidation",
        "the link was refused under the policy; the message is the refusal itself (certificate "
        "not trusted, wrong host name, expired, no TLS, weak cipher, …); see "
        "[Errors](errors.md) and [Troubleshooting](troubleshooting.md)",
        "the fix at the end of the message.",
        online=True,
    ),
    CheckId(
        "E011",
        "policy.screen",
        "a value contains a control character such as NUL: libpq reads values as C strings, so "
        "everything after it, the forced TLS settings included, would be cut off; or a libpq "
        "keyword has several values (a repeated `DATABASE_URL` query key)",
        "remove the character, or give the keyword one value (a PASSWORD value is never echoed).",
    ),
    CheckId(
        "E012",
        "policy.e012_host_lists",
        "`hostaddr` lists more addresses than `HOST` lists names, or an address has no host "
        "name: verify-full checks the certificate against the name",
        f"{HOST_FIX}; to reach it by IP, keep the name in HOST and put the IP in "
        "OPTIONS['hostaddr'], one for each host.",
    ),
    CheckId(
        "E013",
        "policy.judge",
        "libpq itself cannot use the parameters (for example a service name missing from "
        "`pg_service.conf`, or host, hostaddr and port lists of different lengths)",
        "correct the setting libpq names (a service name must exist in pg_service.conf; host, "
        "hostaddr and port lists must have matching lengths).",
    ),
    CheckId(
        "E014",
        "validation.DatabaseValidation",
        "the alias could not connect for a reason that is not TLS: the server is down or "
        "unreachable, the password is wrong, the database does not exist; the message is "
        "libpq's (password redacted). Or Django refused the settings when opening the "
        "connection (\"the settings conflict: Pooling doesn't support persistent "
        'connections." for `OPTIONS["pool"]` with `CONN_MAX_AGE`), in Django\'s words, '
        "before any server was contacted",
        "check that the server is running and reachable, and USER, PASSWORD and NAME; for a "
        "conflict, change the settings the message names.",
        online=True,
    ),
    CheckId(
        "E015",
        "credentials.provider_violation",
        '`OPTIONS["password_provider"]` cannot be used: a string that is neither the built-in '
        "provider nor listed in `SECURE_PG_BACKEND_PASSWORD_PROVIDERS` (a `DATABASE_URL` must "
        "not make the process import code; nothing is imported), an allowed path that does "
        "not import, not callable, or `PASSWORD` is set as well ([Operations](operations.md))",
        "set it to a function (alias, settings_dict) -> password in settings (or list its "
        "dotted path in SECURE_PG_BACKEND_PASSWORD_PROVIDERS), and remove PASSWORD.",
    ),
    CheckId(
        "E016",
        "policy.check_files",
        "a file libpq would open (client certificate or key, CRL file or directory, passfile, "
        "service file, explicit or libpq's default under `~/.postgresql`) is a FIFO, device, "
        "socket or the wrong kind: libpq would block on it while holding the GIL",
        "point the setting at a regular file (a directory for sslcrldir), or remove what is "
        "at that path.",
    ),
    CheckId(
        "E017",
        "policy.e017_connect_retry",
        '`OPTIONS["connect_retry"]` is not a number of seconds from 0 to 3600',
        "set it to a number of seconds from 0 (no retries) to 3600, or remove it (default 5).",
    ),
    CheckId(
        "W001",
        "validation.DatabaseValidation",
        "the server certificate expires within 30 days",
        "Renew the server certificate before it expires; clients will refuse the connection "
        "after that date.",
        level=WARNING,
        online=True,
    ),
)

CHECKS: dict[str, CheckId] = {entry.code: entry for entry in _TABLE}


def check_id(code: str) -> str:
    """``"E001"`` -> ``"secure_pg_backend.E001"``; a ``KeyError`` for an id not in the table."""
    return CHECKS[code].id


def markdown_table() -> str:
    """The table of docs/checks.md."""
    rows = ["| Id | Kind | Meaning | Fix |", "| --- | --- | --- | --- |"]
    rows += [f"| `{c.id}` | {c.kind} | {c.meaning} | {c.fix} |" for c in _TABLE]
    return "\n".join(rows) + "\n"


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


def link_message(alias: str, host: str | None, problem: str, fix: str) -> str:
    where = location(alias, host)
    return f"secure_pg_backend refused the connection for {where}: {problem} Fix: {fix}"

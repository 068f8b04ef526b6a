"""What went wrong and how it is worded: check ids, failed attempts, exceptions, redaction.

* ``CHECKS``: every check id in one table, with what it means, how to fix it and the rule
  that reports it. The gate, the system checks, ``dbshell`` and the online checks report
  under these ids and nowhere else define one: ``Violation`` looks its id up here (an
  unknown id is a ``KeyError`` in the code that made it, not a silent new id) and takes the
  fix from here unless the fix names specifics of the settings at fault (which key, which
  value). ``docs/checks.md`` shows ``markdown_table()`` verbatim
  (``tests/test_checkids.py`` keeps them equal).
* The exceptions every refusal is raised as, and how they name the configuration at fault.
* ``redact``/``secret_values``: what every message is cleaned of.
* ``explanation``: one id or refusal cause in words for a terminal (``python -m
  secure_pg_backend explain``, ``manage.py dbtls --explain``), from the same table.
* Why an attempt to open a connection failed (``CAUSES``, ``classify``, ``explain``) and
  whether trying again can help (the retry itself is the attempt pipeline's: ``pipeline``).

A failed attempt to open a connection is one of three things:

- a **refusal**: the server could not be verified (certificate not trusted, wrong name, no
  TLS, protocol or cipher below the minimum, no ALPN, client certificate rejected). Trying
  again cannot help. The error names the alias, the cause and the fix, and Django's pool
  hands it to waiting requests at once; the next attempt after the fix succeeds.
- **transient**: the server or the path was briefly unable, before any session existed
  (connection refused or reset, EOF during the handshake, starting up, shutting down, too
  many clients, a timeout, a standby during a failover). Retried with jittered backoff
  within ``OPTIONS['connect_retry']``; then raised exactly as the stock backend raises it.
- **anything else** (a wrong password, a missing database, a sentence not recognised):
  raised as the stock backend raises it, and not retried.

How a failure is recognised: psycopg's exception class (``ConnectionTimeout``), the failed
attempt's libpq state that psycopg keeps (``exc.pgconn``: whether the server had already
accepted the login and started a session),
the reasons OpenSSL gives for TLS failures (never translated), and libpq's and the server's
sentences in English (a Python process runs libpq with ``LC_MESSAGES=C`` unless the
application calls ``setlocale``). A failure not recognised falls in the third group, so an
unknown or translated message can neither become a refusal nor a retry: it behaves as stock.

Plain strings and slotted classes: this module is imported by every process that connects.
"""

from __future__ import annotations

import os
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

    __slots__ = ("code", "deploy", "fix", "level", "meaning", "online", "rule")

    def __init__(
        self,
        code: str,
        rule: str,
        meaning: str,  # Markdown, for docs/checks.md
        fix: str,  # plain text: used verbatim by messages whose fix has no specifics
        level: str = ERROR,
        online: bool = False,  # needs a connection (manage.py check --database)
        deploy: bool = False,  # reported by manage.py check --deploy only
    ) -> None:
        self.code = code
        self.rule = rule
        self.meaning = meaning
        self.fix = fix
        self.level = level
        self.online = online
        self.deploy = deploy

    @property
    def id(self) -> str:
        """The system check id: ``secure_pg_backend.E001``."""
        return PREFIX + self.code

    @property
    def kind(self) -> str:
        if self.online:
            return f"{self.level} (online)"
        return f"{self.level} (deploy)" if self.deploy else self.level


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
        "`allow_unix_socket`, `allow_legacy_ciphers` or `allow_local_proxy` is not exactly "
        "`True`/`False`",
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
        "not trusted, wrong host name, expired, no TLS, weak cipher, …), naming its cause",
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
        "policy.provider_violation",
        '`OPTIONS["password_provider"]` cannot be used: a string that is neither the built-in '
        "provider nor listed in `SECURE_PG_BACKEND_PASSWORD_PROVIDERS` (a `DATABASE_URL` must "
        "not make the process import code; nothing is imported), an allowed path that does "
        "not import, not callable, or `PASSWORD` is set as well",
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
        "E018",
        "policy.check_files",
        "the client certificate's private key (`OPTIONS[\"sslkey\"]`, or libpq's default "
        "`~/.postgresql/postgresql.key`) can be read or written by group or others, next to a "
        "client certificate libpq loads: libpq refuses such a key (0600 or less when owned by "
        "the user, 0640 or less when owned by root); or the key is encrypted and "
        '`OPTIONS["sslpassword"]` is not set: OpenSSL would ask for the passphrase on the '
        "terminal and the connection wait there. Checked before every new connection",
        "restrict the key file: chmod 600 (owned by the user that runs Django), or 640 if "
        "owned by root; for an encrypted key, set OPTIONS['sslpassword'] to its passphrase.",
    ),
    CheckId(
        "E019",
        "policy.e019_local_proxy",
        '`OPTIONS["allow_local_proxy"]` is set but the connection would not go to one loopback '
        "TCP address: more than one host, a host name other than `localhost` pinned by "
        "`hostaddr`, a `hostaddr` or literal address outside 127.0.0.0/8 and ::1, or a Unix "
        "socket. Judged before any I/O: the password and the traffic, without TLS, must never "
        "leave the machine",
        "set HOST to the sidecar's loopback address ('127.0.0.1' or '::1'), or to 'localhost' "
        "with OPTIONS['hostaddr'] = '127.0.0.1'; for a server elsewhere, remove "
        "OPTIONS['allow_local_proxy'] and connect with verified TLS.",
    ),
    CheckId(
        "E020",
        "checks.check_databases",
        "the alias's wrapper class lists Django's PostgreSQL wrapper before `VerifiedTLSMixin` "
        "in its bases, so Django's `get_connection_params` and `get_new_connection` run instead "
        "of the policy's. Such a class refuses every connection (`SecurePolicyError`)",
        "put VerifiedTLSMixin first: class DatabaseWrapper(VerifiedTLSMixin, "
        "<other>.DatabaseWrapper).",
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
    CheckId(
        "W002",
        "validation.DatabaseValidation",
        "the client certificate this side presents has less than a third of its lifetime "
        "and fewer than 30 days left (a 24-hour certificate from Vault, cert-manager or "
        "SPIFFE warns in its last 8 hours, a 90-day one in its last 30 days): its renewal is "
        "overdue",
        "Check the automation that renews the client certificate (OPTIONS['sslcert'] and "
        "OPTIONS['sslkey']); the server will refuse connections once it has expired. New "
        "connections read the files again, so a renewed pair needs no restart.",
        level=WARNING,
        online=True,
    ),
    CheckId(
        "W003",
        "checks.check_deploy_aliases",
        "an alias uses a PostgreSQL backend this policy does not cover: Django's `postgresql` "
        "or `postgis` ENGINE, or a third-party wrapper built on them without "
        "`VerifiedTLSMixin`; its connections take whatever `sslmode` they are given "
        "(libpq's default `prefer` falls back to plaintext) and nothing checks the live link. "
        "Judged by the wrapper class, not the ENGINE's name",
        "set its ENGINE to 'secure_pg_backend' ('secure_pg_backend.postgis' for PostGIS); for a "
        "third-party wrapper, compose it: class DatabaseWrapper(VerifiedTLSMixin, "
        "theirs.DatabaseWrapper) with VerifiedTLSMixin from secure_pg_backend.base, first.",
        level=WARNING,
        deploy=True,
    ),
    CheckId(
        "W004",
        "checks.check_deploy_plaintext",
        '`OPTIONS["allow_local_proxy"]` or `OPTIONS["allow_unix_socket"]` is set: this '
        "alias's own link carries the password and the data without TLS, and its safety rests "
        "on the machine (who may bind the loopback port first, who may open the socket). Named "
        "by `check --deploy` so the opt-in is a decision someone reviewed",
        "keep it only where the sidecar (Cloud SQL Auth Proxy, AlloyDB Auth Proxy, pgproxy) or "
        "the local server is yours; prefer the sidecar's own IAM authentication (no password "
        "on the loopback leg) or a Unix socket whose directory permissions admit only this "
        "user, and remove the opt-in where verified TLS to the server is possible.",
        level=WARNING,
        deploy=True,
    ),
    CheckId(
        "W005",
        "checks.w005_relative_paths",
        "a file setting (`sslrootcert`, `sslcert`, `sslkey`, `sslcrl`, `sslcrldir`, `passfile`, "
        "or the same from `PGSSLROOTCERT` and the like) is a relative path: libpq opens it "
        "against the process's current directory, which differs between `manage.py` in the "
        "project, a service manager and a container's working directory. The warning names "
        "the directory it resolves against now",
        "use an absolute path, for example os.path.join(BASE_DIR, 'certs', 'ca.pem').",
        level=WARNING,
    ),
    CheckId(
        "W006",
        "checks.w006_transaction_pooler",
        "the alias connects to a known transaction-mode pooler (Supabase's pooler on port 6543, "
        "a Neon `-pooler` host, Azure's built-in PgBouncer on port 6432: judged by the host "
        "and port alone) and `DISABLE_SERVER_SIDE_CURSORS` is not `True`: a server-side "
        "cursor (`.iterator()`) outlives the transaction the pooler lent its server "
        'connection for, and fails with `cursor "_django_curs_…" does not exist` under '
        "concurrency",
        "set DATABASES[alias]['DISABLE_SERVER_SIDE_CURSORS'] = True, or connect to the "
        "pooler's session mode or the database directly.",
        level=WARNING,
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


# -- explanations: python -m secure_pg_backend explain, manage.py dbtls --explain -----------
# Shipped with the package (the wheel has no docs/), so messages point here, not at a page.
EXPLAIN = "python -m secure_pg_backend explain"


def explain_command(name: str) -> str:
    """How a message names its explanation: ``python -m secure_pg_backend explain E010``."""
    return f"{EXPLAIN} {name}"


def _plain(markdown: str) -> str:
    # The meanings are Markdown for docs/checks.md; a terminal gets them without code marks.
    return markdown.replace("`", "")


def _refusal_causes() -> tuple[Cause, ...]:
    """The refusals a connection attempt can end in (``InsecureConnectionError.cause``), each
    with its problem and fix: E010's causes."""
    return tuple(cause for cause in CAUSES if cause.kind == REFUSAL)


def _where(entry: CheckId) -> str:
    if entry.online:
        return "manage.py check --database ALIAS (and before migrate); it connects"
    if entry.deploy:
        return "manage.py check --deploy"
    return (
        "every manage.py check, offline; opening a connection with these settings is refused "
        "the same way"
    )


def explanation(name: str) -> str:
    """What a check id (``E010``, ``secure_pg_backend.E010``, ``e010``) or a refusal cause
    (``untrusted``) means and how to fix it; a ``LookupError`` saying what exists otherwise."""
    key = name.strip()
    if key.lower().startswith(PREFIX):
        key = key[len(PREFIX) :]
    entry = CHECKS.get(key.upper())
    if entry is not None:
        lines = [
            f"{entry.id}: {entry.kind}",
            f"Reported by: {_where(entry)}.",
            f"What it means: {_plain(entry.meaning)}.",
            f"Fix: {entry.fix}",
        ]
        if entry.code == "E010":
            lines.append(f"The refusal names one of these causes ({EXPLAIN} CAUSE for one):")
            lines += [
                f"  {cause.name}: {cause.problem} Fix: {cause.fix}" for cause in _refusal_causes()
            ]
        return "\n".join(lines) + "\n"
    for cause in _refusal_causes():
        if cause.name == key.lower():
            return (
                f"{cause.name} (a refusal: {CHECKS['E010'].id} in manage.py check --database)\n"
                f"What it means: {cause.problem}\nFix: {cause.fix}\n"
            )
    import difflib  # only for a name that is not known: not on every process start

    known = [*CHECKS, *(cause.name for cause in _refusal_causes())]
    close = difflib.get_close_matches(key.upper() if key[:1].isupper() else key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise LookupError(
        f"{name!r} is neither a check id nor a refusal cause of secure_pg_backend{hint}; "
        f"'{EXPLAIN}' lists them all."
    )


def explanation_index() -> str:
    """Every check id and refusal cause, one line each."""
    width = len(PREFIX) + 4
    lines = [f"{c.id:<{width}}  {c.kind:<16}  {_plain(c.meaning)}" for c in _TABLE]
    lines += [
        f"{cause.name:<{width}}  {'refusal (E010)':<16}  {cause.problem}"
        for cause in _refusal_causes()
    ]
    return "\n".join(lines) + "\n"


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


# -- why an attempt to open a connection failed -------------------------------------------

REFUSAL, TRANSIENT = "refusal", "transient"


class Cause:
    """One kind of failure: its name (a metric label), its kind, and for refusals the words."""

    __slots__ = ("fix", "kind", "markers", "name", "problem")

    def __init__(
        self, name: str, kind: str, markers: tuple[str, ...], problem: str = "", fix: str = ""
    ) -> None:
        self.name = name
        self.kind = kind
        self.markers = markers  # lower-case substrings of libpq's message
        self.problem = problem
        self.fix = fix

    def __repr__(self) -> str:
        return f"Cause({self.name!r}, {self.kind!r})"


# Order matters: the first cause whose marker appears wins (a specific reason before a
# general one), and every refusal is tried before any transient cause.
# The wording when the certificate could not be looked at (``diagnose`` words the rest).
CAUSES = (
    Cause(
        "hostname",
        REFUSAL,
        ("does not match host name",),
        "the server's certificate is not valid for the host name connected to (the wrong "
        "name in HOST, or a machine in the middle).",
        "set HOST to a name listed on the certificate; to reach it by IP, keep the "
        "name in HOST and put the IP in OPTIONS['hostaddr'].",
    ),
    Cause(
        "untrusted",
        REFUSAL,
        ("certificate verify failed",),
        "the server's certificate is not trusted: expired or not yet valid, self-signed, or "
        "issued by a CA that is not in the root certificate file.",
        "set OPTIONS['sslrootcert'] to the CA bundle of the CA that issued it, or have it "
        "renewed if it expired.",
    ),
    Cause(
        "no_tls",
        REFUSAL,
        ("server does not support ssl",),
        "the server does not offer TLS.",
        "enable TLS where the connection ends: PostgreSQL needs ssl = on with ssl_cert_file "
        "and ssl_key_file (postgresql.conf); PgBouncer needs client_tls_sslmode = require "
        "with client_tls_cert_file and client_tls_key_file (pgbouncer.ini; its default is "
        "disable). This backend never falls back to plaintext.",
    ),
    Cause(
        "root_file",
        REFUSAL,
        ("root certificate file",),
        "libpq could not use the root certificate file.",
        "point OPTIONS['sslrootcert'] at a readable PEM CA bundle.",
    ),
    Cause(
        # libpq 17+, sslnegotiation=direct: "...established without ALPN protocol negotiation
        # extension" or "...with unexpected ALPN protocol"
        "alpn",
        REFUSAL,
        ("alpn",),
        "direct TLS negotiation did not select ALPN 'postgresql': the peer is not known "
        "to be a PostgreSQL server (cross-protocol attacks).",
        "connect to a PostgreSQL 17+ server (or a proxy that negotiates ALPN 'postgresql'), "
        "or set OPTIONS['sslnegotiation'] = 'postgres' (the SSLRequest first).",
    ),
    Cause(
        # libpq: 'could not load private key file "...": bad decrypt' (OpenSSL 3, PKCS#8 and
        # traditional PEM alike); OpenSSL 1.1 words it "bad password read". Never the password.
        "client_key_password",
        REFUSAL,
        ("bad decrypt", "bad password read"),
        "libpq could not decrypt the client certificate's private key (OPTIONS['sslkey']): "
        "OPTIONS['sslpassword'] is not its passphrase.",
        "set OPTIONS['sslpassword'] to the passphrase the key was encrypted with (it is never "
        "shown), or use an unencrypted key file with mode 0600.",
    ),
    Cause(
        # libpq: "could not load private key file ...: processing error" (encrypted, no
        # sslpassword), "...: key values mismatch", "certificate present, but not private key
        # file ...", "private key file ... has group or world access" (E018 checks it first).
        "client_key",
        REFUSAL,
        ("private key file",),
        "libpq could not use the client certificate's private key (OPTIONS['sslkey']): missing, "
        "encrypted without OPTIONS['sslpassword'], readable by others, or not the key of "
        "OPTIONS['sslcert'].",
        "point OPTIONS['sslkey'] at the private key of OPTIONS['sslcert'] (mode 0600), with "
        "OPTIONS['sslpassword'] if it is encrypted.",
    ),
    Cause(
        "client_certificate",
        REFUSAL,
        (
            "alert unknown ca",
            "certificate required",
            "alert bad certificate",
            "certificate unknown",
            # the server's pg_hba.conf (clientcert=verify-ca/verify-full), after the handshake
            "requires a valid client certificate",
        ),
        "the server refused this client's certificate, or demands one and none was sent.",
        "check OPTIONS['sslcert'] and OPTIONS['sslkey'] (a certificate issued by the CA in "
        "the server's ssl_ca_file, for this USER; libpq sends none when OPTIONS['sslcert'] "
        "does not exist).",
    ),
    Cause(
        "protocol",
        REFUSAL,
        (
            "unsupported protocol",
            "no protocols available",
            "alert protocol version",
            "wrong version number",
            "handshake failure",
            "no shared cipher",
            "no ciphers available",
            "insufficient security",
            "version too low",
        ),
        "the TLS handshake failed: the server offers no protocol version or cipher this "
        "backend accepts.",
        "check the server's TLS configuration (protocol versions and ciphers) against this "
        "backend's minimum; with OPTIONS['sslnegotiation'] = 'direct' the server must be "
        "PostgreSQL 17 or newer.",
    ),
    # -- transient: nothing verified, nothing sent; the same attempt can work a moment later
    Cause(
        "starting",
        TRANSIENT,
        (
            "the database system is starting up",
            "not yet accepting connections",
            "is in recovery mode",
            "the database system is shutting down",
            "terminating connection due to administrator command",
        ),
    ),
    Cause(
        "too_many",
        TRANSIENT,
        (
            "too many clients",
            "remaining connection slots",
            "too many connections",
            "no more connections allowed",
        ),
    ),
    Cause(
        # target_session_attrs=read-write during a failover: the standby is not promoted yet
        "standby",
        TRANSIENT,
        ("in hot standby mode", "session is read-only", "server is in read-only mode"),
    ),
    Cause("timeout", TRANSIENT, ("timeout expired", "timed out")),
    Cause("refused", TRANSIENT, ("connection refused",)),
    Cause(
        "closed",
        TRANSIENT,
        (
            "server closed the connection unexpectedly",
            "ssl connection has been closed unexpectedly",
            "connection reset",
            "broken pipe",
            "unexpected eof",
            "eof detected",
            "ssl syscall error",
            "could not receive data from server",
            "could not send data to server",
            "could not send ssl negotiation packet",
            "could not send startup packet",
            "pgbouncer cannot connect to server",
            "server login has been failing",
        ),
    ),
    Cause(
        "network",
        TRANSIENT,
        ("no route to host", "network is unreachable", "temporary failure in name resolution"),
    ),
)
# Judged by the backend itself (``ConnectionFileError``): a file this process saw and that is
# gone now is being replaced (a deploy, a renewal), so retried; any other file problem, a
# path that never existed for example, is reported at once. And the policy's own refusals.
FILE_REPLACED = Cause("file", TRANSIENT, ())
FILE = Cause("file", REFUSAL, ())
POLICY = Cause("policy", REFUSAL, ())
# The server accepted the login and began a session: only its "not now" answers (which it
# can give after authentication, e.g. slots reserved for superusers) are worth another try.
_AFTER_LOGIN = frozenset({"starting", "too_many", "standby"})
_ATTEMPTS_HEADER = "multiple connection attempts failed"


def _cause_of(text: str) -> Cause | None:
    lowered = text.lower()
    for cause in CAUSES:
        if any(marker in lowered for marker in cause.markers):
            return cause
    return None


def _segments(text: str) -> list[str]:
    """One message per host tried (psycopg joins them when several hosts failed)."""
    head, sep, tail = text.lower().partition(_ATTEMPTS_HEADER)
    if not sep:
        return [text]
    return tail.split("\n- host:")[1:] or [head]


def classify(exc: BaseException) -> Cause | None:
    """The cause of a failed connection attempt, or None when it is not one we know."""
    if isinstance(exc, ConnectionFileError):
        return FILE_REPLACED if exc.replaced else FILE
    if isinstance(exc, InsecureConnectionError):  # already judged: the policy refused it
        return POLICY
    causes = [_cause_of(segment) for segment in _segments(str(exc))]
    refusals = [c for c in causes if c is not None and c.kind == REFUSAL]
    if refusals:
        return refusals[0]  # one host failing verification is a refusal, whatever the others did
    if not causes or None in causes:
        return None
    cause = causes[-1]
    assert cause is not None
    pgconn = getattr(exc, "pgconn", None)
    logged_in = getattr(pgconn, "backend_pid", 0) or getattr(pgconn, "server_version", 0)
    if logged_in and cause.name not in _AFTER_LOGIN:
        return None
    return cause


def _attempts(text: str) -> list[str]:
    """libpq's words per attempt, case kept (psycopg lists each attempt when several failed)."""
    at = text.lower().find(_ATTEMPTS_HEADER)
    if at < 0:
        return [text]
    return ["host:" + part for part in text[at:].split("\n- host:")[1:]] or [text]


PGBOUNCER_PORT = 6432  # PgBouncer's default listen_port


def explain(
    exc: BaseException,
    alias: str,
    host: str | None,
    secrets: object = None,
    *,
    decision: Any = None,  # policy.Decision: the hosts, the root of trust, the way in
    params: Mapping[str, Any] | None = None,  # the parameters the attempt was given
) -> InsecureConnectionError | None:
    """A refusal, as an error naming the alias, the host, what is wrong and the fix, then the
    details: the certificate the server presented (``diagnose``, only here, after libpq
    refused), hints for this setup, libpq's words.

    None for everything else: the caller raises the original exception, as stock does.
    """
    if isinstance(exc, InsecureConnectionError):
        return exc
    cause = classify(exc)
    if cause is None or cause.kind != REFUSAL:
        return None
    from .libpq import certificate_text  # libpq quotes certificate names (CN, SAN) as is

    text = str(exc)
    problem, fix, details = cause.problem, cause.fix, []
    found = _diagnosis(text, cause, decision, params)
    if found is not None:
        problem, fix = found.problem or problem, found.fix or fix
        details.extend(found.details)
    details += _hints(text, cause, decision, details)
    details.append(f"libpq said: {' '.join(text.split())}.")
    message = link_message(alias, host, problem, fix, details)
    # Each line escaped on its own: libpq's words and the certificate's names are the peer's
    # (a newline there is escaped), the line breaks between the details are this message's.
    safe = "\n".join(certificate_text(line) for line in redact(message, secrets).split("\n"))
    return InsecureConnectionError(safe, alias=alias, host=host, cause=cause.name)


def _diagnosis(text: str, cause: Cause, decision: Any, params: Mapping[str, Any] | None) -> Any:
    """What the certificate says (a ``diagnose.Diagnosis``), or None when there is nothing to
    look at; never an error: the refusal is raised whatever happens here."""
    if cause.name not in ("untrusted", "hostname") or decision is None:
        return None
    segment = next((s for s in _attempts(text) if _cause_of(s) is cause), text)
    try:
        from . import diagnose  # only after a refusal: never on the success path

        return diagnose.diagnose(segment, cause.name, decision, params or {})
    except Exception as exc:  # a bug in the diagnosis must not hide the refusal
        import logging  # only when the diagnosis itself failed

        logging.getLogger("secure_pg_backend").debug("diagnosing the refusal failed: %r", exc)
        return None


def _hints(text: str, cause: Cause, decision: Any, details: Sequence[str]) -> list[str]:
    """What this setup adds to a cause's fix: where a relative root file resolved; a
    PgBouncer on its default port."""
    hints = []
    root = getattr(decision, "root_cert", "") or ""
    if cause.name in ("untrusted", "root_file", "hostname") and not any(
        "relative path" in line for line in details
    ):
        note = relative_note(root)
        if note:
            hints.append(f"The root certificate file{note}")
    if cause.name == "no_tls" and f"port {PGBOUNCER_PORT} " in text.replace("failed", " "):
        hints.append(
            f"Port {PGBOUNCER_PORT} is PgBouncer's default: if that is what listens there, "
            "the fix is in pgbouncer.ini (client_tls_sslmode, client_tls_cert_file, "
            "client_tls_key_file), not in postgresql.conf."
        )
    return hints

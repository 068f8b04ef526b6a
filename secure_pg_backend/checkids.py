"""Every check id in one table: what it means, how to fix it, and the rule that reports it.

The gate, the system checks, ``dbshell`` and the online checks report under these ids
and nowhere else define one: ``Violation`` looks its id up here (an unknown id is a
``KeyError`` in the code that made it, not a silent new id) and takes the fix from here
unless the fix names specifics of the settings at fault (which key, which value).
``docs/checks.md`` shows ``markdown_table()`` verbatim (``tests/test_checkids.py`` keeps them
equal).

Plain strings and one slotted class: this module is imported by every process that connects.
"""

from __future__ import annotations

__all__ = ["CHECKS", "HOST_FIX", "ROOT_FIX", "CheckId", "check_id", "markdown_table"]

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
        "inputs.screen",
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
        "inputs.screen",
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
        "gate.judge",
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

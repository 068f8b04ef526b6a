"""Every check id in one table (``CHECKS``): what it means, how to fix it and the rule that
reports it. The gate, the system checks, ``dbshell`` and the online checks report under these
ids and nowhere else define one: ``errors.Violation`` looks its id up here (an unknown id is a
``KeyError`` in the code that made it, not a silent new id) and takes the fix from here unless
the fix names specifics of the settings at fault. ``docs/checks.md`` shows ``markdown_table()``
verbatim (``tests/unit/test_checkids.py`` keeps them equal).
"""

from __future__ import annotations

__all__ = [
    "CHECKS",
    "ERROR",
    "EXPLAIN",
    "HOST_FIX",
    "PREFIX",
    "ROOT_FIX",
    "WARNING",
    "CheckId",
    "check_id",
    "explain_command",
    "markdown_table",
]

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
        "policy.rules.e001_sslmode",
        '`OPTIONS["sslmode"]` is anything but `"verify-full"` (`disable`, `allow`, `prefer`, '
        "`require`, `verify-ca`, other spellings)",
        "remove it; this backend always uses 'verify-full'.",
    ),
    CheckId(
        "E002",
        "policy.rules.e002_gssencmode",
        '`OPTIONS["gssencmode"]` is not `"disable"`: with Kerberos credentials libpq would '
        "encrypt with GSSAPI instead of TLS",
        "remove it; this backend always sends 'disable'.",
    ),
    CheckId(
        "E003",
        "policy.rules.e003_protocol",
        "`ssl_min_protocol_version` below `TLSv1.2` (or not a TLS version), or "
        "`ssl_max_protocol_version` below the minimum",
        "remove them (default minimum 'TLSv1.2') or set 'TLSv1.3'.",
    ),
    CheckId(
        "E004",
        "policy.rules.e004_socket",
        "`HOST` is empty, a socket directory or an `@abstract` socket: libpq ignores "
        "`sslmode` on Unix sockets",
        f"{HOST_FIX}, or, for a server on this machine, opt in with "
        "OPTIONS['allow_unix_socket'] = True.",
    ),
    CheckId(
        "E005",
        "files.check_files",
        "no root of trust: no `sslrootcert`, no `PGSSLROOTCERT`, no `~/.postgresql/root.crt`",
        ROOT_FIX,
    ),
    CheckId(
        "E006",
        "policy.rules.e006_root_cert",
        "the root certificate is missing, a directory, unreadable or not a string, or "
        '`"system"` could not be resolved (e.g. `SSL_CERT_FILE` names a missing file)',
        ROOT_FIX + " For 'system': install ca-certificates or fix SSL_CERT_FILE.",
    ),
    CheckId(
        "E007",
        "policy.rules.e007_weakening",
        '`OPTIONS["requiressl"]` (sslmode\'s deprecated ancestor) or `OPTIONS["sslkeylogfile"]` '
        "(writes the TLS session keys to a file) is set",
        "remove it; this backend sets the TLS parameters itself.",
    ),
    CheckId(
        "E008",
        "policy.rules.e008_opt_ins",
        "`allow_unix_socket`, `allow_legacy_ciphers` or `allow_local_proxy` is not exactly "
        "`True`/`False`",
        "set it to True to opt in, or remove it.",
    ),
    CheckId(
        "E009",
        "policy.screening.screen",
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
        "policy.screening.screen",
        "a value contains a control character such as NUL: libpq reads values as C strings, so "
        "everything after it, the forced TLS settings included, would be cut off; or a libpq "
        "keyword has several values (a repeated `DATABASE_URL` query key)",
        "remove the character, or give the keyword one value (a PASSWORD value is never echoed).",
    ),
    CheckId(
        "E012",
        "policy.rules.e012_host_lists",
        "`hostaddr` lists more addresses than `HOST` lists names, or an address has no host "
        "name: verify-full checks the certificate against the name",
        f"{HOST_FIX}; to reach it by IP, keep the name in HOST and put the IP in "
        "OPTIONS['hostaddr'], one for each host.",
    ),
    CheckId(
        "E013",
        "policy.gate.judge",
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
        "policy.providers.provider_violation",
        '`OPTIONS["password_provider"]` cannot be used: a string that is neither the built-in '
        "provider nor listed in `SECURE_PG_BACKEND_PASSWORD_PROVIDERS` (a `DATABASE_URL` must "
        "not make the process import code; nothing is imported), an allowed path that does "
        "not import, not callable, or `PASSWORD` is set as well",
        "set it to a function (alias, settings_dict) -> password in settings (or list its "
        "dotted path in SECURE_PG_BACKEND_PASSWORD_PROVIDERS), and remove PASSWORD.",
    ),
    CheckId(
        "E016",
        "files.check_files",
        "a file libpq would open (client certificate or key, CRL file or directory, passfile, "
        "service file, explicit or libpq's default under `~/.postgresql`; the default "
        "`~/.pgpass` only when no password is given, since libpq reads it only then) is a "
        "FIFO, device, socket or the wrong kind: libpq would block on it while holding the GIL",
        "point the setting at a regular file (a directory for sslcrldir), or remove what is "
        "at that path.",
    ),
    CheckId(
        "E017",
        "policy.rules.e017_connect_retry",
        '`OPTIONS["connect_retry"]` is not a number of seconds from 0 to 3600',
        "set it to a number of seconds from 0 (no retries) to 3600, or remove it (default 5).",
    ),
    CheckId(
        "E018",
        "files.check_files",
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
        "policy.rules.e019_local_proxy",
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


EXPLAIN = "python -m secure_pg_backend explain"


def explain_command(name: str) -> str:
    """How a message names its explanation: ``python -m secure_pg_backend explain E010``."""
    return f"{EXPLAIN} {name}"

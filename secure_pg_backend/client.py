"""``manage.py dbshell``: psql gets exactly the parameters the gate judged, and the password
reaches only the judged server.

psql receives one connection string (every security-relevant value explicit, the
policy forced) and no secret on its command line (``ps`` shows it to every local user).
The password goes into a private passfile (``PGPASSFILE``) whose one entry is bound to the
judged host, port, database and user, not into ``PGPASSWORD``: libpq would hand
``PGPASSWORD`` to any server, including one a ``\\connect`` in a psqlrc or a ``-c`` names.
Other secrets libpq knows (sslpassword, libpq 18's oauth_client_secret) go into a private
service file the same way. Both are anonymous files psql inherits and opens as
``/dev/fd/N`` (nothing on disk; a private 0600 file in a 0700 directory where ``/dev/fd``
cannot do it), and psql does not outlive ``manage.py dbshell`` (``StopTogether``). psql
arguments that would change the target (``-h``, ``-p``, ``-U``, ``-d``, a database
argument) are refused: the target is the settings'.

Django's own argument building (-U, -h, -p, a database argument) is not used: with NAME
empty or None it would leave the policy as an extra argument psql ignores.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connections
from django.db.backends.postgresql import client as postgresql

from . import certificates, libpq
from .compat import NEWER_KEYWORDS
from .errors import location, redact, secret_values
from .policy import control_character

__all__ = [
    "DatabaseClient",
    "PsqlCommand",
    "PsqlSession",
    "private_files",
    "psql_command",
    "psql_major_version",
    "psql_session",
    "target_arguments",
]

if TYPE_CHECKING:
    from .base import VerifiedTLSMixin

# Keywords psql's own libpq (often older than psycopg's) may not know. Leaving them out
# is safe: an older libpq has no key log to turn off, and the default negotiation is the
# other way to the same verified TLS. Any other keyword it lacks stays, and psql says so.
_SAFE_TO_DROP = ("sslkeylogfile", "sslnegotiation")
_VERSION = r"\b(\d+)(?:\.\d+)?"  # compiled on first use: only dbshell needs it

# A password libpq would send to any server psql connects to: never inherited. (Our
# passfile and service file, where we write one, replace the user's for this run.)
_NOT_INHERITED = "PGPASSWORD"
_SERVICE = "secure_pg_backend_dbshell"

# psql's options that take a value (psql 13-18, short and long); needed to tell an
# option's value from a database or user argument.
_SHORT_WITH_VALUE = frozenset("cdfFhLoPpRTUv")
_LONG_WITH_VALUE = frozenset(
    {
        "command",
        "dbname",
        "file",
        "field-separator",
        "host",
        "log-file",
        "output",
        "port",
        "pset",
        "record-separator",
        "table-attr",
        "username",
        "set",
        "variable",
    }
)
_LONG_FLAGS = frozenset(
    {
        "echo-all",
        "no-align",
        "echo-errors",
        "echo-queries",
        "echo-hidden",
        "html",
        "list",
        "no-readline",
        "single-transaction",
        "quiet",
        "single-step",
        "single-line",
        "tuples-only",
        "version",
        "no-password",
        "password",
        "expanded",
        "no-psqlrc",
        "field-separator-zero",
        "record-separator-zero",
        "csv",
        "help",
    }
)
# Options that choose the server, database or user: the settings' job, judged by the gate.
_TARGET_SHORT = frozenset("dhpU")
_TARGET_LONG = frozenset({"dbname", "host", "port", "username"})


@functools.lru_cache(maxsize=4)
def psql_major_version(executable: str) -> int | None:
    """The major version psql reports (a lower bound for the libpq it runs on).

    Through Popen, not subprocess.run: runshell runs only psql itself that way, under
    the ignored SIGINT (Django's own dbshell test checks every subprocess.run call).
    """
    try:
        with subprocess.Popen(
            [executable, "--version"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        ) as process:
            out, _ = process.communicate(timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(_VERSION, out or "")
    return int(match.group(1)) if match else None


def _for_psql(params: dict[str, str], executable: str) -> dict[str, str]:
    major = psql_major_version(executable) or 0
    return {
        k: v
        for k, v in params.items()
        if k not in _SAFE_TO_DROP or NEWER_KEYWORDS[k] // 10000 <= major
    }


def _wrapper_for(settings_dict: Mapping[str, Any]) -> VerifiedTLSMixin:
    # Django hands the client the very dict stored in DATABASES; find its alias.
    for alias in connections:
        if connections.settings[alias] is settings_dict:
            return connections[alias]  # type: ignore[return-value]
    from .aliases import standalone_wrapper

    return standalone_wrapper("dbshell", settings_dict)  # type: ignore[no-any-return]


# -- psql's arguments ---------------------------------------------------------------------


def _long_option(name: str) -> str | None:
    """The psql long option ``name`` stands for (getopt accepts unique prefixes), or None."""
    known = _LONG_WITH_VALUE | _LONG_FLAGS
    if name in known:
        return name
    matches = [option for option in known if option.startswith(name)]
    return matches[0] if len(matches) == 1 else None


_POSITIONAL = "a database or user argument"


def target_arguments(parameters: Sequence[str]) -> list[str]:
    """The psql options (``-d``, ``--host``, ...) that would choose another server,
    database or user; a database or user name argument counts as one too.

    Parsed as psql's getopt does: combined short flags (``-Atc``), a value attached
    (``-dfoo``) or separate, long options by unique prefix (``--ho``), ``--`` ending
    the options; every argument that is not an option's value is a database or user
    name. An ambiguous or unknown long option is psql's own error, but counts here
    when it could be a target option (``--h`` may be ``--host``).
    """
    found: list[str] = []
    args = list(parameters)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            found.extend(_POSITIONAL for _ in args[i:])
            break
        if arg.startswith("--"):
            name, has_value, _ = arg[2:].partition("=")
            option = _long_option(name)
            if option is None:
                if any(target.startswith(name) for target in _TARGET_LONG):
                    found.append(f"--{name}")
                continue
            if option in _TARGET_LONG:
                found.append(f"--{option}")
            if option in _LONG_WITH_VALUE and not has_value:
                i += 1  # its value is the next argument
            continue
        if arg.startswith("-") and arg != "-":
            for position, flag in enumerate(arg[1:], start=1):
                if flag in _TARGET_SHORT:
                    found.append(f"-{flag}")
                if flag in _SHORT_WITH_VALUE:
                    if position == len(arg) - 1:
                        i += 1  # the value is the next argument
                    break
            continue
        found.append(_POSITIONAL)  # a database name, conninfo or user name
    return found


def _refuse_target_arguments(alias: str, host: str | None, parameters: Sequence[str]) -> None:
    found = target_arguments(parameters)
    if found:
        from django.core.management.base import CommandError  # dbshell only

        # Named by option only: a value may be a conninfo with a password in it.
        shown = ", ".join(dict.fromkeys(found))
        raise CommandError(
            f"secure_pg_backend refused dbshell for {location(alias, host)}: the psql "
            f"argument(s) {shown} would connect psql to a server, database or user other "
            "than the one the TLS policy judged, and hand it the password. Fix: change "
            "HOST, PORT, NAME or USER (or OPTIONS) in the settings, or pick another alias "
            "with --database; other psql options (-c, -f, -A, -v, ...) keep working."
        )


# -- the command and its private files ----------------------------------------------------


class PsqlCommand:
    """What one psql run needs: argv, environment additions, and the secrets to place."""

    __slots__ = ("alias", "argv", "environment", "host", "password", "secrets", "target")

    def __init__(
        self,
        alias: str,
        host: str | None,
        argv: list[str],
        environment: dict[str, str],
        password: str | None,
        secrets: dict[str, str],
        target: tuple[str, str, str, str],
    ) -> None:
        self.alias, self.host = alias, host
        self.argv = argv
        self.environment = environment  # no secret in here
        self.password = password
        self.secrets = secrets  # other secret keywords (sslpassword, ...)
        self.target = target  # host, port, dbname, user: what the passfile entry matches

    def __repr__(self) -> str:  # never the secrets
        return f"PsqlCommand({self.argv!r})"


def psql_command(
    wrapper: VerifiedTLSMixin, parameters: Iterable[str], executable: str = "psql"
) -> PsqlCommand:
    """psql's argv and environment under the policy; raises when refused."""
    parameters = list(parameters)
    verdict = wrapper.policy_verdict()
    verdict.raise_if_refused(secret_values(wrapper.settings_dict))
    assert verdict.decision is not None and verdict.params is not None
    _refuse_target_arguments(wrapper.alias, verdict.host, parameters)
    keywords, hidden = libpq.keywords(), libpq.secret_keywords()
    params = {k: str(v) for k, v in verdict.params.items() if k in keywords}
    secrets = {k: params.pop(k) for k in sorted(hidden) if k in params}
    password = secrets.pop("password", None)
    # OPTIONS['password_provider'], asked only now that the policy has passed. The user it
    # returns, if any, is psql's and the passfile entry's (bound to it below).
    from .provider import credentials_for  # dbshell only: not on every process's start-up

    answer = credentials_for(wrapper.alias, wrapper.settings_dict)
    if answer is not None:
        password = answer.password
        if answer.user is not None:
            params["user"] = answer.user
    if password is not None:  # our passfile (PGPASSFILE) holds it; libpq's resolved
        params.pop("passfile", None)  # default path would outrank the variable
    if secrets:  # they travel in our private service file, named here
        params["service"] = params.get("service") or os.environ.get("PGSERVICE") or _SERVICE
    variables = libpq.keyword_variables()
    env = {variables[k]: v for k, v in verdict.decision.forced.items() if k in variables}
    user = params.get("user", "")
    target = (
        params.get("host", ""),
        params.get("port", "") or "5432",
        params.get("dbname", "") or user,
        user,
    )
    argv = [executable, libpq.conninfo(_for_psql(params, executable)), *parameters]
    return PsqlCommand(wrapper.alias, verdict.host, argv, env, password, secrets, target)


def _escaped(value: str) -> str:
    # pgpass: backslash escapes ':' and '\'; '*' alone is a wildcard, escaped it is a '*'.
    return re.sub(r"([\\:*])", r"\\\1", value)


def _passfile_lines(command: PsqlCommand) -> list[str]:
    host, port, dbname, user = command.target
    assert command.password is not None
    # libpq matches a socket directory that is its compiled default as "localhost".
    hosts = [host, "localhost"] if host.startswith("/") else [host]
    fields = (port, dbname, user, command.password)
    return [":".join(_escaped(value) for value in (name, *fields)) for name in hosts]


def _unwritable(command: PsqlCommand) -> str | None:
    values = [*command.target, command.password or "", *command.secrets.values()]
    for value in values:
        if control_character(value) is not None:
            return "a control character"  # a newline would start a second entry
    return None


# -- handing psql its secrets: nothing on disk -----------------------------------------------
# The passfile and the service file are anonymous files (memfd_create, else a temporary file
# unlinked before anything is written to it) that psql inherits and libpq opens by name as
# /dev/fd/N. They die with the last process holding them: a SIGKILL of manage.py dbshell,
# of psql or of both leaves no file anywhere. Where /dev/fd cannot carry them (it must reopen
# the file from its start each time, as Linux's /proc does; BSD and macOS share the offset
# instead), they go into a private directory, removed when psql exits, on SIGTERM and SIGHUP
# too (``StopTogether``), and swept by the next dbshell if this process was killed outright.


class PsqlSession(tuple[list[str], dict[str, str]]):
    """One psql run: ``(argv, env)`` as before (its complete environment), and ``pass_fds``,
    the descriptors psql must inherit (``subprocess``'s ``pass_fds``) for the ``/dev/fd/N``
    paths in that environment. This process can read those paths itself."""

    pass_fds: tuple[int, ...]

    def __new__(
        cls, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...]
    ) -> PsqlSession:
        session = super().__new__(cls, (argv, env))
        session.pass_fds = pass_fds
        return session

    @property
    def argv(self) -> list[str]:
        return self[0]

    @property
    def env(self) -> dict[str, str]:
        return self[1]


@contextlib.contextmanager
def private_files(command: PsqlCommand) -> Iterator[tuple[dict[str, str], tuple[int, ...]]]:
    """(environment, descriptors) psql runs with: this process's environment without
    ``PGPASSWORD``, plus the policy's variables and our private passfile and service file
    (closed, or removed, afterwards)."""
    env = {k: v for k, v in os.environ.items() if k != _NOT_INHERITED}
    env.update(command.environment)
    from .psql_child import handed_over, sweep_stale_directories  # dbshell only

    sweep_stale_directories()
    if command.password is None and not command.secrets:
        yield env, ()  # the user's own passfile (~/.pgpass, PGPASSFILE) works as in stock
        return
    from django.core.management.base import CommandError  # dbshell only

    if _unwritable(command) is not None:
        raise CommandError(
            f"secure_pg_backend refused dbshell for {location(command.alias, command.host)}: "
            "the password, another secret or the host, port, database or user contains a "
            "control character, which psql's password file cannot hold. Fix: remove it."
        )
    files: dict[str, tuple[str, str]] = {}  # variable: (file name in a directory, text)
    if command.password is not None:
        files["PGPASSFILE"] = ("pgpass", "\n".join(_passfile_lines(command)) + "\n")
    if command.secrets:
        name = libpq.parse(command.argv[1]).get("service", _SERVICE)
        body = "".join(f"{k}={v}\n" for k, v in command.secrets.items())
        files["PGSERVICEFILE"] = ("pg_service.conf", f"[{name}]\n{body}")
    with handed_over(files) as (variables, descriptors):
        env.update(variables)
        yield env, descriptors


@contextlib.contextmanager
def psql_session(
    wrapper: VerifiedTLSMixin, parameters: Iterable[str], executable: str = "psql"
) -> Iterator[PsqlSession]:
    """One psql run (argv, complete environment, descriptors to pass on); its private files
    live until the block exits. Start psql with ``pass_fds=session.pass_fds``."""
    command = psql_command(wrapper, parameters, executable)
    with private_files(command) as (env, descriptors):
        yield PsqlSession(command.argv, env, descriptors)


def _explain_failure(wrapper: VerifiedTLSMixin, returncode: int, shown: list[str]) -> Exception:
    """psql exited non-zero. For a connection failure (psql's exit status 2), open a
    connection the backend's way to say why in its words; never show the conninfo."""
    where = location(wrapper.alias, wrapper.settings_dict.get("HOST") or None)
    if returncode == 2:
        try:
            with wrapper.temporary_connection():
                pass
        except DatabaseError as exc:
            from django.core.management.base import CommandError

            reason = " ".join(redact(str(exc), secret_values(wrapper.settings_dict)).split())
            reason = certificates.certificate_text(reason)  # libpq may quote a certificate's names
            return CommandError(
                f"psql could not connect for {where}. {reason}", returncode=returncode
            )
    return subprocess.CalledProcessError(returncode, shown)


class DatabaseClient(postgresql.DatabaseClient):
    connection: VerifiedTLSMixin

    def runshell(self, parameters: Iterable[str]) -> None:
        from .psql_child import StopTogether  # dbshell only: not on every process's start-up

        parameters = list(parameters)
        # psql_command probes psql's version (cached) before run() ignores SIGINT.
        with (
            StopTogether() as stop,
            psql_session(self.connection, parameters, self.executable_name) as session,
        ):
            returncode = stop.run(session)
        if returncode:
            # Django's dbshell prints the command: psql and the user's own arguments only.
            shown = [self.executable_name, *parameters]
            raise _explain_failure(self.connection, returncode, shown)

    @classmethod
    def settings_to_cmd_args_env(
        cls, settings_dict: dict[str, Any], parameters: Iterable[str]
    ) -> tuple[list[str], dict[str, str] | None]:
        """psql's argv and the policy's variables, without the password.

        The password is only ever handed over by ``runshell`` (or ``psql_session``),
        through a passfile that lives as long as psql; this API has no way to remove it.
        """
        command = psql_command(_wrapper_for(settings_dict), parameters, cls.executable_name)
        return command.argv, command.environment

"""``manage.py dbshell``: psql gets exactly the parameters the gate judged.

psql receives one connection string (every security-relevant value explicit, the
policy forced) and the password in PGPASSWORD, never on its command line. Django's
own argument building (-U, -h, -p, a database argument) is not used: with NAME empty
or None it would leave the policy as an extra argument psql ignores.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from django.db import connections
from django.db.backends.postgresql import client as postgresql

from . import credentials, libpq
from .compat import NEWER_KEYWORDS

if TYPE_CHECKING:
    from .base import VerifiedTLSMixin

# Secrets psql must not see on its command line (ps would show them).
_SECRET_KEYWORDS = ("password", "sslpassword")

# Keywords psql's own libpq (often older than psycopg's) may not know. Leaving them out
# is safe: an older libpq has no key log to turn off, and the default negotiation is the
# other way to the same verified TLS. Any other keyword it lacks stays, and psql says so.
_SAFE_TO_DROP = ("sslkeylogfile", "sslnegotiation")
_VERSION = r"\b(\d+)(?:\.\d+)?"  # compiled on first use: only dbshell needs it


@functools.lru_cache(maxsize=4)
def psql_major_version(executable: str) -> int | None:
    """The major version psql reports (a lower bound for the libpq it runs on)."""
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(_VERSION, out)
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
    from .base import standalone_wrapper

    return standalone_wrapper("dbshell", settings_dict)  # type: ignore[no-any-return]


def psql_command(
    wrapper: VerifiedTLSMixin, parameters: Iterable[str], executable: str = "psql"
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) for psql under the policy; raises when refused."""
    verdict = wrapper.policy_verdict()
    verdict.raise_if_refused(wrapper.settings_dict.get("PASSWORD"))
    assert verdict.decision is not None and verdict.params is not None
    keywords = libpq.keywords()
    params = {k: str(v) for k, v in verdict.params.items() if k in keywords}
    password = params.pop("password", None)
    # OPTIONS['password_provider'], asked only now that the policy has passed.
    password = credentials.password_for(wrapper.alias, wrapper.settings_dict) or password
    for secret in _SECRET_KEYWORDS:
        params.pop(secret, None)
    variables = libpq.keyword_variables()
    env = {variables[k]: v for k, v in verdict.decision.forced.items() if k in variables}
    if password:
        env["PGPASSWORD"] = password
    return [executable, libpq.conninfo(_for_psql(params, executable)), *parameters], env


class DatabaseClient(postgresql.DatabaseClient):
    connection: VerifiedTLSMixin

    def runshell(self, parameters: Iterable[str]) -> None:
        args, env = psql_command(self.connection, parameters, self.executable_name)
        sigint_handler = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C aborts psql's query
            subprocess.run(args, env={**os.environ, **env}, check=True)
        finally:
            signal.signal(signal.SIGINT, sigint_handler)

    @classmethod
    def settings_to_cmd_args_env(
        cls, settings_dict: dict[str, Any], parameters: Iterable[str]
    ) -> tuple[list[str], dict[str, str] | None]:
        return psql_command(_wrapper_for(settings_dict), parameters, cls.executable_name)

"""``manage.py dbshell``: psql under the same policy as every other connection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.db import connections
from django.db.backends.postgresql import client as postgresql

from . import policy

# Pass-through libpq keywords that psql only learns from the environment.
_PASSTHROUGH_ENV = {
    "hostaddr": "PGHOSTADDR",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "channel_binding": "PGCHANNELBINDING",
    "require_auth": "PGREQUIREAUTH",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}


def _alias_of(settings_dict: Mapping[str, Any]) -> str:
    # Django hands the client the very dict stored in DATABASES; find its name.
    for alias in connections:
        if connections.settings[alias] is settings_dict:
            return alias
    return "?"


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class DatabaseClient(postgresql.DatabaseClient):
    def runshell(self, parameters: Iterable[str]) -> None:
        # Refuse with the real alias name before psql starts.
        policy.enforce(self.connection.alias, self.connection.settings_dict)
        super().runshell(parameters)

    @classmethod
    def settings_to_cmd_args_env(
        cls, settings_dict: dict[str, Any], parameters: Iterable[str]
    ) -> tuple[list[str], dict[str, str] | None]:
        decision = policy.enforce(_alias_of(settings_dict), settings_dict)
        args, env = super().settings_to_cmd_args_env(settings_dict, parameters)
        env = dict(env or {})
        options = settings_dict.get("OPTIONS") or {}
        for keyword, variable in _PASSTHROUGH_ENV.items():
            if options.get(keyword) is not None:
                env[variable] = str(options[keyword])
        env.update(policy.libpq_environment(decision))
        # A pg_service.conf entry outranks environment variables in libpq, so the
        # policy also goes into the connection string, which outranks both.
        forced = " ".join(f"{k}={_conninfo_value(v)}" for k, v in decision.forced.items())
        dbname = settings_dict.get("NAME") or ""
        service = options.get("service")
        if dbname and args and args[-1] == dbname:
            args[-1] = f"dbname={_conninfo_value(dbname)} {forced}"
        elif service:
            args.append(f"service={_conninfo_value(str(service))} {forced}")
        else:
            args.append(f"dbname=postgres {forced}")
        return args, env

"""``manage.py dbshell`` runs psql under the same policy as every other connection."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from secure_pg_backend import libpq
from secure_pg_backend.client import DatabaseClient, psql_major_version
from secure_pg_backend.testing import APP_PASSWORD, TLSPostgres

from .conftest import assert_no_secret

SSL_QUERY = "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"


def test_psql_gets_the_judged_parameters_in_one_conninfo(good_server: TLSPostgres) -> None:
    settings = good_server.database_settings(options={"sslnegotiation": "postgres"})
    args, env = DatabaseClient.settings_to_cmd_args_env(settings, ["-c", "select 1"])
    assert env is not None
    assert env["PGSSLMODE"] == "verify-full"
    assert env["PGGSSENCMODE"] == "disable"
    assert env["PGSSLROOTCERT"] == good_server.root_cert
    assert env["PGPASSWORD"] == APP_PASSWORD
    assert args[0] == "psql" and args[2:] == ["-c", "select 1"]  # one conninfo, then extras
    conninfo = libpq.parse(args[1])  # read back by libpq's own parser
    assert conninfo["dbname"] == "app" and conninfo["host"] == "127.0.0.1"
    assert conninfo["port"] == str(good_server.port) and conninfo["user"] == "app"
    assert conninfo["sslmode"] == "verify-full" and conninfo["gssencmode"] == "disable"
    assert conninfo["sslrootcert"] == good_server.root_cert
    major = psql_major_version("psql") or 0
    # psql's libpq (Debian's 15 here) may predate these; an older libpq has neither.
    assert ("sslnegotiation" in conninfo) == (major >= 17)
    assert ("sslkeylogfile" in conninfo) == (major >= 18)
    assert "password" not in conninfo
    assert_no_secret(" ".join(args))  # the password travels only in the environment


def test_dbshell_refuses_weak_settings_naming_the_alias(
    good_server: TLSPostgres, make_wrapper: Any
) -> None:
    weak = make_wrapper(good_server.database_settings(options={"sslmode": "prefer"}), "weak")
    with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['weak'\].*prefer"):
        weak.client.runshell([])


@pytest.mark.django_db
def test_real_psql_connects_with_verified_tls(capfd: pytest.CaptureFixture[str]) -> None:
    call_command("dbshell", "--", "-At", "-c", SSL_QUERY)
    out, err = capfd.readouterr()
    assert out.strip().startswith("t|TLSv1."), (out, err)
    assert_no_secret(out, err)


def _weak_service(tmp_path: Path, port: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PGSERVICE that would connect in plaintext: psql must not let it decide."""
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(
        f"[weak]\nhost=127.0.0.1\nport={port}\ndbname=postgres\nsslmode=disable\n"
        "gssencmode=prefer\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    monkeypatch.setenv("PGSERVICE", "weak")
    monkeypatch.setenv("PGSSLMODE", "disable")  # the service entry outranks this in libpq


def _psql(settings: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    args, env = DatabaseClient.settings_to_cmd_args_env(settings, ["-At", "-c", SSL_QUERY])
    assert_no_secret(" ".join(args))
    return subprocess.run(
        args, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    "shape",
    [
        {"NAME": "app"},
        {"NAME": None},
        {"NAME": None, "OPTIONS": {"dbname": "app"}},
        {"NAME": "app", "OPTIONS": {"dbname": "postgres"}},
        {"NAME": None, "OPTIONS": {"service": "weak"}},
        {"NAME": "", "OPTIONS": {"service": "weak"}},
        {"NAME": "", "OPTIONS": {"service": "weak", "dbname": "app"}},
    ],
    ids=[
        "name",
        "none",
        "none-dbname",
        "name-dbname",
        "none-service",
        "empty-service",
        "service-dbname",
    ],
)
def test_every_shape_of_name_and_options_hands_psql_the_policy(
    good_server: TLSPostgres,
    shape: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _weak_service(tmp_path, good_server.port, monkeypatch)
    settings = good_server.database_settings()
    options = {**settings["OPTIONS"], **shape.get("OPTIONS", {})}
    settings = {**settings, **shape, "OPTIONS": options}
    result = _psql(settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("t|TLSv1."), result.stdout
    assert_no_secret(result.stdout, result.stderr)


@pytest.mark.parametrize("shape", [{"NAME": ""}, {"NAME": "", "OPTIONS": {"dbname": "app"}}])
def test_shapes_django_refuses_never_start_psql(
    good_server: TLSPostgres, shape: dict[str, Any]
) -> None:
    settings = good_server.database_settings()
    settings = {**settings, **shape, "OPTIONS": {**settings["OPTIONS"], **shape.get("OPTIONS", {})}}
    with pytest.raises(ImproperlyConfigured, match="NAME or OPTIONS"):
        DatabaseClient.settings_to_cmd_args_env(settings, [])

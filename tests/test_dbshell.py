"""``manage.py dbshell`` runs psql under the same policy as every other connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection

from secure_pg_backend.client import DatabaseClient
from secure_pg_backend.testing import APP_PASSWORD, TLSPostgres

from .conftest import assert_no_secret

SSL_QUERY = "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"


def test_psql_gets_the_policy_in_env_and_conninfo(good_server: TLSPostgres) -> None:
    settings = good_server.database_settings(options={"sslnegotiation": "postgres"})
    args, env = DatabaseClient.settings_to_cmd_args_env(settings, [])
    assert env is not None
    assert env["PGSSLMODE"] == "verify-full"
    assert env["PGGSSENCMODE"] == "disable"
    assert env["PGSSLMINPROTOCOLVERSION"] == "TLSv1.2"
    assert env["PGSSLROOTCERT"] == good_server.root_cert
    assert env["PGSSLNEGOTIATION"] == "postgres"
    assert env["PGPASSWORD"] == APP_PASSWORD
    conninfo = args[-1]
    assert conninfo.startswith("dbname='app' ")
    for forced in ("sslmode='verify-full'", "gssencmode='disable'", "sslrootcert="):
        assert forced in conninfo
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


@pytest.mark.django_db
def test_real_psql_ignores_weakening_service_file_and_environment(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In libpq a service-file entry outranks environment variables, so a
    # PGSSLMODE-only client would be downgraded here; the conninfo outranks both.
    settings = connection.settings_dict
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(
        f"[weak]\nhost=127.0.0.1\nport={settings['PORT']}\ndbname={settings['NAME']}\n"
        "sslmode=disable\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    monkeypatch.setenv("PGSSLMODE", "disable")
    weak = {**settings, "OPTIONS": {**settings["OPTIONS"], "service": "weak"}}
    args, env = DatabaseClient.settings_to_cmd_args_env(weak, ["-At", "-c", SSL_QUERY])
    import os
    import subprocess

    result = subprocess.run(
        args, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("t|TLSv1.")

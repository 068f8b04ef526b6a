"""``manage.py dbtls`` against real TLS servers: output, JSON, exit status, no password."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from secure_pg_backend.testing import APP_PASSWORD, TLSPostgres
from tests.conftest import assert_no_secret, leaf_certificate

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> tuple[str, str, CommandError | None]:
    out, err = io.StringIO(), io.StringIO()
    error = None
    try:
        call_command("dbtls", *args, stdout=out, stderr=err)
    except CommandError as exc:
        error = exc
    assert_no_secret(out.getvalue(), err.getvalue(), str(error))
    return out.getvalue(), err.getvalue(), error


def test_human_line_shows_banner_host_trust_and_expiry(
    good_server: TLSPostgres, aliases: Callable[..., None]
) -> None:
    aliases(primary=good_server.database_settings(host="localhost"))
    out, err, error = run("--database", "primary")
    assert error is None and err == ""
    (line,) = out.splitlines()
    assert line.startswith("primary: SSL connection (protocol: TLSv1.3, cipher: TLS_")
    assert "compression: off" in line
    assert f"host localhost:{good_server.port} (127.0.0.1)" in line
    assert "database 'app'" in line
    assert f"root certificate {good_server.root_cert} (OPTIONS['sslrootcert'])" in line
    cert = leaf_certificate(good_server)
    assert f"server certificate {cert.subject.rfc4514_string()}" in line
    assert f"expires {cert.not_valid_after_utc:%Y-%m-%d}, in " in line
    # The command closes the connections it opened itself.
    assert connections["primary"].connection is None


def test_every_alias_using_the_engine_by_default(
    good_server: TLSPostgres, aliases: Callable[..., None]
) -> None:
    aliases(
        replica=good_server.database_settings(host="db.test", options={"hostaddr": "127.0.0.1"}),
        stock={**good_server.database_settings(), "ENGINE": "django.db.backends.postgresql"},
    )
    out, _, error = run()
    assert error is None
    names = [line.split(":", 1)[0] for line in out.splitlines()]
    assert names == ["default", "replica"]  # not "stock": another ENGINE
    assert "host db.test:" in out


def test_json_is_keyed_by_alias(good_server: TLSPostgres, aliases: Callable[..., None]) -> None:
    aliases(primary=good_server.database_settings())
    out, _, error = run("--database", "primary", "--json")
    assert error is None
    data = json.loads(out)
    assert list(data) == ["primary"]
    entry = data["primary"]
    assert entry["alias"] == "primary"
    assert entry["transport"] == "tls"
    assert entry["protocol"] == "TLSv1.3"
    assert entry["sslmode"] == "verify-full"
    assert entry["port"] == good_server.port
    cert = leaf_certificate(good_server)
    assert entry["peer_certificate"]["not_after"] == cert.not_valid_after_utc.isoformat()
    assert entry["peer_certificate"]["serial_number"] == format(cert.serial_number, "x")


def test_failing_alias_makes_the_exit_status_non_zero(
    good_server: TLSPostgres,
    mitm_server: TLSPostgres,
    expired_server: TLSPostgres,
    aliases: Callable[..., None],
) -> None:
    aliases(
        primary=good_server.database_settings(),
        intercepted=mitm_server.database_settings(),
        stale=expired_server.database_settings(),
    )
    selection = ("--database", "primary", "--database", "intercepted", "--database", "stale")
    out, err, error = run(*selection)
    assert error is not None and error.returncode == 1
    assert "2 of 3" in str(error)
    assert "intercepted (TLS refused), stale (TLS refused)" in str(error)
    assert out.startswith("primary: SSL connection")
    lines = err.splitlines()
    assert lines[0].startswith(
        "intercepted: FAILED (TLS refused): secure_pg_backend refused the connection for "
        "host '127.0.0.1': the server's certificate is issued by "
    )
    assert "DATABASES['intercepted']" not in err  # the line's label names the alias
    assert "Fix:" in lines[0]
    # The details below the first line, indented; then the next alias.
    details = lines[1 : lines.index(next(x for x in lines if x.startswith("stale:")))]
    assert details and all(x.startswith("  ") for x in details)
    assert "certificate verify failed" in details[-1]
    stale = next(x for x in lines if x.startswith("stale:"))
    assert stale.startswith("stale: FAILED (TLS refused):") and "expired on 2021-01-01" in stale


def test_json_reports_the_error_entry(
    mitm_server: TLSPostgres, good_server: TLSPostgres, aliases: Callable[..., None]
) -> None:
    aliases(primary=good_server.database_settings(), intercepted=mitm_server.database_settings())
    out, err, error = run("--json", "--database", "intercepted", "--database", "primary")
    assert error is not None
    data = json.loads(out)
    assert set(data) == {"intercepted", "primary"}
    assert "certificate verify failed" in data["intercepted"]["error"]
    assert data["primary"]["transport"] == "tls"
    assert err.startswith("intercepted: FAILED (TLS refused):")


def test_policy_refusal_is_reported_without_connecting(
    good_server: TLSPostgres, tcp_recorder: Any, aliases: Callable[..., None]
) -> None:
    weak = good_server.database_settings(options={"sslmode": "require"})
    weak["PORT"] = str(tcp_recorder.port)
    aliases(weak=weak)
    _, err, error = run("--database", "weak")
    assert error is not None and error.returncode == 1
    assert err.startswith(
        "weak: FAILED (settings refused): secure_pg_backend refused the database settings"
    )
    assert "OPTIONS['sslmode'] is 'require'" in err
    assert tcp_recorder.accepted == 0


def test_alias_not_using_the_engine_is_an_error(
    good_server: TLSPostgres, aliases: Callable[..., None]
) -> None:
    aliases(stock={**good_server.database_settings(), "ENGINE": "django.db.backends.postgresql"})
    _, _, error = run("--database", "stock")
    assert error is not None
    assert "'stock' does not use the secure_pg_backend ENGINE" in str(error)
    _, _, error = run("--database", "nosuch")
    assert error is not None and "'nosuch' is not in DATABASES" in str(error)


def test_an_open_connection_is_left_open(aliases: Callable[..., None]) -> None:
    aliases()  # unblocks database access
    connections["default"].ensure_connection()
    out, _, error = run("--database", "default")
    assert error is None and out.startswith("default: SSL connection")
    assert connections["default"].connection is not None


def _manage(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, str(REPO / "example_project" / "manage.py"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _url(server: TLSPostgres, host: str = "localhost") -> str:
    return (
        f"postgres://app:{APP_PASSWORD}@{host}:{server.port}/app"
        f"?sslmode=verify-full&sslrootcert={server.root_cert}"
    )


def test_as_a_probe_the_process_exit_status_follows_the_policy(
    good_server: TLSPostgres, mitm_server: TLSPostgres
) -> None:
    ok = _manage({"DATABASE_URL": _url(good_server)}, "dbtls")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("default: SSL connection (protocol: TLSv1.3")
    bad = _manage(
        {"DATABASE_URL": _url(good_server), "DATABASE_URL_INTERCEPTED": _url(mitm_server)},
        "dbtls",
    )
    assert bad.returncode == 1
    assert "default: SSL connection" in bad.stdout
    assert "intercepted: FAILED (TLS refused):" in bad.stderr
    assert "certificate verify failed" in bad.stderr
    assert "CommandError: 1 of 2 database aliases" in bad.stderr
    assert_no_secret(ok.stdout, ok.stderr, bad.stdout, bad.stderr)


def test_a_server_that_is_down_is_not_called_a_tls_problem(
    aliases: Callable[..., None], good_server: TLSPostgres
) -> None:
    aliases(down=good_server.database_settings(PORT="1"))
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError):
        call_command("dbtls", database=["down"], stdout=out, stderr=err)
    assert err.getvalue().startswith("down: FAILED (could not connect): ")
    assert "Connection refused" in err.getvalue() and "TLS" not in err.getvalue()


def test_a_setting_conflict_is_reported_as_configuration(
    aliases: Callable[..., None], good_server: TLSPostgres
) -> None:
    aliases(pooled=good_server.database_settings(options={"pool": True}, CONN_MAX_AGE=60))
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match=r"pooled \(configuration\)$"):
        call_command("dbtls", database=["pooled"], stdout=out, stderr=err)
    assert err.getvalue() == (
        "pooled: FAILED (configuration): Pooling doesn't support persistent connections.\n"
    )
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("dbtls", database=["pooled"], json=True, stdout=out, stderr=io.StringIO())
    assert json.loads(out.getvalue()) == {
        "pooled": {
            "cause": "configuration",
            "error": "Pooling doesn't support persistent connections.",
        }
    }

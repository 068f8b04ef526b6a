"""``manage.py dbshell`` runs psql under the same policy as every other connection."""

from __future__ import annotations

import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_pg_backend import libpq
from secure_pg_backend.base import standalone_wrapper
from secure_pg_backend.client import (
    DatabaseClient,
    psql_major_version,
    psql_session,
    target_arguments,
)
from secure_pg_backend.testing import APP_PASSWORD, TestCA, TLSPostgres

from .conftest import assert_no_secret
from .hostile import HostileServer

SSL_QUERY = "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"


def test_psql_gets_the_judged_parameters_in_one_conninfo(good_server: TLSPostgres) -> None:
    # sslnegotiation when this process's libpq knows it (17+; the C/Python builds may not).
    ours = "sslnegotiation" in libpq.keywords()
    options = {"sslnegotiation": "postgres"} if ours else {}
    settings = good_server.database_settings(options=options)
    args, env = DatabaseClient.settings_to_cmd_args_env(settings, ["-c", "select 1"])
    assert env is not None
    assert env["PGSSLMODE"] == "verify-full"
    assert env["PGGSSENCMODE"] == "disable"
    assert env["PGSSLROOTCERT"] == good_server.root_cert
    assert "PGPASSWORD" not in env  # only runshell hands psql the password, in a passfile
    assert args[0] == "psql" and args[2:] == ["-c", "select 1"]  # one conninfo, then extras
    conninfo = libpq.parse(args[1])  # read back by libpq's own parser
    assert conninfo["dbname"] == "app" and conninfo["host"] == "127.0.0.1"
    assert conninfo["port"] == str(good_server.port) and conninfo["user"] == "app"
    assert conninfo["sslmode"] == "verify-full" and conninfo["gssencmode"] == "disable"
    assert conninfo["sslrootcert"] == good_server.root_cert
    major = psql_major_version("psql") or 0
    # psql's libpq (Debian's 15 here) may predate these; an older libpq has neither.
    assert ("sslnegotiation" in conninfo) == (major >= 17 and ours)
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


def _psql(
    settings: dict[str, Any], parameters: tuple[str, ...] = ("-At", "-c", SSL_QUERY)
) -> subprocess.CompletedProcess[str]:
    with psql_session(standalone_wrapper("dbshell", settings), parameters) as (args, env):
        assert_no_secret(" ".join(args))
        return subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
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


# -- issue 17, class 2: the password reaches only the judged server -------------------------


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[str, HostileServer]]:
    """A server that says N and asks for the password in plaintext; one with another CA."""
    with (
        HostileServer("downgrade") as says_n,
        HostileServer("tls", TestCA().issue("localhost", "127.0.0.1")) as other_ca,
    ):
        yield {"says-n": says_n, "other-ca": other_ca}


def _elsewhere(listeners: dict[str, HostileServer]) -> list[str]:
    return [
        f"host=127.0.0.1 port={listeners['says-n'].port} dbname=app user=app sslmode=disable",
        f"host=127.0.0.1 port={listeners['other-ca'].port} dbname=app user=app sslmode=require",
    ]


def _heard(listeners: dict[str, HostileServer], before: dict[str, int]) -> list[Any]:
    for server in listeners.values():
        server.settle()
    return [r for name, s in listeners.items() for r in s.recordings[before[name] :]]


def _counts(listeners: dict[str, HostileServer]) -> dict[str, int]:
    return {name: len(server.recordings) for name, server in listeners.items()}


def test_password_travels_in_a_private_passfile_bound_to_the_judged_target(
    good_server: TLSPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", "user-env-Pw-c0ffee")  # never handed on to psql
    wrapper = standalone_wrapper("dbshell", good_server.database_settings())
    with psql_session(wrapper, ["-c", "select 1"]) as (args, env):
        assert "PGPASSWORD" not in env
        passfile = Path(env["PGPASSFILE"])
        assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
        assert stat.S_IMODE(passfile.parent.stat().st_mode) == 0o700
        lines = passfile.read_text().splitlines()
        assert lines == [f"127.0.0.1:{good_server.port}:app:app:{APP_PASSWORD}"]
        assert_no_secret(" ".join(args))
    assert not passfile.exists() and not passfile.parent.exists()


@pytest.mark.parametrize("route", ["psqlrc", "-c", "-f"])
def test_connect_elsewhere_from_psql_gets_no_password(
    good_server: TLSPostgres,
    listeners: dict[str, HostileServer],
    route: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A \\connect in a psqlrc, a -c or a -f script reaches the listeners without the
    password (with PGPASSWORD, as before, psql sent it to the server that said N)."""
    script = tmp_path / "connect.sql"
    script.write_text("".join(f'\\connect "{target}"\n' for target in _elsewhere(listeners)))
    parameters: tuple[str, ...] = ("-c", "select 1")
    if route == "psqlrc":
        monkeypatch.setenv("PSQLRC", str(script))
    elif route == "-c":
        parameters = ("-c", script.read_text().splitlines()[0])
    else:
        parameters = ("-f", str(script))
    before = _counts(listeners)
    result = _psql(good_server.database_settings(), parameters)
    heard = _heard(listeners, before)
    assert heard, "psql did not try the listener: the test would prove nothing"
    for record in heard:
        assert not record.contains(APP_PASSWORD.encode()), (route, result.stderr)
    assert_no_secret(result.stdout, result.stderr)


def test_psqlrc_settings_keep_working(
    good_server: TLSPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    psqlrc = tmp_path / "psqlrc"
    psqlrc.write_text("\\set QUIET on\n\\pset format unaligned\n\\pset tuples_only on\n")
    monkeypatch.setenv("PSQLRC", str(psqlrc))
    result = _psql(good_server.database_settings(), ("-c", "select 'a', 'b'"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "a|b"


@pytest.mark.parametrize(
    "parameters",
    [
        ["-d", "host=127.0.0.1 port={port} sslmode=disable"],
        ["-dhost=127.0.0.1 port={port} sslmode=disable"],
        ["--dbname=host=127.0.0.1 port={port} sslmode=disable"],
        ["-Atd", "host=127.0.0.1 port={port}"],
        ["-h", "127.0.0.1", "-p", "{port}"],
        ["-p{port}"],
        ["--ho", "127.0.0.1", "--port", "{port}"],
        ["-U", "postgres"],
        ["--user=postgres"],
        ["-c", "select 1", "host=127.0.0.1 port={port} sslmode=disable"],
        ["--", "postgres"],
    ],
)
def test_arguments_that_change_the_target_are_refused(
    good_server: TLSPostgres,
    listeners: dict[str, HostileServer],
    parameters: list[str],
    aliases: Callable[..., None],
) -> None:
    port = str(listeners["says-n"].port)
    parameters = [p.replace("{port}", port) for p in parameters]
    aliases(shell=good_server.database_settings())
    before = _counts(listeners)
    with pytest.raises(CommandError, match=r"refused dbshell for DATABASES\['shell'\]") as caught:
        call_command("dbshell", "--database", "shell", "--", *parameters)
    message = str(caught.value)
    assert "Fix:" in message and "sslmode=disable" not in message
    assert _heard(listeners, before) == []  # psql never started


_TOKENS = [
    "-c",
    "select 1",
    "-A",
    "-t",
    "-X",
    "-q",
    "-v",
    "x=1",
    "-d",
    "-h",
    "-p",
    "-U",
    "-dapp",
    "-Atc",
    "--",
    "--set=y=2",
    "--host",
    "--dbn",
    "--csv",
    "app",
    "postgres",
    "127.0.0.1",
    "-c\\connect postgres",
    "--no-psqlrc",
]


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(parameters=st.lists(st.sampled_from(_TOKENS), max_size=5))
def test_random_psql_arguments_are_refused_or_reach_the_judged_server_only(
    parameters: list[str],
    good_server: TLSPostgres,
    listeners: dict[str, HostileServer],
) -> None:
    says_n = str(listeners["says-n"].port)
    # "postgres" becomes the listener's port (a port, or a name); -w: never prompt
    parameters = ["-w", *(says_n if p == "postgres" else p for p in parameters)]
    wrapper = standalone_wrapper("dbshell", good_server.database_settings())
    before = _counts(listeners)
    try:
        with psql_session(wrapper, parameters) as (args, env):
            result = subprocess.run(
                args, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
            )
    except CommandError as refused:
        assert target_arguments(parameters), parameters  # refused only for a reason
        assert_no_secret(str(refused))
        return
    assert not target_arguments(parameters)
    assert _heard(listeners, before) == []
    assert_no_secret(result.stdout, result.stderr)


def test_sigint_is_ignored_only_around_psql_itself(
    good_server: TLSPostgres, make_wrapper: Any
) -> None:
    """Django's own dbshell test (test_postgresql.test_sigint_handler): every subprocess.run
    call in runshell happens with SIGINT ignored, and the handler is restored."""
    psql_major_version.cache_clear()  # the version probe must not run through subprocess.run
    wrapper = make_wrapper(good_server.database_settings(), "sigint")
    calls: list[Any] = []

    def fake_run(*args: Any, **kwargs: Any) -> None:
        calls.append(signal.getsignal(signal.SIGINT))

    handler = signal.getsignal(signal.SIGINT)
    assert handler != signal.SIG_IGN
    with mock.patch("subprocess.run", new=fake_run):
        wrapper.client.runshell([])
    assert calls == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGINT) == handler


def test_secret_options_never_reach_psqls_command_line(good_server: TLSPostgres) -> None:
    secret = "ssl-Key-Pass-5ec2e7"
    settings_dict = good_server.database_settings(options={"sslpassword": secret})
    wrapper = standalone_wrapper("dbshell", settings_dict)
    with psql_session(wrapper, ["-At", "-c", SSL_QUERY]) as (args, env):
        assert secret not in " ".join(args) and secret not in repr(env.get("PGSERVICE"))
        service_file = Path(env["PGSERVICEFILE"])
        assert secret in service_file.read_text()
        assert stat.S_IMODE(service_file.stat().st_mode) == 0o600
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("t|TLSv1.")
    assert not service_file.exists()


@pytest.mark.django_db
def test_wrong_ca_is_explained_without_the_connection_string(
    good_server: TLSPostgres, aliases: Callable[..., None], capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue 21, item 8: psql's raw 'certificate verify failed' and a CommandError quoting
    the whole connection string became the backend's explanation and fix."""
    other = TestCA()
    aliases(wrongca=good_server.database_settings(options={"sslrootcert": str(other.cert_path)}))
    with pytest.raises(CommandError) as caught:
        call_command("dbshell", "--database", "wrongca", "--", "-c", "select 1")
    message = str(caught.value)
    assert "DATABASES['wrongca']" in message
    assert "not signed by a CA in the root certificate file" in message and "Fix:" in message
    assert "gssencmode" not in message  # not the connection string
    out, err = capfd.readouterr()
    assert_no_secret(message, out, err)

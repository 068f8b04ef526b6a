"""``manage.py dbshell`` runs psql under the same policy as every other connection."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import tempfile
import termios
import time
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

from secure_pg_backend import libpq, psql_child
from secure_pg_backend.base import standalone_wrapper
from secure_pg_backend.client import (
    DatabaseClient,
    psql_major_version,
    psql_session,
    target_arguments,
)
from secure_pg_backend.testing import APP_PASSWORD, TestCA, TLSPostgres
from tests.conftest import assert_no_secret
from tests.support.hostile import HostileServer

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
    with psql_session(standalone_wrapper("dbshell", settings), parameters) as session:
        assert_no_secret(" ".join(session.argv))
        return subprocess.run(
            session.argv,
            env=session.env,
            pass_fds=session.pass_fds,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
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


def _anonymous(path: str) -> str:
    """What ``/dev/fd/N`` is in this process: a memfd or an unlinked file, never a name."""
    assert path.startswith("/dev/fd/"), path
    target = os.readlink(f"/proc/self/fd/{path.removeprefix('/dev/fd/')}")
    assert target.startswith("/memfd:") or target.endswith(" (deleted)"), target
    return target


def _closed(path: str, target: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{path.removeprefix('/dev/fd/')}") != target
    except FileNotFoundError:
        return True


def test_password_travels_in_an_anonymous_passfile_bound_to_the_judged_target(
    good_server: TLSPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", "user-env-Pw-c0ffee")  # never handed on to psql
    wrapper = standalone_wrapper("dbshell", good_server.database_settings())
    with psql_session(wrapper, ["-c", "select 1"]) as session:
        (args, env), fds = session, session.pass_fds
        assert "PGPASSWORD" not in env
        passfile = env["PGPASSFILE"]
        assert passfile == f"/dev/fd/{fds[0]}" and len(fds) == 1
        target = _anonymous(passfile)
        assert stat.S_IMODE(os.stat(passfile).st_mode) == 0o600  # what libpq's check reads
        lines = Path(passfile).read_text().splitlines()
        assert lines == [f"127.0.0.1:{good_server.port}:app:app:{APP_PASSWORD}"]
        assert_no_secret(" ".join(args))
    assert _closed(passfile, target)


def test_without_dev_fd_the_passfile_is_private_and_removed(
    good_server: TLSPostgres, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where /dev/fd cannot carry the file (BSD, macOS): 0600 in a 0700 directory named after
    this process, removed afterwards; psql still connects."""
    monkeypatch.setattr(psql_child, "anonymous_file", lambda text: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = _psql(good_server.database_settings(options={"sslpassword": "ssl-Key-Pass-5ec2e7"}))
    assert result.returncode == 0, result.stderr
    wrapper = standalone_wrapper("dbshell", good_server.database_settings())
    with psql_session(wrapper, ["-c", "select 1"]) as session:
        env, fds = session.env, session.pass_fds
        assert fds == ()
        passfile = Path(env["PGPASSFILE"])
        assert passfile.parent.parent == tmp_path
        assert passfile.parent.name.startswith(f"spb-dbshell-{os.getpid()}-")
        assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
        assert stat.S_IMODE(passfile.parent.stat().st_mode) == 0o700
    assert list(tmp_path.iterdir()) == []


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
        with psql_session(wrapper, parameters) as session:
            (args, env), fds = session, session.pass_fds
            result = subprocess.run(
                args,
                env=env,
                pass_fds=fds,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
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
    with psql_session(wrapper, ["-At", "-c", SSL_QUERY]) as session:
        (args, env), fds = session, session.pass_fds
        assert secret not in " ".join(args) and secret not in repr(env.get("PGSERVICE"))
        service_file = env["PGSERVICEFILE"]
        target = _anonymous(service_file)
        assert secret in Path(service_file).read_text()
        assert stat.S_IMODE(os.stat(service_file).st_mode) == 0o600
        result = subprocess.run(
            args, env=env, pass_fds=fds, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("t|TLSv1.")
    assert _closed(service_file, target)


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
    assert "which is not in your root certificate file" in message and "Fix:" in message
    assert "gssencmode" not in message  # not the connection string
    out, err = capfd.readouterr()
    assert_no_secret(message, out, err)


# -- issue 28, item 1: secrets never outlive psql, psql never outlives dbshell -------------

SSL_SECRET = "ssl-Key-Pass-28d3b1"  # sslpassword: travels in the service file
_DRIVER = """
import json, os, signal, sys
# SIGHUP as a shell's or kubectl's child has it, even under a test run started with nohup.
signal.signal(signal.SIGHUP, signal.SIG_DFL)
with os.fdopen(int(sys.argv[1])) as settings_pipe:
    settings_dict, mode = json.loads(settings_pipe.readline())
import django
from django.conf import settings
settings.configure(DATABASES={"default": settings_dict}, USE_TZ=True)
django.setup()
if mode == "directory":  # as where /dev/fd cannot carry the files (BSD, macOS)
    from secure_pg_backend import psql_child
    psql_child.anonymous_file = lambda text: None
from django.core.management import execute_from_command_line
execute_from_command_line(["manage.py", "dbshell", "--", *sys.argv[2:]])
"""


class Dbshell:
    """``manage.py dbshell`` in a process (and session) of its own, with its own TMPDIR; the
    settings, password included, reach it through a pipe, never in its arguments or
    environment. With ``terminal`` (a pty's slave) psql runs interactively on it."""

    def __init__(
        self,
        server: TLSPostgres,
        tmpdir: Path,
        mode: str,
        *psql_args: str,
        terminal: int | None = None,
    ) -> None:
        tmpdir.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(TMPDIR=str(tmpdir), PYTHONPATH=str(Path(__file__).parent.parent))
        env.update(PSQLRC="/dev/null", TERM="dumb")
        settings_dict = server.database_settings(options={"sslpassword": SSL_SECRET})
        # Output to files: a psql left running must not hold the test up on a pipe.
        self.out, self.err = tmpdir.parent / "out", tmpdir.parent / "err"
        read, write = os.pipe()
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _DRIVER, str(read), *psql_args],
                stdin=subprocess.DEVNULL if terminal is None else terminal,
                stdout=out if terminal is None else terminal,
                stderr=err,
                env=env,
                start_new_session=True,  # its own process group, as a terminal gives it
                pass_fds=(read,),
            )
        os.close(read)
        with os.fdopen(write, "w") as pipe:
            pipe.write(json.dumps([settings_dict, mode]) + "\n")

    def psql(self, timeout: float = 30) -> int:
        """The pid of the psql this dbshell started, once it runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in _children(self.process.pid):
                # Not the version probe: its command line is read first, so a probe that has
                # just exited (an empty command line) is not taken for the session's psql.
                command = _cmdline(pid)
                if command and b"--version" not in command and _comm(pid) == "psql":
                    return pid
            assert self.process.poll() is None, self.err.read_text()
            time.sleep(0.05)
        raise AssertionError("psql did not start")

    def wait(self) -> tuple[int, str, str]:
        status = self.process.wait(timeout=60)
        return status, self.out.read_text(), self.err.read_text()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _running(pid: int, start: str) -> bool:
    """Whether the process ``pid`` started at ``start`` still runs (a zombie does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _files_holding_secrets(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if any(s.encode() in data for s in (APP_PASSWORD, SSL_SECRET)):
                    found.append(str(path))
    return found


def _wait_for_query(server: TLSPostgres, marker: str) -> None:
    deadline = time.monotonic() + 30
    query = (
        f"select count(*) from pg_stat_activity where query like '%{marker}%' "
        "and pid <> pg_backend_pid()"
    )
    while server.admin_sql(query)[0][0] == 0:
        assert time.monotonic() < deadline, "psql's query never started"
        time.sleep(0.05)


def _end_query(server: TLSPostgres, marker: str) -> None:
    server.admin_sql(
        "select pg_terminate_backend(pid) from pg_stat_activity "
        f"where query like '%{marker}%' and pid <> pg_backend_pid()"
    )


@pytest.mark.parametrize("mode", ["anonymous", "directory"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=str)
def test_a_stopped_dbshell_leaves_no_secret_and_no_psql(
    good_server: TLSPostgres, tmp_path: Path, signum: signal.Signals, mode: str
) -> None:
    """SIGTERM (docker stop, systemctl stop), SIGHUP (a closed kubectl exec or ssh) or SIGKILL
    sent to manage.py dbshell alone while psql runs a query: psql stops too, and no file holds
    the password or the sslpassword. Before issue 28 both stayed (the passfile's directory
    was removed only in a finally block; psql ran on as an orphan)."""
    tmpdir = tmp_path / "tmp"
    marker = f"spb28-{signum.name}-{mode}"
    shell = Dbshell(good_server, tmpdir, mode, "-c", f"select pg_sleep(60) /* {marker} */")
    try:
        psql = shell.psql()
        start = _start_time(psql)
        _wait_for_query(good_server, marker)  # psql has read the password and connected
        env = _environment(psql)
        assert "PGPASSWORD" not in env
        assert not any(APP_PASSWORD in v or SSL_SECRET in v for v in env.values())
        paths = [env["PGPASSFILE"], env["PGSERVICEFILE"]]
        if mode == "anonymous":
            for path in paths:  # psql's descriptor: a memfd, no name anywhere
                number = path.removeprefix("/dev/fd/")
                assert os.readlink(f"/proc/{psql}/fd/{number}") == "/memfd:spb-dbshell (deleted)"
            assert _files_holding_secrets(tmpdir) == []
        else:
            assert all(Path(p).parent.parent == tmpdir for p in paths), paths
            assert len(_files_holding_secrets(tmpdir)) == 2  # the fallback, while psql runs

        os.kill(shell.process.pid, signum)
        status, out, err = shell.wait()
        assert status == -signum, (status, out, err)  # it still ends by the signal it got
        if signum != signal.SIGKILL:
            assert not _running(psql, start)  # stopped and waited for before dbshell ended
        else:  # the kernel's PR_SET_PDEATHSIG SIGTERM
            deadline = time.monotonic() + 10
            while _running(psql, start):
                assert time.monotonic() < deadline, "psql outlived a SIGKILLed dbshell"
                time.sleep(0.05)
        assert_no_secret(out, err)

        leftovers = _files_holding_secrets(tmpdir)
        if mode == "anonymous" or signum != signal.SIGKILL:
            assert leftovers == []
            assert list(tmpdir.iterdir()) == []
            return
        # The fallback after SIGKILL: nothing could remove the directory; the next dbshell does.
        assert len(leftovers) == 2
        status, out, err = Dbshell(good_server, tmpdir, mode, "-Atc", "select 1").wait()
        assert (status, out.strip()) == (0, "1"), err
        assert _files_holding_secrets(tmpdir) == [] and list(tmpdir.iterdir()) == []
    finally:
        if shell.process.poll() is None:
            shell.process.kill()
            shell.wait()
        _end_query(good_server, marker)


def test_ctrl_c_cancels_psqls_query_and_dbshell_carries_on(
    good_server: TLSPostgres, tmp_path: Path
) -> None:
    """SIGINT to the whole process group (Ctrl-C in a terminal) cancels psql's query, as with
    Django's dbshell; manage.py ignores it and reports psql's exit status."""
    marker = "spb28-sigint"
    shell = Dbshell(
        good_server, tmp_path / "tmp", "anonymous", "-c", f"select pg_sleep(60) /* {marker} */"
    )
    try:
        shell.psql()
        _wait_for_query(good_server, marker)
        os.killpg(shell.process.pid, signal.SIGINT)
        status, out, err = shell.wait()
        assert status == 1, (status, out, err)
        assert "canceling statement due to user request" in err
        assert "returned non-zero exit status 1" in err  # Django's dbshell, still running
    finally:
        _end_query(good_server, marker)


def test_psql_without_memfd_gets_an_unlinked_file(
    good_server: TLSPostgres, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where memfd_create is refused (an old kernel, a seccomp filter): a temporary file
    unlinked before the secret is written to it, which libpq still opens as /dev/fd/N."""

    def refused(*args: object) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", refused)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    wrapper = standalone_wrapper("dbshell", good_server.database_settings())
    with psql_session(wrapper, ["-Atc", "select current_user"]) as session:
        (args, env), fds = session, session.pass_fds
        target = _anonymous(env["PGPASSFILE"])
        assert target.startswith(str(tmp_path)) and target.endswith(" (deleted)")
        assert list(tmp_path.iterdir()) == []
        result = subprocess.run(
            args, env=env, pass_fds=fds, capture_output=True, text=True, timeout=60
        )
    assert (result.returncode, result.stdout.strip()) == (0, "app"), result.stderr


def test_the_sweep_removes_only_this_users_dead_directories(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    legacy = tmp_path / "spb-dbshell-k3x9q2ab"  # before issue 28: no pid in the name
    of_the_dead = tmp_path / f"spb-dbshell-{dead.pid}-a1b2c3"
    alive = tmp_path / f"spb-dbshell-{os.getpid()}-d4e5f6"
    elsewhere = tmp_path / "elsewhere"
    for directory in (legacy, of_the_dead, alive, elsewhere):
        directory.mkdir()
        (directory / "pgpass").write_text("secret\n")
    link = tmp_path / "spb-dbshell-1-link"
    link.symlink_to(elsewhere)
    plain = tmp_path / "spb-dbshell-2-file"
    plain.write_text("not ours to judge\n")
    removed = psql_child.sweep_stale_directories(str(tmp_path))
    assert sorted(removed) == sorted([str(legacy), str(of_the_dead)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, elsewhere.name, link.name, plain.name]
    )
    assert (elsewhere / "pgpass").exists()  # never through the link


def _read_until(master: int, wanted: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, seen
        if select.select([master], [], [], left)[0]:
            seen += os.read(master, 4096)
    return seen


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=str)
def test_an_interactive_psql_stops_with_dbshell_and_gives_the_terminal_back(
    good_server: TLSPostgres, tmp_path: Path, signum: signal.Signals
) -> None:
    """psql at its prompt holds the terminal in its line editor's raw mode; stopped by a
    signal it can handle (forwarded, or the parent-death SIGTERM after a SIGKILL) it puts the
    terminal back as it found it, where a SIGKILL of psql would leave it raw."""
    master, slave = pty.openpty()
    try:
        cooked = termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO)
        shell = Dbshell(good_server, tmp_path / "tmp", "anonymous", terminal=slave)
        psql = shell.psql()
        start = _start_time(psql)
        _read_until(master, b"=> ")  # connected, and waiting for a line
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # the line editor's mode
        os.kill(shell.process.pid, signum)
        status, _, err = shell.wait()
        assert status == -signum, err
        deadline = time.monotonic() + 10
        while _running(psql, start):
            assert time.monotonic() < deadline, "psql outlived dbshell"
            time.sleep(0.05)
        assert termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO) == cooked
        assert_no_secret(err)
    finally:
        os.close(master)
        os.close(slave)


def test_libpq_judges_the_descriptor_as_it_judges_a_passfile(good_server: TLSPostgres) -> None:
    """Why the fchmod: libpq stats /dev/fd/N (following the link to the memfd, created 0777)
    and ignores a passfile the group or others could read; at 0600 it reads it, from its start
    each time it opens it (two psql runs on one descriptor)."""
    wrapper = standalone_wrapper("dbshell", good_server.database_settings())
    with psql_session(wrapper, ["-w", "-Atc", "select 1"]) as session:
        (args, env), fds = session, session.pass_fds

        def psql() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                args, env=env, pass_fds=fds, capture_output=True, text=True, timeout=60
            )

        runs = [psql(), psql()]
        os.fchmod(fds[0], 0o644)
        loose = psql()
    for run in runs:
        assert (run.returncode, run.stdout) == (0, "1\n"), run.stderr
    assert loose.returncode == 2
    assert f'password file "{env["PGPASSFILE"]}" has group or world access' in loose.stderr
    assert_no_secret(*(run.stderr for run in [*runs, loose]))

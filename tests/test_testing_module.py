"""secure_pg_backend.testing in a process of its own: nothing is left behind when it ends.

Each test runs a real child process with TMPDIR pointed at a fresh, empty directory, lets it
start real servers, ends it (normally or by a signal) and checks that the directory is empty
again and that nothing listens on the ports it used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dj_database_url
import pytest

REPO = Path(__file__).resolve().parent.parent

# Starts a server and a PgBouncer in front of it and never stops them: the module must.
CHILD = """
import sys, time
from secure_pg_backend.testing import TestCA, TLSPostgres
from secure_pg_backend.testing.pgbouncer import PgBouncer

ca = TestCA()
server = TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca).start()
ports = [server.port]
if sys.argv[1] == "with-pgbouncer":
    ports.append(PgBouncer(server, ca.issue("localhost", "127.0.0.1"), trust=ca).start().port)
print(*ports, flush=True)
if sys.argv[1] == "wait":
    time.sleep(120)
"""


@pytest.fixture
def fresh_tmpdir() -> Iterator[Path]:
    """An empty directory for the child's TMPDIR (reachable by the postgres user as root)."""
    path = Path(tempfile.mkdtemp(prefix="spb-test-tmpdir-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def child_env(tmpdir: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_nothing_left(tmpdir: Path, ports: list[int]) -> None:
    assert sorted(os.listdir(tmpdir)) == []
    assert [port for port in ports if listening(port)] == []


@pytest.mark.needs_server
def test_normal_exit_without_stop_leaves_nothing(fresh_tmpdir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, "with-pgbouncer"],
        env=child_env(fresh_tmpdir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    ports = [int(port) for port in result.stdout.split()]
    assert len(ports) == 2
    assert_nothing_left(fresh_tmpdir, ports)


@pytest.mark.needs_server
@pytest.mark.parametrize(
    ("signum", "returncode"),
    [
        # Default disposition: the module cleans up, then dies of the signal as before.
        (signal.SIGTERM, -signal.SIGTERM),
        # KeyboardInterrupt unwinds; Python then exits by SIGINT as well.
        (signal.SIGINT, -signal.SIGINT),
    ],
    ids=["SIGTERM", "SIGINT"],
)
def test_signal_leaves_nothing(fresh_tmpdir: Path, signum: int, returncode: int) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "wait"],
        env=child_env(fresh_tmpdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ports = [int(port) for port in child.stdout.readline().split()]
        assert ports and listening(ports[0]), "the child's server did not start"
        assert os.listdir(fresh_tmpdir), "the child should be using TMPDIR while it runs"
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == returncode, stderr
    assert_nothing_left(fresh_tmpdir, ports)


# -- python -m secure_pg_backend.testing: the dev server ----------------------------------
@pytest.mark.needs_server
def test_dev_server_url_connects_through_the_backend_and_sigterm_leaves_nothing(
    fresh_tmpdir: Path, make_wrapper: Callable[..., Any], django_db_blocker: Any
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "secure_pg_backend.testing"],
        env=child_env(fresh_tmpdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip().removeprefix("DATABASE_URL=")
        ca_path = child.stdout.readline().strip().removeprefix("SSLROOTCERT=")
        settings = dj_database_url.parse(url, engine="secure_pg_backend")
        assert settings["OPTIONS"] == {"sslrootcert": ca_path}
        assert Path(ca_path).parent.parent == fresh_tmpdir
        wrapper = make_wrapper(dict(settings))
        with django_db_blocker.unblock(), wrapper.cursor() as cursor:
            cursor.execute("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()")
            assert cursor.fetchone() == (True, wrapper.tls_info.protocol)
        info = wrapper.tls_info
        assert (info.sslmode, info.root_cert, info.host) == ("verify-full", ca_path, "127.0.0.1")
        wrapper.close()
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr
    assert "stopped" in stderr
    assert_nothing_left(fresh_tmpdir, [int(settings["PORT"])])


def test_dev_server_without_binaries_says_so(fresh_tmpdir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "secure_pg_backend.testing", "--pg-bin", "/nonexistent/bin"],
        env=child_env(fresh_tmpdir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("secure_pg_backend.testing: ")
    assert "/nonexistent/bin/initdb" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(fresh_tmpdir) == []


@pytest.mark.needs_server
def test_start_up_never_accepts_a_known_password() -> None:
    """Issue 17, class 5: the dev server (and so the pytest plugin) listened on 127.0.0.1
    with the superuser password from the source until it switched to random ones; a local
    client racing the start-up logged in. A client knocks with every known credential from
    before the server listens until after it is up; it must never get in."""
    import threading
    import time

    import psycopg

    from secure_pg_backend.testing import (
        APP_DB,
        APP_PASSWORD,
        APP_USER,
        SUPERUSER,
        SUPERUSER_PASSWORD,
        free_port,
    )
    from secure_pg_backend.testing.devserver import DevServer

    port = free_port()
    known = [(SUPERUSER, SUPERUSER_PASSWORD, "postgres"), (APP_USER, APP_PASSWORD, APP_DB)]
    up = threading.Event()
    logged_in: list[str] = []
    refused_after_up: list[str] = []

    def knock() -> None:
        deadline = time.monotonic() + 180
        for _ in range(20000):  # bounded in count and in time
            if time.monotonic() > deadline or (up.is_set() and len(refused_after_up) >= 20):
                return
            for user, password, dbname in known:
                try:
                    with psycopg.connect(
                        host="127.0.0.1",
                        port=port,
                        user=user,
                        password=password,
                        dbname=dbname,
                        sslmode="prefer",
                        gssencmode="disable",
                        connect_timeout=5,
                    ):
                        logged_in.append(user)
                except psycopg.OperationalError as exc:
                    if up.is_set() and "password authentication failed" in str(exc):
                        refused_after_up.append(user)
            time.sleep(0.002)

    knocker = threading.Thread(target=knock, daemon=True)
    knocker.start()
    try:
        with DevServer.start(port=port) as dev:
            up.set()
            knocker.join(120)
            assert dev.password not in (APP_PASSWORD, SUPERUSER_PASSWORD)
    finally:
        up.set()
        knocker.join(120)
    assert logged_in == []
    assert refused_after_up, "the knocker never reached the running server"

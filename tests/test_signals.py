"""SIGTERM during a query and during the TLS handshake (a rolling deploy, issue 12).

A fresh process sets Django up and blocks in a query (``pg_sleep``) or in a handshake that a
loopback server stalls (it answers the SSLRequest with ``S``, then says nothing). On SIGTERM it
must end within a second with the usual status: killed by SIGTERM by default, or the status
of the application's own handler (here ``sys.exit(143)``, which runs the ``atexit`` path where
the backend closes its pools). Nothing may hang, and nothing may be printed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secure_pg_backend.testing import TestCA, TLSPostgres
from tests.support.hostile import (
    CONNECTION_DEADLINE,
    SSL_REQUEST,
    Recording,
    _Conn,
    _LoopbackServer,
)

ROOT = Path(__file__).resolve().parent.parent
ENV_KEY = "SPB_SIGNAL_CHILD"
EXIT_WITHIN = 1.0  # seconds from SIGTERM to the process being gone

CHILD = f"""
import json, os, signal, sys
import django
from django.conf import settings
config = json.loads(os.environ[{ENV_KEY!r}])
if config["handler"]:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
settings.configure(DATABASES={{"default": config["database"]}}, INSTALLED_APPS=[], USE_TZ=True)
django.setup()
from django.db import connection
print("ready", flush=True)
with connection.cursor() as cursor:
    cursor.execute(config["sql"])
print("finished", flush=True)
"""


class StallingServer(_LoopbackServer):
    """Accepts, answers the SSLRequest with ``S``, reads the ClientHello, then stalls."""

    def __init__(self) -> None:
        self.hellos = 0
        super().__init__()

    def _register(self) -> Recording:
        return Recording()

    def _handle(self, client: socket.socket, record: Recording) -> None:
        with client:
            conn = _Conn(client, record, time.monotonic() + CONNECTION_DEADLINE)
            if conn.take(8) != SSL_REQUEST:
                return
            client.sendall(b"S")
            if conn.fill():  # the ClientHello: the client is now inside the handshake
                self.hellos += 1
            while not self._stop.is_set():  # never answer; end when closed or told to stop
                try:
                    if not client.recv(65536):
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return


@pytest.fixture
def stalling_server() -> Iterator[StallingServer]:
    with StallingServer() as server:
        yield server


def start_child(database: dict[str, Any], sql: str, handler: bool) -> subprocess.Popen[str]:
    config = {"database": database, "sql": sql, "handler": handler}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **{ENV_KEY: json.dumps(config)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready and proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""
    return proc


def wait_until(condition: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.02)


def terminate(proc: subprocess.Popen[str]) -> tuple[int, float, str, str]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the process hung after SIGTERM") from None
    return proc.returncode, time.monotonic() - started, out, err


def expected_status(handler: bool) -> int:
    return 143 if handler else -signal.SIGTERM


def sleeping_backends(server: TLSPostgres) -> int:
    rows = server.admin_sql(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(30)%'"
    )
    return int(rows[0][0])


POOL = {"pool": {"min_size": 1, "max_size": 3}}
VARIANTS = [
    pytest.param(pool, handler, id=f"{'pool' if pool else 'connection'}-{name}")
    for pool in (False, True)
    for handler, name in ((False, "default"), (True, "exit-handler"))
]


@pytest.mark.parametrize(("pool", "handler"), VARIANTS)
def test_sigterm_during_a_query(good_server: TLSPostgres, pool: bool, handler: bool) -> None:
    database = good_server.database_settings(options=POOL if pool else {})
    proc = start_child(database, "SELECT pg_sleep(30)", handler)
    try:
        wait_until(lambda: sleeping_backends(good_server) == 1)
    finally:
        status, elapsed, out, err = terminate(proc)
    assert status == expected_status(handler), err
    print(f"exited {elapsed:.3f} s after SIGTERM")
    assert elapsed < EXIT_WITHIN, elapsed
    assert "finished" not in out and err == ""


@pytest.mark.parametrize(("pool", "handler"), VARIANTS)
def test_sigterm_during_the_tls_handshake(
    stalling_server: StallingServer, ca: TestCA, pool: bool, handler: bool
) -> None:
    database = {
        "ENGINE": "secure_pg_backend",
        "HOST": "127.0.0.1",
        "PORT": str(stalling_server.port),
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "not-used",
        "OPTIONS": {"sslrootcert": str(ca.cert_path), **(POOL if pool else {})},
    }
    proc = start_child(database, "SELECT 1", handler)
    try:
        wait_until(lambda: stalling_server.hellos >= 1)
    finally:
        status, elapsed, out, err = terminate(proc)
    assert status == expected_status(handler), err
    print(f"exited {elapsed:.3f} s after SIGTERM")
    assert elapsed < EXIT_WITHIN, elapsed
    assert "finished" not in out and err == ""

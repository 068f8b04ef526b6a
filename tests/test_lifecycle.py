"""What the backend does at interpreter exit (issue 12).

A process that used a pool and exits without closing it used to abort now and then
(``FATAL: exception not rethrown``, SIGABRT): a pool worker thread was importing
``cryptography`` (Rust) for the start-up log line when the interpreter finalized. The full
stress run is ``python -m tests.support.exit_stress --runs 500``; this is its short version.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connections

from secure_pg_backend import base
from secure_pg_backend.testing import TestCA, TLSPostgres
from tests.support import exit_stress
from tests.test_signals import StallingServer


@pytest.mark.slow
def test_processes_that_exit_without_closing_end_normally(good_server: TLSPostgres) -> None:
    runs = exit_stress.stress(
        good_server.database_settings(), 3 * len(exit_stress.VARIANTS), parallel=2
    )
    abnormal = [run.describe() for run in runs if run.abnormal]
    assert not abnormal, abnormal


def pool_threads(pool: Any) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{pool.name}-")]


def test_at_exit_an_idle_pool_closes_and_its_threads_stop(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(good_server.database_settings(options={"pool": {"min_size": 2}}))
    wrapper.ensure_connection()
    wrapper.close()
    pool = wrapper.pool
    pool.wait(timeout=10)
    assert pool_threads(pool)
    started = time.monotonic()
    pool.close_at_exit(time.monotonic() + base.EXIT_GRACE)
    assert pool.closed and not pool_threads(pool)
    assert time.monotonic() - started < base.EXIT_GRACE


def test_at_exit_a_stalled_connection_attempt_does_not_delay_the_exit(
    make_wrapper: Callable[..., Any], ca: TestCA
) -> None:
    with StallingServer() as stalling_server:
        stalled_attempt_at_exit(make_wrapper, stalling_server, ca)


def stalled_attempt_at_exit(
    make_wrapper: Callable[..., Any], stalling_server: StallingServer, ca: TestCA
) -> None:
    settings = {
        "ENGINE": "secure_pg_backend",
        "HOST": "127.0.0.1",
        "PORT": str(stalling_server.port),
        "NAME": "app",
        "USER": "app",
        # No retries: when the stalled handshake finally fails (EOF, transient), the worker
        # must come back at once, not retry into the exit's parking spot (see pool._attempt).
        "OPTIONS": {"sslrootcert": str(ca.cert_path), "pool": {"min_size": 1}, "connect_retry": 0},
    }
    pool = make_wrapper(settings).pool
    pool.open()
    deadline = time.monotonic() + 20
    while stalling_server.hellos < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stalling_server.hellos == 1  # the pool's worker is inside the handshake
    started = time.monotonic()
    pool.close_at_exit(time.monotonic() + base.EXIT_GRACE)
    # Closing would wait for that worker; it is left blocked in libpq instead.
    assert time.monotonic() - started < 0.2 and not pool.closed
    stalling_server.close()  # the handshake fails, the worker is free, the pool can close


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the pool's threads
def test_a_forked_child_does_not_close_the_parents_pool_at_exit(
    aliases: Callable[..., None], good_server: TLSPostgres
) -> None:
    aliases(exiting=good_server.database_settings(options={"pool": {"min_size": 1}}))
    with connections["exiting"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    connections["exiting"].close()
    pid = os.fork()
    if pid == 0:  # exits through atexit, as a worker process would
        try:
            base._quiesce_pools()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    with connections["exiting"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] == backend

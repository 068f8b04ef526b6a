"""Threat: under load, an outage or a certificate change, a connection slips through unverified.

Real servers with ``log_connections = on``: the server logs every authorised session with its TLS
parameters, and the backend logs every physical connection it verified (INFO for an alias's first,
DEBUG after). The two counts must be equal: every session the server granted was checked by the
backend, and every server-side line says ``SSL enabled``. Each thread uses
``django.db.connections[alias]`` (its own wrapper, as in a threaded server) and closes it the way
Django's request_started/request_finished signals do. Every loop has a count and a deadline.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from django.db import connections
from django.db.utils import InterfaceError, OperationalError

from secure_pg_backend import InsecureConnectionError
from secure_pg_backend.testing import LeafPair, TestCA, TLSPostgres
from tests.conftest import assert_no_secret
from tests.support.faultkit import VerifiedLog, app_sessions, capture_verified

THREADS = 16
QUERIES = 500
LOG_CONNECTIONS = {"log_connections": "on"}
DEADLINE = 60.0  # per scenario; far above what each needs
NO_HANG = 20.0  # one request, connect_timeout=3: anything near this would be a hang


REPORT: list[str] = []  # counts for the README's security table, printed after the module


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and REPORT:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("")
            for line in REPORT:
                reporter.write_line(f"load and faults: {line}")


@pytest.fixture
def verified_log() -> Iterator[VerifiedLog]:
    with capture_verified() as log:
        yield log


def server_transactions(server: TLSPostgres) -> int:
    """Committed transactions in the app database (each autocommit query is one)."""
    count, deadline = 0, time.monotonic() + 10
    for _ in range(100):  # backends flush their statistics on exit, shortly after closing
        rows = server.admin_sql("select xact_commit from pg_stat_database where datname = 'app'")
        count = int(rows[0][0])
        if count >= THREADS * QUERIES or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return count


def assert_every_session_verified(
    server: TLSPostgres, log: VerifiedLog, alias: str, minimum: int
) -> int:
    records = log.for_port(server.port)
    sessions = app_sessions(server)
    assert len(sessions) >= minimum
    assert len(records) == len(sessions), "a session the backend did not verify"
    assert all("SSL enabled (protocol=TLSv1.3" in line for line in sessions)
    assert all(r.tls_transport == "tls" and r.tls_sslmode == "verify-full" for r in records)  # type: ignore[attr-defined]
    assert {r.db_alias for r in records} == {alias}  # type: ignore[attr-defined]
    levels = [r.levelno for r in records]
    assert levels.count(logging.INFO) == 1 and levels.count(logging.DEBUG) == len(levels) - 1
    return len(sessions)


def request(alias: str, queries: int) -> None:
    """One request cycle, as Django's handlers run it."""
    conn = connections[alias]
    conn.close_if_unusable_or_obsolete()  # request_started
    try:
        with conn.cursor() as cur:
            for _ in range(queries):
                cur.execute("select 1")
                assert cur.fetchone() == (1,)
    finally:
        conn.close_if_unusable_or_obsolete()  # request_finished


@dataclass
class WorkerResult:
    queries: int = 0
    errors: list[BaseException] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)


def run_threads(
    alias: str, work: Callable[[WorkerResult], None], threads: int = THREADS
) -> list[WorkerResult]:
    results = [WorkerResult() for _ in range(threads)]

    def run(result: WorkerResult) -> None:
        try:
            work(result)
        finally:
            connections[alias].close()  # this thread's wrapper

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(run, r) for r in results]:
            future.result(timeout=DEADLINE + 30)
    return results


def fingerprint(leaf: LeafPair) -> str:
    cert = x509.load_pem_x509_certificates(leaf.cert_chain_pem)[0]
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


# -- load ---------------------------------------------------------------------------
def test_pool_under_load_every_connection_verified(
    ca: TestCA,
    start_server: Callable[..., TLSPostgres],
    aliases: Callable[..., None],
    verified_log: VerifiedLog,
) -> None:
    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca, settings=LOG_CONNECTIONS)
    pool = {"min_size": 2, "max_size": 8, "timeout": 10}
    aliases(load_pool=server.database_settings(options={"pool": pool}))
    deadline = time.monotonic() + DEADLINE

    def work(result: WorkerResult) -> None:
        for _ in range(QUERIES // 10):  # 50 requests of 10 queries
            if time.monotonic() > deadline:
                break
            try:
                request("load_pool", 10)
                result.queries += 10
            except Exception as exc:
                result.errors.append(exc)

    try:
        results = run_threads("load_pool", work)
    finally:
        connections["load_pool"].close_pool()
    assert [e for r in results for e in r.errors] == []
    assert sum(r.queries for r in results) == THREADS * QUERIES
    assert server_transactions(server) >= THREADS * QUERIES  # they really reached the server
    opened = assert_every_session_verified(server, verified_log, "load_pool", minimum=2)
    REPORT.append(f"pool: {THREADS}x{QUERIES} queries, 0 errors, {opened} sessions, all verified")
    assert opened <= 8 + 2  # the pool reused its connections (a little churn is allowed)


def test_conn_max_age_0_under_load_every_connection_verified(
    ca: TestCA,
    start_server: Callable[..., TLSPostgres],
    aliases: Callable[..., None],
    verified_log: VerifiedLog,
) -> None:
    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca, settings=LOG_CONNECTIONS)
    aliases(load_plain=server.database_settings(CONN_MAX_AGE=0))
    # CONN_MAX_AGE=0 opens a new TLS connection (handshake + SCRAM + a server process) per
    # request. One query per request would be 8000 connections, ~1 minute on 2 cores; requests
    # of 25 queries keep the 500 queries per thread and still open 320 connections.
    per_request = 25
    deadline = time.monotonic() + DEADLINE

    def work(result: WorkerResult) -> None:
        for _ in range(QUERIES // per_request):
            if time.monotonic() > deadline:
                break
            try:
                request("load_plain", per_request)
                result.queries += per_request
            except Exception as exc:
                result.errors.append(exc)

    results = run_threads("load_plain", work)
    assert [e for r in results for e in r.errors] == []
    assert sum(r.queries for r in results) == THREADS * QUERIES
    opened = assert_every_session_verified(
        server, verified_log, "load_plain", minimum=THREADS * QUERIES // per_request
    )
    assert opened == THREADS * QUERIES // per_request  # exactly one per request
    REPORT.append(
        f"CONN_MAX_AGE=0: {THREADS}x{QUERIES} queries, 0 errors, {opened} sessions, all verified"
    )


# -- an outage in the middle of the load --------------------------------------------
def test_restart_during_load_fails_cleanly_and_reverifies(
    ca: TestCA,
    start_server: Callable[..., TLSPostgres],
    aliases: Callable[..., None],
    verified_log: VerifiedLog,
) -> None:
    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca, settings=LOG_CONNECTIONS)
    aliases(
        restart=server.database_settings(
            CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=True, options={"connect_timeout": 3}
        )
    )
    threads = 8
    phase = {"name": "before"}  # "before" -> "outage" -> "after"
    ok_after = [0] * threads
    stop = threading.Event()
    deadline = time.monotonic() + DEADLINE
    index, index_lock = iter(range(threads)), threading.Lock()

    def work(result: WorkerResult) -> None:
        with index_lock:
            me = next(index)
        for _ in range(5000):
            if stop.is_set() or time.monotonic() > deadline:
                break
            began, seen = time.monotonic(), phase["name"]
            try:
                request("restart", 1)
                result.queries += 1
                if seen == "after":
                    ok_after[me] += 1
            except Exception as exc:
                result.errors.append(exc)
                time.sleep(0.05)  # a client backing off
            result.durations.append(time.monotonic() - began)

    def until(condition: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if condition() or time.monotonic() > end:
                break
            time.sleep(0.05)
        return condition()

    with ThreadPoolExecutor(1) as driver:
        load = driver.submit(run_threads, "restart", work, threads)
        assert until(lambda: len(verified_log.for_port(server.port)) >= threads, 20)
        phase["name"] = "outage"
        server.kill()
        time.sleep(1.0)  # let every thread hit the outage
        server.start_again()
        phase["name"] = "after"
        recovered = until(lambda: min(ok_after) >= 5, 30)
        stop.set()
        results = load.result(timeout=DEADLINE + 30)
    assert recovered, f"not every thread recovered: {ok_after}"
    errors = [e for r in results for e in r.errors]
    assert errors, "the outage was not observed"
    # Clean failures only: Django's database errors, never a hang or a foreign exception.
    assert all(isinstance(e, (OperationalError, InterfaceError)) for e in errors), {
        type(e) for e in errors
    }
    assert not any(isinstance(e, InsecureConnectionError) for e in errors)
    assert max(d for r in results for d in r.durations) < NO_HANG
    assert_no_secret(*(str(e) for e in errors))
    sessions = assert_every_session_verified(server, verified_log, "restart", minimum=threads * 2)
    REPORT.append(
        f"restart: {sum(r.queries for r in results)} queries, {len(errors)} clean failures "
        f"during the outage, {sessions} sessions, all verified"
    )
    assert sessions >= 2 * threads  # every thread opened (and verified) a new connection


# -- certificate rotation -------------------------------------------------------------
def test_rotation_to_untrusted_then_back(
    ca: TestCA,
    start_server: Callable[..., TLSPostgres],
    aliases: Callable[..., None],
    verified_log: VerifiedLog,
) -> None:
    first = ca.issue("localhost", "127.0.0.1")
    server = start_server(first, trust=ca, settings=LOG_CONNECTIONS)
    entry = server.database_settings(CONN_MAX_AGE=None)
    aliases(rot_a=entry, rot_b=entry)
    old = connections["rot_a"]
    assert old.tls_info.peer_certificate.sha256_fingerprint == fingerprint(first)

    server.rotate_certificate(TestCA().issue("localhost", "127.0.0.1"))
    with pytest.raises(InsecureConnectionError, match="certificate verify failed") as caught:
        connections["rot_b"].ensure_connection()
    assert "sslrootcert" in str(caught.value)  # the fix is named
    assert_no_secret(str(caught.value))
    with old.cursor() as cur:  # the open session is unaffected by the reload
        cur.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert cur.fetchone() == (True,)

    second = ca.issue("localhost", "127.0.0.1")
    server.rotate_certificate(second)
    new = connections["rot_b"]
    assert new.tls_info.peer_certificate.sha256_fingerprint == fingerprint(second)
    assert old.tls_info.peer_certificate.sha256_fingerprint == fingerprint(first)
    old.close()
    assert old.tls_info.peer_certificate.sha256_fingerprint == fingerprint(second)
    records = verified_log.for_port(server.port)
    assert len(records) == len(app_sessions(server)) == 3  # first, b after fix, a again


def test_pool_rotation_refuses_promptly_and_heals(
    ca: TestCA,
    start_server: Callable[..., TLSPostgres],
    aliases: Callable[..., None],
    verified_log: VerifiedLog,
) -> None:
    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca, settings=LOG_CONNECTIONS)
    pool_options = {"min_size": 2, "max_size": 4, "timeout": 10}
    entry = server.database_settings(
        CONN_HEALTH_CHECKS=True, options={"pool": pool_options, "connect_timeout": 3}
    )
    aliases(pool_a=entry)
    conn = connections["pool_a"]
    conn.ensure_connection()
    pool = conn.pool
    conn.close()  # back to the pool
    try:
        server.rotate_certificate(TestCA().issue("localhost", "127.0.0.1"))
        # The pooled sessions end (as in a server restart): the pool needs new connections.
        server.admin_sql(
            "select pg_terminate_backend(pid) from pg_stat_activity where usename = 'app'"
        )
        began = time.monotonic()
        with pytest.raises(InsecureConnectionError, match="certificate verify failed") as caught:
            conn.ensure_connection()
        # The real reason at once, not a PoolTimeout after the pool's 10 s.
        assert time.monotonic() - began < pool_options["timeout"]
        assert_no_secret(str(caught.value))

        server.rotate_certificate(ca.issue("localhost", "127.0.0.1"))
        healed = False
        deadline = time.monotonic() + 30
        for _ in range(300):  # the pool retries in the background, with backoff
            try:
                conn.ensure_connection()
                healed = True
                break
            except InsecureConnectionError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert healed
        assert conn.pool is pool  # healed in place, not recreated
        with conn.cursor() as cur:
            cur.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            assert cur.fetchone() == (True,)
    finally:
        conn.close()
        conn.close_pool()
    records = verified_log.for_port(server.port)
    assert len(records) == len(app_sessions(server)) >= 3

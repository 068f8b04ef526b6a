"""The retry object's mechanisms (issue 30): a breaker per endpoint, the deadline, the bucket.

Real servers and real listeners on loopback where a connection is made; the host order, the
deadline's shares and the bucket also on their own (no server). The long scenarios that
measure them against the stock ENGINE are in tests/test_long.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from django.db.utils import OperationalError

from secure_pg_backend import breakers, causes, signals
from secure_pg_backend import retry as retries
from secure_pg_backend.testing import APP_PASSWORD, TestCA, TLSPostgres, free_port
from tests.conftest import assert_no_secret

Wrapper = Callable[..., Any]


def _entry(ca: TestCA, host: str, port: str, **options: Any) -> dict[str, Any]:
    return {
        "ENGINE": "secure_pg_backend",
        "NAME": "app",
        "USER": "app",
        "PASSWORD": APP_PASSWORD,
        "HOST": host,
        "PORT": port,
        "OPTIONS": {"sslrootcert": str(ca.cert_path), **options},
    }


@pytest.fixture
def changes() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        seen.append(kwargs)

    signals.breaker_changed.connect(receiver, weak=False, dispatch_uid="test_breaker")
    yield seen
    signals.breaker_changed.disconnect(dispatch_uid="test_breaker")


class Silent:
    """A loopback listener that accepts and never answers (a black-holed host); counts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(1000):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)

    def close(self) -> None:
        if self.sock.fileno() == -1:
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[Callable[[], Silent]]:
    made: list[Silent] = []

    def make() -> Silent:
        made.append(Silent())
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def _held(wrapper: Any) -> tuple[float, BaseException | None]:
    begin = time.monotonic()
    try:
        wrapper.ensure_connection()
    except Exception as exc:
        return time.monotonic() - begin, exc
    return time.monotonic() - begin, None


def _state(endpoint: str) -> dict[str, Any]:
    [state] = [b for b in retries.breakers() if b["endpoint"] == endpoint]
    return state


# -- the breaker, on a real server ---------------------------------------------------------
def test_a_spent_budget_opens_the_breaker_and_a_probe_closes_it(
    ca: TestCA,
    start_server: Callable[..., TLSPostgres],
    make_wrapper: Wrapper,
    changes: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import REGISTRY

    from secure_pg_backend import metrics

    assert metrics.install()
    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca)
    entry = server.database_settings(options={"connect_retry": 0.6})
    endpoint = f"127.0.0.1:{server.port}"
    caplog.set_level(logging.DEBUG, logger="secure_pg_backend")
    server.kill()

    first, error = _held(make_wrapper(entry, alias="first"))
    assert isinstance(error, OperationalError) and "Connection refused" in str(error)
    # The budget was spent retrying (counted, not timed: the jittered delays end it anywhere
    # in its last half), and no longer than the budget and a last attempt.
    retries_logged = [r for r in caplog.records if getattr(r, "retry_attempt", None)]
    assert len(retries_logged) >= 2
    assert first < 2.0
    assert _state(endpoint)["state"] == retries.OPEN and _state(endpoint)["openings"] == 1
    assert [c["state"] for c in changes] == [retries.OPEN]
    opened = [r for r in caplog.records if getattr(r, "breaker_state", None) == retries.OPEN]
    assert len(opened) == 1 and opened[0].levelno == logging.WARNING  # one line, not per retry
    assert REGISTRY.get_sample_value("secure_pg_backend_breaker_open", {"endpoint": endpoint}) == 1

    # Open: one attempt (a probe), no retry, no wait; the same class and words as before.
    retried: list[object] = []
    signals.connection_retried.connect(
        lambda **kw: retried.append(kw), weak=False, dispatch_uid="b"
    )
    try:
        second, again = _held(make_wrapper(entry, alias="second"))
    finally:
        signals.connection_retried.disconnect(dispatch_uid="b")
    assert isinstance(again, OperationalError) and str(again) == str(error)
    assert second < 0.25 and retried == []
    assert _state(endpoint)["openings"] == 1  # a failed probe keeps it open, not a new opening

    server.start_again()
    _, ok = _held(make_wrapper(entry, alias="third"))  # the probe that succeeds
    assert ok is None
    assert _state(endpoint)["state"] == retries.CLOSED
    assert [c["state"] for c in changes] == [retries.OPEN, retries.CLOSED]
    assert REGISTRY.get_sample_value("secure_pg_backend_breaker_open", {"endpoint": endpoint}) == 0
    openings = "secure_pg_backend_breaker_openings_total"
    assert REGISTRY.get_sample_value(openings, {"endpoint": endpoint}) == 1
    assert_no_secret(*(r.getMessage() for r in caplog.records))


def test_one_probe_at_a_time_the_others_fail_at_once(
    ca: TestCA, make_wrapper: Wrapper, silent: Callable[[], Silent]
) -> None:
    """A black-holed endpoint: the probe waits for its timeout, everyone else fails at once
    and sends nothing."""
    hole = silent()
    entry = _entry(ca, "127.0.0.1", str(hole.port), connect_timeout=2, connect_retry=0.2)
    held, error = _held(make_wrapper(entry, alias="opener"))
    assert isinstance(error, OperationalError) and "timeout expired" in str(error)
    assert held <= 2.5  # one attempt, bounded by the deadline
    assert _state(f"127.0.0.1:{hole.port}")["state"] == retries.OPEN
    accepted = hole.accepted

    outcome: list[BaseException | None] = []
    probe = threading.Thread(target=lambda: outcome.append(_held(make_wrapper(entry))[1]))
    probe.start()
    for _ in range(100):  # until the probe's TCP connection is in
        if hole.accepted > accepted:
            break
        time.sleep(0.02)
    fast, refused = _held(make_wrapper(entry, alias="meanwhile"))
    during_probe = hole.accepted
    hole.close()  # the probe's fate is not the point: end it now instead of at its timeout
    probe.join(10)
    assert isinstance(refused, OperationalError) and "timeout expired" in str(refused)
    assert fast < 0.2
    assert during_probe == accepted + 1  # the probe only
    assert isinstance(outcome[0], OperationalError)


def test_the_breaker_is_shared_by_the_pool(
    ca: TestCA, start_server: Callable[..., TLSPostgres], make_wrapper: Wrapper
) -> None:
    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca)
    entry = server.database_settings(options={"connect_retry": 0.4})
    server.kill()
    _, error = _held(make_wrapper(entry, alias="plain"))
    assert error is not None
    pool = {"min_size": 1, "max_size": 2, "timeout": 5}
    pooled = {**entry, "OPTIONS": {**entry["OPTIONS"], "pool": pool}}
    wrapper = make_wrapper(pooled, alias="pooled")
    server.start_again()
    wrapper.ensure_connection()  # the pool's connect is the probe: it closes the breaker
    assert _state(f"127.0.0.1:{server.port}")["state"] == retries.CLOSED


def test_a_forked_child_starts_with_every_breaker_closed(ca: TestCA, make_wrapper: Wrapper) -> None:
    entry = _entry(ca, "127.0.0.1", str(free_port()), connect_retry=0.2)
    _, error = _held(make_wrapper(entry))
    assert error is not None and retries.breakers()[0]["state"] == retries.OPEN
    retries.BUCKET.take(retries.RETRY_COST)
    pid = os.fork()
    if pid == 0:  # the child: a fresh state, the parent's untouched
        fresh = not retries.breakers() and retries.BUCKET.tokens == retries.BUCKET.capacity
        os._exit(0 if fresh else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert retries.breakers()[0]["state"] == retries.OPEN


# -- the deadline ------------------------------------------------------------------------
def test_two_black_holed_hosts_end_by_the_deadline(
    ca: TestCA, make_wrapper: Wrapper, silent: Callable[[], Silent]
) -> None:
    """connect_timeout=4 and two hosts that never answer: libpq would give each host 4 s
    (8 s in all, as stock takes); the pipeline ends the connect by 4 s, 2 s a host."""
    holes = [silent(), silent()]
    entry = _entry(
        ca, "127.0.0.1,127.0.0.1", ",".join(str(h.port) for h in holes), connect_timeout=4
    )
    held, error = _held(make_wrapper(entry))
    assert isinstance(error, OperationalError)
    assert held <= retries.deadline(4, 2) + 0.5  # type: ignore[operator]
    assert [h.accepted for h in holes] == [1, 1]  # both hosts were tried


def test_the_deadline_and_the_shares() -> None:
    assert retries.deadline("10") == 10.0
    assert retries.deadline("1") == 2.0  # libpq reads 1 as 2
    assert retries.deadline("3", hosts=3) == 6.0  # 2 s for each host at least
    assert retries.deadline("0") is None and retries.deadline(None) is None
    now = [100.0]
    endpoints = (("a", "1"), ("b", "2"), ("c", "3"))
    retry = retries.Retry(5.0, lambda: now[0], limit=10.0, endpoints=endpoints)
    params = {"host": "a,b,c", "port": "1,2,3", "connect_timeout": "10"}
    first = retry.params_for(params)
    assert first is not None and first["connect_timeout"] == "3"  # 3 hosts x 3 s <= 10 s
    now[0] += 3.5
    later = retry.params_for(params)
    assert later is not None and later["connect_timeout"] == "2"  # 6.5 s left for 3: 2 each
    now[0] += 1.0
    assert retry.params_for(params) is None  # 5.5 s left: not 2 s for each of the 3
    assert retry.spent()


def test_open_breakers_and_recent_timeouts_go_last() -> None:
    endpoints = (("a", "1"), ("b", "2"), ("c", "3"))
    params = {"host": "a,b,c", "port": "1,2,3", "hostaddr": "10.0.0.1,10.0.0.2,10.0.0.3"}
    assert retries.order_hosts(params, endpoints) == params  # nothing known: as given
    retries.BREAKERS.trip((("a", "1"),), psycopg.OperationalError("Connection refused"), 5.0)
    timeout = psycopg.OperationalError(
        "connection timeout expired\nMultiple connection attempts failed. All failures were:\n"
        "- host: 'b', port: '2', hostaddr: '10.0.0.2': connection timeout expired"
    )
    retries.BREAKERS.note(endpoints, timeout)
    assert retries.order_hosts(params, endpoints) == {
        "host": "c,b,a",
        "port": "3,2,1",
        "hostaddr": "10.0.0.3,10.0.0.2,10.0.0.1",
    }
    one_port = {"host": "a,b,c", "port": "5432"}
    shaped = retries.order_hosts(one_port, tuple((h, "5432") for h in "abc"))
    assert shaped["port"] == "5432"


# -- the bucket ----------------------------------------------------------------------------
def test_retries_draw_from_the_bucket_and_successes_refill_it() -> None:
    retries.BUCKET.tokens = retries.RETRY_COST  # one retry left
    retry = retries.Retry(5.0)
    refused = causes.classify(psycopg.OperationalError("Connection refused"))
    assert retry.wait(refused) is not None  # drawn
    assert retry.wait(refused) is None  # empty: no retry, the failure is raised as stock
    crowded = causes.classify(psycopg.OperationalError("FATAL:  sorry, too many clients"))
    retries.BUCKET.tokens = retries.CROWDED_COST
    wait = retry.wait(crowded)
    assert wait is not None and wait >= retries.CROWDED_FIRST_DELAY / 2  # a longer delay
    assert retries.BUCKET.tokens == 0
    retry.succeeded()  # refunds what this connect drew, and one more
    assert retries.BUCKET.tokens == retries.RETRY_COST + retries.CROWDED_COST + 1
    assert retries.BUCKET_CAPACITY / retries.RETRY_COST >= 100  # a 1-s restart, 8 threads


# -- the health check ----------------------------------------------------------------------
def test_the_health_check_names_the_open_breaker(
    ca: TestCA, start_server: Callable[..., TLSPostgres], aliases: Callable[..., None]
) -> None:
    from health_check.exceptions import ServiceUnavailable

    from secure_pg_backend.contrib.health_check import VerifiedTLS

    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca)
    aliases(hc_down=server.database_settings(options={"connect_retry": 0.3}))
    server.kill()
    with pytest.raises(ServiceUnavailable) as first:
        VerifiedTLS(alias="hc_down").run()  # spends the budget: the breaker opens
    begin = time.monotonic()
    with pytest.raises(ServiceUnavailable) as second:
        VerifiedTLS(alias="hc_down").run()  # a probe: one attempt, at once
    assert time.monotonic() - begin < 0.25
    for failed in (first.value, second.value):  # the first check's failure opened it
        assert "Connection refused" in str(failed)
        assert f"circuit breaker: 127.0.0.1:{server.port} open for" in str(failed)
    assert_no_secret(str(first.value), str(second.value))


# -- the docs state the code's numbers ---------------------------------------------------------
def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 0.5 else f"{value:g} s"


def test_the_docs_state_the_codes_numbers() -> None:
    """docs/reliability.md states every bound as the code enforces it (issue 30)."""
    from pathlib import Path

    text = " ".join((Path(__file__).parents[1] / "docs" / "reliability.md").read_text().split())
    stated = [
        f"double from {_seconds(retries.FIRST_DELAY)} to at most {_seconds(retries.MAX_DELAY)}",
        f'after "too many clients" from {_seconds(retries.CROWDED_FIRST_DELAY)} to at most '
        f"{_seconds(retries.CROWDED_MAX_DELAY)}",
        f"(default {retries.DEFAULT_RETRY_BUDGET:g},",
        f"D = max(connect_timeout, {retries.MIN_ATTEMPT} \N{MULTIPLICATION SIGN} H)",
        f"reads less than {retries.MIN_ATTEMPT} as {retries.MIN_ATTEMPT}",
        f"within the last {breakers.RECENT_TIMEOUT:g} s",
        f"{retries.BUCKET_CAPACITY:g} tokens",
        f'A retry costs {retries.RETRY_COST:g} tokens, a retry after "too many clients" '
        f"{retries.CROWDED_COST:g}",
        f"plus {retries.SUCCESS_REFILL:g}.",
        f"pays for {retries.BUCKET_CAPACITY / retries.RETRY_COST:g} retries",
    ]
    missing = [claim for claim in stated if claim not in text]
    assert not missing, missing
    assert "to at most 1 s" not in text and "doubling to 1 s" not in text


def test_a_refusals_diagnosis_fits_in_what_is_left_of_the_deadline() -> None:
    from secure_pg_backend import diagnose

    token = retries._FAILED_BY.set(time.monotonic() + 0.5)
    try:
        assert diagnose._timeout({"connect_timeout": "10"}) <= 0.5
    finally:
        retries._FAILED_BY.reset(token)
    assert diagnose._timeout({"connect_timeout": "10"}) == diagnose.PROBE_TIMEOUT

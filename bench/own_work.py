"""The backend's own work: reading ``tls_info``, and per new connection, hot and cold.

Not a comparison of whole operations: these isolate what secure_pg_backend adds (the
policy in ``get_connection_params``, the post-handshake check and the log decision), which
explains the connect ratio without the handshake's noise around it.

Hot (in a loop) is what the code costs at best. A new connection runs it cold: the TLS
handshake and the SCRAM exchange between two connects evict it from the caches, which makes
the same steps five to ten times dearer. ``measure_own_work_cold`` times single calls after
evicting the caches, as a new connection meets them.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.common import SECURE, STOCK, STOCK_B, Loop, Plan, in_us, interleaved
from secure_pg_backend import pipeline, psycopg_connect


def measure_tls_info(plan: Plan) -> dict[str, Any]:
    """``tls_info``: microseconds per read of ``connection.tls_info`` on an open connection."""
    from django.db import connections

    conn: Any = connections[SECURE]
    conn.ensure_connection()

    def read_tls_info(n: int) -> None:
        for _ in range(n):
            conn.tls_info  # noqa: B018 - the read is what is measured

    per_call = interleaved({"tls_info": read_tls_info}, plan.micro_rounds, plan.micro_iters)
    conn.close()
    return {"tls_info": in_us(per_call["tls_info"])}


def _params_loop(wrapper: Any) -> Loop:
    def run(n: int) -> None:
        for _ in range(n):
            wrapper.get_connection_params()

    return run


def measure_own_work(plan: Plan) -> dict[str, Any]:
    """``own_work``: ``get_connection_params`` secure vs stock, and the post-handshake check."""
    from django.db import connections

    secure: Any = connections[SECURE]
    stock = connections[STOCK]
    secure.ensure_connection()

    def verify_loop(n: int) -> None:
        for _ in range(n):
            pipeline.verify(
                secure._plan(), secure.connection
            )  # the post-handshake check + log decision

    per_round = interleaved(
        {SECURE: _params_loop(secure), STOCK: _params_loop(stock), "verify": verify_loop},
        plan.micro_rounds,
        plan.micro_iters // 10,
    )
    secure.close()
    return {"own_work": {name: in_us(values) for name, values in per_round.items()}}


_EVICT = bytearray(16 * 2**20)  # larger than this machine's last-level cache


def _cold_times(step: Callable[[], object], calls: int) -> list[int]:
    """CPU nanoseconds of each call of ``step``, each right after the caches were evicted."""
    times = []
    gc.disable()
    try:
        for _ in range(calls):
            _evict()
            start = time.thread_time_ns()
            step()
            times.append(time.thread_time_ns() - start)
    finally:
        gc.enable()
    return times


def _cold(step: Callable[[], object], calls: int) -> float:
    """Median CPU microseconds of one call of ``step`` right after the caches were evicted."""
    return statistics.median(_cold_times(step, calls)) / 1000


def _evict() -> None:
    _EVICT[::4096] = bytes(len(range(0, len(_EVICT), 4096)))  # a store in each page
    bytes(_EVICT)  # and a copy streamed through every level


@contextlib.contextmanager
def _libpq_work_left_out(
    wrappers: list[Any], per_alias: int = 8, inside: Callable[[], object] | None = None
) -> Iterator[list[str]]:
    """``psycopg.connect`` (stock's) and ``psycopg_connect.connect`` (the secure backend's:
    psycopg's connect without its parse-backs) hand out connections each wrapper opened
    beforehand, and their ``close`` keeps them open: a wrapper's ``ensure_connection`` +
    ``close`` is then everything a new connection runs but psycopg's connect, libpq's and the
    server's work. Yields the alias to hand to.

    ``inside``: run by each hand-out, where libpq would run (an eviction of the caches, or a
    real connection), so that what runs after libpq returns (the link's check, the session
    setup) meets the caches as a real connect leaves them."""
    import psycopg

    opened: dict[str, list[Any]] = {}
    for wrapper in wrappers:
        for _ in range(per_alias):
            wrapper.ensure_connection()
            opened.setdefault(wrapper.alias, []).append(wrapper.connection)
            wrapper.connection = None  # kept open for the hand-outs below
    turns = {alias: itertools.cycle(held) for alias, held in opened.items()}
    current = [wrappers[0].alias]
    connect, close = psycopg.connect, psycopg.Connection.close

    def hand_out(conninfo: str = "", **kwargs: Any) -> Any:
        if inside is not None:
            inside()
        return next(turns[current[0]])

    def hand_out_judged(cls: Any, kwargs: Any, strings: Any) -> Any:
        return hand_out()

    judged_connect = psycopg_connect.connect
    psycopg.connect = hand_out
    psycopg_connect.connect = hand_out_judged
    psycopg.Connection.close = lambda self: None  # type: ignore[method-assign]
    try:
        yield current
    finally:
        psycopg.connect, psycopg.Connection.close = connect, close  # type: ignore[method-assign]
        psycopg_connect.connect = judged_connect
        for held in opened.values():
            for connection in held:
                connection.close()


def measure_connect_own_work_cold(plan: Plan) -> dict[str, Any]:
    """``connect_own_work_cold``: a whole new connection (``ensure_connection`` + ``close``)
    without libpq's work, secure and stock alternating, each call with cold caches: what the
    backend adds per connection, retry object and calls between the steps included, without
    the TLS handshake's noise (CPU microseconds, median, and the median of paired differences).
    ``connect_own_work_cold_twice``: the same with the caches evicted again where libpq would
    run (``_libpq_work_left_out(evict_inside=True)``), as in a real connect; the eviction's own
    time is in both sides of each pair and cancels in the difference.
    """
    return {
        "connect_own_work_cold": _connect_cold(plan, evict_inside=False),
        "connect_own_work_cold_twice": _connect_cold(plan, evict_inside=True),
    }


def _connect_cold(plan: Plan, evict_inside: bool) -> dict[str, Any]:
    from django.db import connections

    secure: Any = connections[SECURE]
    stock: Any = connections[STOCK]
    calls = max(20, plan.micro_rounds * 2)
    times: dict[str, list[int]] = {SECURE: [], STOCK: []}
    inside = _evict if evict_inside else None
    with _libpq_work_left_out([secure, stock], inside=inside) as current:
        for round_ in range(calls):
            pair = (secure, stock) if round_ % 2 else (stock, secure)
            for wrapper in pair:
                current[0] = wrapper.alias

                def step(wrapper: Any = wrapper) -> None:
                    wrapper.ensure_connection()
                    wrapper.close()

                times[wrapper.alias] += _cold_times(step, 1)
    diffs = [(a - b) / 1000 for a, b in zip(times[SECURE], times[STOCK], strict=True)]
    return {
        SECURE: statistics.median(times[SECURE]) / 1000,
        STOCK: statistics.median(times[STOCK]) / 1000,
        "diff": statistics.median(diffs),
        "calls": calls,
    }


def measure_connect_own_work_handshake(plan: Plan) -> dict[str, Any]:
    """``connect_own_work_handshake``: as ``connect_own_work_cold``, with real connections in
    place of the evictions: before each call, and where libpq would run, a connection is opened
    and closed with the stock alias's parameters (raw psycopg: a TLS handshake, a SCRAM
    exchange), and the CPU of the one inside is taken out of the call's. So the backend's steps
    meet caches a real connect has evicted, without the handshake's own variation in the
    figure. The connection inside is a whole second psycopg connect and close, so it evicts
    more than a real connect's handshake does and the figure reads above the client CPU it
    models: a tool for comparing two versions of the code, not the target's measurement.
    secure, stock and stock_b (the A/A pair) alternating; CPU microseconds, medians of the
    per-round differences against stock."""
    import psycopg
    from django.db import connections

    wrappers: list[Any] = [connections[SECURE], connections[STOCK], connections[STOCK_B]]
    raw = wrappers[1].get_connection_params()
    open_raw, close_raw = psycopg.Connection.connect, psycopg.Connection.close
    spent = [0]

    def real_connection() -> None:
        start = time.thread_time_ns()
        close_raw(open_raw(**raw))
        spent[0] += time.thread_time_ns() - start

    calls = max(30, plan.micro_rounds * 8)
    times: dict[str, list[int]] = {wrapper.alias: [] for wrapper in wrappers}
    gc.disable()
    try:
        with _libpq_work_left_out(wrappers, inside=real_connection) as current:
            for round_ in range(calls):
                shift = round_ % len(wrappers)
                for wrapper in wrappers[shift:] + wrappers[:shift]:
                    current[0] = wrapper.alias
                    close_raw(open_raw(**raw))  # the caches as the previous connect leaves them
                    spent[0] = 0
                    start = time.thread_time_ns()
                    wrapper.ensure_connection()
                    wrapper.close()
                    times[wrapper.alias].append(time.thread_time_ns() - start - spent[0])
    finally:
        gc.enable()

    def against_stock(alias: str) -> float:
        pairs = zip(times[alias], times[STOCK], strict=True)
        return statistics.median((a - b) / 1000 for a, b in pairs)

    return {
        "connect_own_work_handshake": {
            SECURE: statistics.median(times[SECURE]) / 1000,
            STOCK: statistics.median(times[STOCK]) / 1000,
            "diff": against_stock(SECURE),
            "aa": against_stock(STOCK_B),
            "calls": calls,
        }
    }


def measure_own_work_cold(plan: Plan) -> dict[str, Any]:
    """``own_work_cold``: the per-connection steps, one call at a time with cold caches."""
    from django.db import connections

    secure: Any = connections[SECURE]
    stock = connections[STOCK]
    secure.ensure_connection()
    attempt, params = secure._plan(), secure.get_connection_params()
    steps: dict[str, Callable[[], object]] = {
        "nothing": lambda: None,  # the timing's own floor
        "stock_params": stock.get_connection_params,
        "secure_params": secure.get_connection_params,
        "judge": lambda: pipeline.judge(attempt, params),
        "check_files": lambda: pipeline.check_files(attempt),
        "verify": lambda: pipeline.verify(attempt, secure.connection),
    }
    calls = max(20, plan.micro_rounds * 2)
    out = {name: _cold(step, calls) for name, step in steps.items()}
    secure.close()
    return {"own_work_cold": out}

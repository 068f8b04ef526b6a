"""What every measurement shares: aliases, the run plan, interleaved A/B timing, statistics.

Timed comparisons alternate the variants round by round in one process (AB, BA, AB, ...)
so machine drift hits both equally; each figure is the median (and min/max) of per-round
means.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Aliases. "secure" and "stock" differ only in ENGINE; "stock_b" is a second, identical stock
# alias (the A/A run: what two identical variants differ by is the noise); "plain" is stock
# without TLS.
SECURE, STOCK, STOCK_B, PLAIN = "secure", "stock", "stock_b", "plain"
COUNT_SECURE, COUNT_STOCK = "count_secure", "count_stock"
REQ_AGE0, REQ_AGE60, REQ_POOL = "req_age0", "req_age60", "req_pool"

SECURE_ENGINE, STOCK_ENGINE = "secure_pg_backend", "django.db.backends.postgresql"

# Identical for both ENGINEs: what secure_pg_backend forces, spelled out for the stock one.
TLS_OPTIONS = {
    "sslmode": "verify-full",
    "gssencmode": "disable",
    "ssl_min_protocol_version": "TLSv1.2",
    "connect_timeout": "10",  # the secure default: stock gets it too (libpq's timer costs CPU)
}


@dataclass(frozen=True)
class Plan:
    """Rounds and calls per variant per round. Timed A/B comparisons use many short rounds:
    a burst of load from another process then spoils a few rounds, which the median drops,
    instead of landing in every round's mean."""

    connect_rounds: int
    connect_iters: int
    cpu_processes: int  # fresh processes for the client CPU's per-process spread
    cpu_process_rounds: int  # rounds of connect_iters connects per variant in each
    footprint_connects: int  # connects per child under callgrind (``footprint``)
    query_rounds: int
    query_iters: int
    micro_rounds: int  # tls_info and the backend's own work, timed in batches
    micro_iters: int
    request_rounds: int
    request_iters: dict[str, int]
    rss_warmup: int
    rss_cycles: int
    count_connections: int
    cold_start_rounds: int  # fresh processes per ENGINE
    negotiation_rounds: int  # connects through the delaying proxy, per variant
    negotiation_iters: int


FULL = Plan(
    connect_rounds=401,
    connect_iters=4,
    cpu_processes=7,
    cpu_process_rounds=151,
    footprint_connects=40,
    query_rounds=501,
    query_iters=20,
    micro_rounds=31,
    micro_iters=100_000,
    request_rounds=31,
    request_iters={REQ_AGE0: 20, REQ_AGE60: 200, REQ_POOL: 200},
    rss_warmup=500,
    rss_cycles=10_000,
    count_connections=10,
    cold_start_rounds=81,
    negotiation_rounds=81,
    negotiation_iters=2,
)
QUICK = Plan(
    connect_rounds=15,
    connect_iters=2,
    cpu_processes=2,
    cpu_process_rounds=10,
    footprint_connects=2,
    query_rounds=25,
    query_iters=10,
    micro_rounds=5,
    micro_iters=10_000,
    request_rounds=5,
    request_iters={REQ_AGE0: 5, REQ_AGE60: 50, REQ_POOL: 50},
    rss_warmup=50,
    rss_cycles=300,
    count_connections=2,
    cold_start_rounds=3,
    negotiation_rounds=5,
    negotiation_iters=1,
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def in_us(values: Sequence[float]) -> dict[str, float]:
    """``summary`` of per-call seconds, in microseconds (``n`` stays a count)."""
    return {k: v * 1e6 if k != "n" else v for k, v in summary(values).items()}


# -- interleaved A/B timing --------------------------------------------------------
Loop = Callable[[int], None]
Step = Callable[[], None]


def interleaved(
    variants: dict[str, Loop],
    rounds: int,
    iters: int | dict[str, int],
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Per-round mean seconds per iteration, for each variant, timed in batches.

    Every round runs each variant's batch once, the order rotating each round (AB, BA, ...),
    so drift and "who goes first" affect all variants alike; batches (not single calls)
    keep each variant's server process warm, as in real use. One untimed warm-up batch
    first; the collector runs between batches, not inside them (as ``timeit`` does).
    ``cpu``, if given, also gets this thread's CPU time per iteration (no waiting, no
    preemption: the client's own work, much less noisy than wall time).
    """
    names = list(variants)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    counts = iters if isinstance(iters, dict) else dict.fromkeys(names, iters)
    for name in names:  # warm-up: caches, first-connection log line, pool start
        variants[name](max(1, counts[name] // 4))
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                gc.disable()
                start, start_cpu = time.perf_counter(), time.thread_time()
                variants[name](counts[name])
                elapsed = time.perf_counter() - start
                elapsed_cpu = time.thread_time() - start_cpu
                gc.enable()
                per_round[name].append(elapsed / counts[name])
                if cpu is not None:
                    cpu.setdefault(name, []).append(elapsed_cpu / counts[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return per_round


def repeat(step: Step) -> Loop:
    def run(n: int) -> None:
        for _ in range(n):
            step()

    return run


def ab(make: Callable[[str], Step], a: str, b: str, rounds: int, iters: int) -> dict[str, Any]:
    """Compare two aliases on the same operation: interleaved rounds, ratio a/b of medians."""
    cpu: dict[str, list[float]] = {}
    per_round = interleaved({a: repeat(make(a)), b: repeat(make(b))}, rounds, iters, cpu)
    return compare(a, b, per_round, cpu)


def paired_cpu(cpu: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    """Client CPU of ``a`` against ``b`` from the same rounds: the median of per-round ratios
    and of per-round differences (µs), with their spread."""
    ratios = [x / y for x, y in zip(cpu[a], cpu[b], strict=True)]
    diffs = [(x - y) * 1e6 for x, y in zip(cpu[a], cpu[b], strict=True)]
    return {
        "median_ratio": statistics.median(ratios),
        "median_diff_us": statistics.median(diffs),
        "diff_us": summary(diffs),
        "ratio": summary(ratios),
        "rounds": len(ratios),
    }


def compare(
    a: str, b: str, per_round: dict[str, list[float]], cpu: dict[str, list[float]] | None = None
) -> dict[str, Any]:
    """Medians, min/max (microseconds) and the ratio a/b of medians."""
    out: dict[str, Any] = {}
    if cpu:
        out["client_cpu_median_us"] = {name: statistics.median(cpu[name]) * 1e6 for name in (a, b)}
    for name in (a, b):
        out[name] = in_us(per_round[name])
    out["ratio"] = out[a]["median"] / out[b]["median"]
    # Same-round ratios too: less sensitive to slow drift, shown for information only.
    paired = [x / y for x, y in zip(per_round[a], per_round[b], strict=True)]
    out["paired_ratio"] = summary(paired)
    return out


# -- the machine -------------------------------------------------------------------
def version_text(number: int) -> str:
    """libpq's and the server's version numbers (180006) as text (18.6)."""
    return f"{number // 10000}.{number % 10000}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _libpq_openssl() -> str | None:
    """The OpenSSL version string of the libpq psycopg loaded (None if not reachable)."""
    try:
        import ctypes

        from secure_pg_backend import libpq

        fn = libpq.loaded_libpq().OpenSSL_version
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_int]
        return str(fn(0).decode())
    except Exception:
        return None


def machine() -> dict[str, Any]:
    import django
    import psycopg
    from django.db import connections

    secure: Any = connections[SECURE]  # a secure_pg_backend wrapper
    info = secure.tls_info
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
        "libpq": version_text(psycopg.pq.version()),
        "libpq_openssl": _libpq_openssl(),
        "postgresql_server": version_text(secure.pg_version),
        "tls": f"{info.protocol} {info.cipher}",
        "server_key": "ECDSA P-256 (trustme)",
        "auth": "scram-sha-256 over TCP 127.0.0.1",
    }

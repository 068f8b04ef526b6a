"""Memory: RSS growth over many secure connect/close cycles (a leak shows as steady growth).

RSS is read from ``/proc/self/statm`` after a warm-up and after the cycles, with
``gc.collect()`` before each reading; ten readings in between show the trend.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from bench.common import SECURE, Plan
from bench.latency import connect_step


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(plan: Plan) -> dict[str, Any]:
    """``rss``: bytes before and after ``plan.rss_cycles`` cycles, and the trace between."""
    cycle = connect_step(SECURE)
    for _ in range(plan.rss_warmup):
        cycle()
    gc.collect()
    before = rss_bytes()
    trace = []
    for done in range(1, plan.rss_cycles + 1):
        cycle()
        if done % max(1, plan.rss_cycles // 10) == 0:
            trace.append(rss_bytes())
    gc.collect()
    after = rss_bytes()
    return {
        "rss": {
            "warmup": plan.rss_warmup,
            "cycles": plan.rss_cycles,
            "before_bytes": before,
            "after_bytes": after,
            "growth_bytes": after - before,
            "trace_bytes": trace,
        }
    }

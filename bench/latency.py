"""Latency: new connections, ``select 1`` and an ORM query, secure vs stock; and what TLS costs.

Both ENGINEs talk to the same server with identical libpq settings, alternating round by
round (``common.ab``). The same steps, stock with TLS against stock without, show the
price of TLS itself.
"""

from __future__ import annotations

from typing import Any

from bench.common import (
    PLAIN,
    SECURE,
    STOCK,
    STOCK_B,
    Plan,
    Step,
    ab,
    compare,
    interleaved,
    paired_cpu,
    repeat,
)


def connect_step(alias: str) -> Step:
    from django.db import connections

    conn = connections[alias]

    def step() -> None:
        conn.ensure_connection()
        conn.close()

    return step


def select_one_step(alias: str) -> Step:
    from django.db import connections

    conn = connections[alias]
    conn.ensure_connection()

    def step() -> None:
        with conn.cursor() as cursor:
            cursor.execute("select 1")
            cursor.fetchone()

    return step


def orm_step(alias: str) -> Step:
    from django.contrib.contenttypes.models import ContentType
    from django.db import connections

    connections[alias].ensure_connection()
    queryset = ContentType.objects.using(alias).filter(
        app_label="contenttypes", model="contenttype"
    )

    def step() -> None:
        queryset.first()  # a fresh query each time: first() clones the queryset

    return step


def measure_connect(plan: Plan) -> dict[str, Any]:
    """``connect``: ``ensure_connection()`` + ``close()``, secure against stock; and
    ``connect_cpu``: the client's CPU per new connection, secure against stock beside stock
    against an identical stock alias (A/A: the noise), from the same rotating rounds."""
    cpu: dict[str, list[float]] = {}
    variants = {alias: repeat(connect_step(alias)) for alias in (SECURE, STOCK, STOCK_B)}
    per_round = interleaved(variants, plan.connect_rounds, plan.connect_iters, cpu)
    return {
        "connect": compare(SECURE, STOCK, per_round, cpu),
        "connect_aa": compare(STOCK_B, STOCK, per_round, cpu),
        "connect_cpu": {
            "secure_vs_stock": paired_cpu(cpu, SECURE, STOCK),
            "stock_vs_stock": paired_cpu(cpu, STOCK_B, STOCK),
        },
    }


def measure_queries(plan: Plan) -> dict[str, Any]:
    """``select_one`` and ``orm`` on an open connection, secure against stock."""
    queries = plan.query_rounds, plan.query_iters
    return {
        "select_one": ab(select_one_step, SECURE, STOCK, *queries),
        "orm": ab(orm_step, SECURE, STOCK, *queries),
    }


def measure_tls_cost(plan: Plan) -> dict[str, Any]:
    """The stock backend with verify-full TLS against ``sslmode=disable``."""
    return {
        "tls_cost_connect": ab(connect_step, STOCK, PLAIN, plan.connect_rounds, plan.connect_iters),
        "tls_cost_query": ab(select_one_step, STOCK, PLAIN, plan.query_rounds, plan.query_iters),
    }

"""Latency: new connections, ``select 1`` and an ORM query, secure vs stock; and what TLS costs.

Both ENGINEs talk to the same server with identical libpq settings, alternating round by
round (``common.ab``). The same steps, stock with TLS against stock without, show the
price of TLS itself.
"""

from __future__ import annotations

from typing import Any

from bench.common import PLAIN, SECURE, STOCK, Plan, Step, ab


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
    """``connect``: ``ensure_connection()`` + ``close()``, secure against stock."""
    return {"connect": ab(connect_step, SECURE, STOCK, plan.connect_rounds, plan.connect_iters)}


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

"""The backend's own work, timed hot in a loop: reading ``tls_info``, and per new connection.

Not a comparison of whole operations: these isolate what secure_pg_backend adds (the
policy in ``get_connection_params``, the post-handshake check and the log decision), which
explains the connect ratio without the handshake's noise around it.
"""

from __future__ import annotations

from typing import Any

from bench.common import SECURE, STOCK, Loop, Plan, in_us, interleaved
from secure_pg_backend import pipeline


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

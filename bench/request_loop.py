"""Requests per second through Django's test client: one ORM query per request.

Three ways to hold connections, all secure_pg_backend: a new TLS connection per request
(``CONN_MAX_AGE=0``), a persistent one (``CONN_MAX_AGE=60``) and Django's pool. This
module is also the benchmark's ``ROOT_URLCONF``.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import path

from bench.common import REQ_AGE0, REQ_AGE60, REQ_POOL, Loop, Plan, interleaved, summary

ALIASES = (REQ_AGE0, REQ_AGE60, REQ_POOL)


def one_query_view(request: HttpRequest, alias: str) -> HttpResponse:
    from django.contrib.contenttypes.models import ContentType

    found = ContentType.objects.using(alias).filter(app_label="contenttypes").first()
    return HttpResponse(found.model if found else "-", content_type="text/plain")


urlpatterns = [path("q/<str:alias>/", one_query_view)]


def request_loop(alias: str) -> Loop:
    from django.db import close_old_connections
    from django.test import Client

    client = Client()
    url = f"/q/{alias}/"

    def run(n: int) -> None:
        for _ in range(n):
            response = client.get(url)
            if response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}")
            # The test client deliberately skips close_old_connections so tests keep their
            # connection; a WSGI server runs it on request_finished, so do it here.
            close_old_connections()

    return run


def measure(plan: Plan) -> dict[str, Any]:
    """``requests``: requests/s per alias (median, min, max of per-round rates)."""
    from django.db import connections

    for alias in connections:
        connections[alias].close()
    per_round = interleaved(
        {alias: request_loop(alias) for alias in ALIASES},
        plan.request_rounds,
        plan.request_iters,
    )
    for alias in connections:
        connections[alias].close()
    pooled: Any = connections[REQ_POOL]
    pooled.close_pool()
    return {
        "requests": {
            alias: summary([1 / seconds for seconds in values])
            for alias, values in per_round.items()
        }
    }

"""The layout's promises (docs/development.md), measured rather than read off the imports.

One connection's path crosses the modules in ``PATH``: the package modules whose functions run
while a wrapper opens, verifies and announces one connection with default settings. Plain and pooled
connections run the same attempt pipeline functions.
"""

from __future__ import annotations

import logging
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from secure_pg_backend.testing import TLSPostgres

# Top-level modules (the policy package counted once: its five modules each hold one job).
PATH = {
    "base",
    "pipeline",
    "retry",
    "breakers",
    "policy",
    "files",
    "certificates",
    "errors",
    "libpq",
    "psycopg_connect",
    "handshake",
    "signals",
    "lifecycle",
}
# Every step of one attempt (docs/development.md): what plain and pooled connections share.
ATTEMPT = {
    "pipeline.connect",
    # The retry object's loop: budget, bucket and the endpoints' breakers (asked only while one
    # is open or once an endpoint failed: tests/test_breaker.py runs them on both paths).
    "retry.loop",
    "retry.params_for",  # the deadline: each libpq call gets what is left
    "pipeline.attempt",
    "pipeline.check_files",
    "pipeline._opened",
    "pipeline.judge",
    "psycopg_connect.connect",  # libpq handed the judged parameters' own connection string,
    "psycopg_connect._open",  # by the adapter itself, not by psycopg's whole connect
    "pipeline.verify",
    "handshake.negotiate",
    "handshake.read_facts",
    "handshake.check_link",
}
# Receivers of connection_verified (the app installs the metrics when prometheus_client is
# importable): observers of the path, not steps of it.
RECEIVERS = {"metrics"}


calls: set[str] = set()  # module.function, of the last _modules_run


def _modules_run(action: Callable[[], object]) -> set[str]:
    seen: set[str] = set()
    calls.clear()

    def profile(frame: types.FrameType, event: str, arg: Any) -> None:
        name = frame.f_globals.get("__name__", "")
        if event == "call" and name.startswith("secure_pg_backend."):
            seen.add(name.removeprefix("secure_pg_backend."))
            calls.add(f"{name.removeprefix('secure_pg_backend.')}.{frame.f_code.co_name}")

    sys.setprofile(profile)
    threading.setprofile(profile)  # the pool's worker threads open its connections
    try:
        action()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        sys.setprofile(None)
    return {name.split(".")[0] for name in seen if not name.startswith("testing")}


@pytest.fixture
def quiet_start_up_line() -> Iterator[None]:
    # The INFO line builds the report (tlsinfo) when emitted; the path is measured without it.
    logger = logging.getLogger("secure_pg_backend")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def test_one_connection_crosses_these_modules(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres, quiet_start_up_line: None
) -> None:
    wrapper = make_wrapper(good_server.database_settings())
    assert _modules_run(wrapper.ensure_connection) - RECEIVERS == PATH
    assert wrapper.connection is not None


def test_plain_and_pooled_connections_run_the_same_attempt(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres, quiet_start_up_line: None
) -> None:
    plain = make_wrapper(good_server.database_settings(), alias="plain")
    _modules_run(plain.ensure_connection)
    assert calls >= ATTEMPT, ATTEMPT - calls
    pooled_settings = good_server.database_settings()
    pooled_settings["OPTIONS"] = {**pooled_settings["OPTIONS"], "pool": {"min_size": 1}}
    pooled = make_wrapper(pooled_settings, alias="pooled")

    _modules_run(pooled.ensure_connection)  # made on a pool worker thread
    assert calls >= ATTEMPT, ATTEMPT - calls
    assert "pool._connect" in calls  # through the pool's adapter, not around it


def test_the_report_adds_only_tlsinfo(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(good_server.database_settings())
    wrapper.ensure_connection()
    assert _modules_run(lambda: wrapper.tls_info) - RECEIVERS <= PATH | {"tlsinfo"}


def test_a_query_on_an_open_connection_runs_only_the_pool_property(db: None) -> None:
    # The backend works once per physical connection: a query (cursor or ORM) is Django's own
    # path, except the pool property Django asks on every cursor, which without a pool answers
    # as Django's does, in one frame. The bench's query ratios can only be noise.
    from django.contrib.contenttypes.models import ContentType
    from django.db import connection

    connection.ensure_connection()

    def queries() -> None:
        with connection.cursor() as cursor:
            cursor.execute("select 1")
            cursor.fetchone()
        ContentType.objects.filter(app_label="auth").first()

    assert _modules_run(queries) == {"base"}
    assert calls == {"base.pool"}

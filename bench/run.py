#!/usr/bin/env python
"""Benchmark: secure_pg_backend against Django's stock PostgreSQL backend.

Run ``make bench`` (or ``.venv/bin/python bench/run.py [--quick] [--json PATH] [--only MODE]``).
It starts its own throwaway TLS PostgreSQL servers (``secure_pg_backend.testing``), configures
Django in this process and compares the two ENGINEs with identical libpq settings, alternating
them round by round (``bench/common.py``). One module per measurement: ``latency``,
``processes``, ``footprint``, ``wire``, ``own_work``, ``memory``, ``request_loop``,
``cold_start``, ``negotiation``; ``report`` renders the tables and judges the targets.

Targets (printed as PASS/FAIL; exit status 1 if one fails, except with ``--quick``):
connect ratio <= 1.02 and query ratio <= 1.01 (secure/stock, medians); 0 extra statements and
0 extra round trips per new connection; ``tls_info`` < 5 us; RSS growth < 2 MB over 10,000
connect/close cycles; cold start ratio <= 1.03; through a proxy adding a 10 ms round trip,
connect <= 0.86 of stock on PostgreSQL 18 (direct TLS by default) and <= 1.01 on PostgreSQL 15
(also at 1 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` from a clone without `pip install -e`
    sys.path.insert(0, str(ROOT))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

from bench import (  # noqa: E402
    footprint,
    latency,
    memory,
    negotiation,
    own_work,
    processes,
    request_loop,
    wire,
)
from bench.common import (  # noqa: E402
    COUNT_SECURE,
    COUNT_STOCK,
    FULL,
    PLAIN,
    QUICK,
    REQ_AGE0,
    REQ_AGE60,
    REQ_POOL,
    SECURE,
    SECURE_ENGINE,
    STOCK,
    STOCK_B,
    STOCK_ENGINE,
    TLS_OPTIONS,
    Plan,
    machine,
    say,
)
from bench.report import check_targets, report  # noqa: E402
from secure_pg_backend.testing import TestCA, TLSPostgres  # noqa: E402

MODES = ("main", "cold-start", "negotiation")


# -- set-up ------------------------------------------------------------------------
def _entry(server: TLSPostgres, engine: str, **extra: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"sslrootcert": server.root_cert, **TLS_OPTIONS}
    opts.update(extra.pop("options", {}))
    return server.database_settings(engine=engine, options=opts, **extra)


def configure(main: TLSPostgres | None, counting: TLSPostgres | None) -> None:
    """Django settings for the main measurements (or, without servers, bare ones)."""
    databases: dict[str, Any] = {}
    if main is not None and counting is not None:
        plain = _entry(main, STOCK_ENGINE)
        plain["OPTIONS"] = {"sslmode": "disable", "gssencmode": "disable"}
        databases = {
            "default": _entry(main, SECURE_ENGINE),
            SECURE: _entry(main, SECURE_ENGINE),
            STOCK: _entry(main, STOCK_ENGINE),
            STOCK_B: _entry(main, STOCK_ENGINE),
            PLAIN: plain,
            COUNT_SECURE: _entry(counting, SECURE_ENGINE),
            COUNT_STOCK: _entry(counting, STOCK_ENGINE),
            REQ_AGE0: _entry(main, SECURE_ENGINE, CONN_MAX_AGE=0),
            REQ_AGE60: _entry(main, SECURE_ENGINE, CONN_MAX_AGE=60),
            REQ_POOL: _entry(main, SECURE_ENGINE, options={"pool": {"min_size": 2, "max_size": 4}}),
        }
    settings.configure(
        DEBUG=False,
        DATABASES=databases,
        INSTALLED_APPS=["django.contrib.contenttypes"],
        USE_TZ=True,
        TIME_ZONE="UTC",
        SECRET_KEY="bench-not-secret",
        ROOT_URLCONF=request_loop.__name__,
        MIDDLEWARE=[],
        ALLOWED_HOSTS=["testserver"],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    if databases:
        from django.core.management import call_command

        call_command("migrate", "contenttypes", database="default", verbosity=0)


def _close_all() -> None:
    from django.db import connections

    for alias in connections:
        connections[alias].close()


# -- the measurements, in order --------------------------------------------------------
def run_main(plan: Plan, counting_server: TLSPostgres) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine()}
    _close_all()
    say("1/6 connect latency (secure vs stock)")
    results |= latency.measure_connect(plan)
    say(f"   client CPU in {plan.cpu_processes} fresh processes")
    results |= processes.measure(plan)
    results |= footprint.measure(plan)
    say("2/6 query latency (select 1, ORM)")
    results |= latency.measure_queries(plan)
    say("3/6 statements and round trips per new connection")
    results |= wire.measure(counting_server, plan.count_connections)
    say("4/6 tls_info read cost")
    results |= own_work.measure_tls_info(plan)
    results |= own_work.measure_own_work(plan)
    results |= own_work.measure_own_work_cold(plan)
    results |= own_work.measure_connect_own_work_cold(plan)
    results |= own_work.measure_connect_own_work_handshake(plan)
    say(f"5/6 RSS over {plan.rss_cycles:,} secure connect/close cycles")
    results |= memory.measure(plan)
    say("6/6 what TLS costs: TLS vs sslmode=disable, and the request loop")
    results |= latency.measure_tls_cost(plan)
    results |= request_loop.measure(plan)
    return results


def run_cold_start(plan: Plan) -> dict[str, Any]:
    """Fresh processes, secure vs stock; ``bench/cold_start.py`` owns the method."""
    say(f"cold start: {plan.cold_start_rounds} rounds of fresh processes (secure vs stock)")
    try:
        cold_start = importlib.import_module("bench.cold_start")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.cold_start":
            raise
        return {"cold_start": {"unavailable": "bench/cold_start.py is not in this checkout"}}
    measured: dict[str, Any] = cold_start.measure(plan.cold_start_rounds)
    return {"cold_start": measured}


def run_negotiation(plan: Plan) -> dict[str, Any]:
    say("new connections through a delaying proxy: secure (direct TLS by default) vs stock")
    return {
        "negotiation": negotiation.measure(ROOT, plan.negotiation_rounds, plan.negotiation_iters)
    }


def run_main_with_servers(plan: Plan) -> dict[str, Any]:
    ca_dir = Path(tempfile.mkdtemp(prefix="spb-bench-ca-"))  # removed at the end
    ca = TestCA(directory=ca_dir)
    say("starting two throwaway TLS PostgreSQL servers")
    # Timed runs use a server without statement logging; counting uses one that logs all.
    main_server = TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca, allow_plaintext=True)
    counting_server = TLSPostgres(
        ca.issue("localhost", "127.0.0.1"), trust=ca, settings=wire.COUNTING_SETTINGS
    )
    try:
        main_server.start()
        counting_server.start()
        configure(main_server, counting_server)
        return run_main(plan, counting_server)
    finally:
        with contextlib.suppress(Exception):  # the servers must stop whatever happened
            _close_all()
        counting_server.stop()
        main_server.stop()
        shutil.rmtree(ca_dir, ignore_errors=True)


def _reported(
    part: Callable[[Plan], dict[str, Any]], plan: Plan, key: str, errors: list[str]
) -> dict[str, Any]:
    """Run a part that starts its own servers; a failure is reported, not lost with the rest.

    The main measurements take minutes: a crash here must not throw them away. The error
    goes to stderr and into the report, and it fails a full run (``errors``).
    """
    try:
        return part(plan)
    except Exception as exc:
        say(traceback.format_exc())
        errors.append(key)
        return {key: {"unavailable": f"failed: {type(exc).__name__}: {exc}"}}


def run(plan: Plan, mode: str, only: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": mode,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "plan": dataclasses.asdict(plan),
    }
    if only != list(MODES):
        results["only"] = only
    if "main" in only:
        results |= run_main_with_servers(plan)
    else:
        configure(None, None)
    errors: list[str] = []
    for name, part in (("cold-start", run_cold_start), ("negotiation", run_negotiation)):
        if name in only:
            results |= _reported(part, plan, name.replace("-", "_"), errors)
    if errors:
        results["errors"] = errors
    results["duration_s"] = time.monotonic() - started
    return results


# -- main --------------------------------------------------------------------------
def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)
    say(f"saved {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run; never fails")
    parser.add_argument("--json", metavar="PATH", type=Path, help="save the results as JSON")
    parser.add_argument(
        "--only",
        action="append",
        choices=MODES,
        help="run only this part (repeatable); default: all of them",
    )
    args = parser.parse_args(argv)
    plan, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    only = [m for m in MODES if m in args.only] if args.only else list(MODES)

    results = run(plan, mode, only)
    targets = check_targets(results)
    results["targets"] = targets
    print(report(results, targets))
    if args.json:
        save(results, args.json)
    failed = [t["name"] for t in targets if t["ok"] is not True] + results.get("errors", [])
    if failed and not args.quick:
        say("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

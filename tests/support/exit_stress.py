"""The exit scenario of issue 12, run many times: a process that sets Django up, runs one
query and exits without closing anything (as ``manage.py`` commands and cron jobs do).

``python -m tests.support.exit_stress --runs 500 [--parallel 2]`` starts one throwaway TLS server,
runs the scenario in fresh processes across the variants below (round-robin) and prints the
abnormal exits (a non-zero status, a signal such as SIGABRT, or anything on stderr).
``--engine django.db.backends.postgresql`` compares with Django's stock backend under the same
libpq TLS settings. Exit status 1 if any run was abnormal. ``tests/test_lifecycle.py`` runs
a small version of it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ENV_KEY = "SPB_EXIT_SCENARIO"

# name -> (settings for the alias, level of the "secure_pg_backend" logger). The "receiver"
# variant adds a connection_verified receiver that parses the certificate with `cryptography`
# (Rust) on the pool's worker thread: user code the backend cannot make cheap.
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "pool-min1-info": ({"OPTIONS": {"pool": {"min_size": 1, "max_size": 3}}}, "INFO"),
    "pool-min1-warning": ({"OPTIONS": {"pool": {"min_size": 1, "max_size": 3}}}, "WARNING"),
    "pool-default-info": ({"OPTIONS": {"pool": True}}, "INFO"),
    "pool-default-warning": ({"OPTIONS": {"pool": True}}, "WARNING"),
    "pool-min4-info": ({"OPTIONS": {"pool": {"min_size": 4, "max_size": 6}}}, "INFO"),
    "conn-max-age-info": ({"CONN_MAX_AGE": 60}, "INFO"),
    "conn-max-age-warning": ({"CONN_MAX_AGE": 60}, "WARNING"),
    "no-pool-info": ({}, "INFO"),
    "pool-receiver-warning": ({"OPTIONS": {"pool": {"min_size": 1, "max_size": 3}}}, "WARNING"),
}


# -- the child: one process, one query, no close -------------------------------------
def scenario() -> None:
    import django
    from django.conf import settings

    config = json.loads(os.environ[ENV_KEY])
    level = config["level"]
    settings.configure(
        DATABASES={"default": config["database"]},
        INSTALLED_APPS=["secure_pg_backend"],
        USE_TZ=True,
        LOGGING={
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"err": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"}},
            "loggers": {"secure_pg_backend": {"handlers": ["err"], "level": level}},
        },
    )
    django.setup()
    from django.db import connection

    if config["variant"].startswith("pool-receiver"):
        from secure_pg_backend.signals import connection_verified

        def parse_certificate(sender: Any, alias: str, tls_info: Any, **kwargs: Any) -> None:
            tls_info().peer_certificate  # noqa: B018 - the parse is the point

        connection_verified.connect(parse_certificate, weak=False)

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    # No connection.close(), no close_pool(): the interpreter just ends.


# -- the driver ------------------------------------------------------------------------
@dataclass
class Run:
    variant: str
    returncode: int
    stderr: str

    @property
    def abnormal(self) -> bool:
        return self.returncode != 0 or bool(self.stderr.strip())

    def describe(self) -> str:
        code = self.returncode
        status = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        return f"{self.variant}: {status}; stderr: {self.stderr.strip()[-400:]!r}"


def child_env(database: dict[str, Any], variant: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    level = VARIANTS[variant][1]
    env[ENV_KEY] = json.dumps({"database": database, "level": level, "variant": variant})
    return env


def run_once(database: dict[str, Any], variant: str, engine: str) -> Run:
    extra = VARIANTS[variant][0]
    entry = {**database, "ENGINE": engine, **extra}
    entry["OPTIONS"] = {**database["OPTIONS"], **extra.get("OPTIONS", {})}
    if engine != "secure_pg_backend":  # the stock backend, given the libpq TLS settings
        entry["OPTIONS"].update(sslmode="verify-full", gssencmode="disable")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.exit_stress", "--child"],
        env=child_env(entry, variant),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Run(variant, proc.returncode, proc.stderr)


def stress(
    database: dict[str, Any],
    runs: int,
    variants: Sequence[str] = tuple(VARIANTS),
    engine: str = "secure_pg_backend",
    parallel: int = 1,
) -> list[Run]:
    names = [variants[i % len(variants)] for i in range(runs)]
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda name: run_once(database, name, engine), names))


@contextmanager
def tls_server() -> Iterator[dict[str, Any]]:
    from secure_pg_backend.testing import TestCA, TLSPostgres

    ca = TestCA()
    with TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca) as server:
        yield server.database_settings()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--engine", default="secure_pg_backend")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--parallel", type=int, default=1, help="processes at a time")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        scenario()
        return 0
    started = time.monotonic()
    with tls_server() as database:
        variants = args.variant or tuple(VARIANTS)
        results = stress(database, args.runs, variants, args.engine, args.parallel)
    bad = [run for run in results if run.abnormal]
    for run in bad:
        print(run.describe())
    summary = {
        "engine": args.engine,
        "runs": len(results),
        "abnormal": len(bad),
        "abnormal_by_variant": dict(Counter(run.variant for run in bad)),
        "runs_by_variant": dict(Counter(run.variant for run in results)),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

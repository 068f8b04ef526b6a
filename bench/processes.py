"""Client CPU per new connection in several fresh processes: the figure's per-process spread.

``latency.measure_connect`` takes the client CPU of secure against stock in one process, beside
an A/A run (stock against an identical stock alias). The A/A run shows the rounds' noise, not
the process's: stock against stock runs the very same Python code objects, so whatever one
process's layout (where the code, the objects it touches and OpenSSL's per-connection heap
strings land) does to them, it does to both sides. The secure side runs other code, and that
code's cost moves with the layout: the same commit measured in five fresh processes spread by
±40 µs (docs/performance.md). So this part runs the same measurement, alternating rounds
of secure, stock and stock_b connects, in ``plan.cpu_processes`` fresh processes one after
another against the same server, and reports each process's median of per-round differences
and the median over the processes (the client-CPU target is judged on it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import SECURE, STOCK, STOCK_B, Plan, say

ROOT = Path(__file__).resolve().parent.parent
ENV_KEY = "SPB_BENCH_PROCESS"

# The child: the three aliases of the main measurement, the same Django settings, one
# ``measure_connect``; its JSON is the last line it prints.
CHILD = f"""
import json, os, sys
sys.path.insert(0, os.getcwd())
job = json.loads(os.environ[{ENV_KEY!r}])
import django
from django.conf import settings
settings.configure(**job["settings"])
django.setup()
from bench.common import Plan
from bench.latency import measure_connect
print(json.dumps(measure_connect(Plan(**job["plan"]))["connect_cpu"]))
"""


def child_settings() -> dict[str, Any]:
    """Django settings for a child process: the main measurement's three aliases, as here."""
    from django.conf import settings

    databases = {alias: settings.DATABASES[alias] for alias in (SECURE, STOCK, STOCK_B)}
    databases["default"] = databases[SECURE]  # Django requires one; the child never uses it
    return {
        "DATABASES": databases,
        "INSTALLED_APPS": ["django.contrib.contenttypes"],
        "USE_TZ": settings.USE_TZ,
        "TIME_ZONE": settings.TIME_ZONE,
        "SECRET_KEY": "bench-not-secret",
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
    }


def measure(plan: Plan) -> dict[str, Any]:
    """``connect_cpu_processes``: per process, the median of per-round differences (µs) of
    secure against stock and of stock against stock (A/A); and their medians."""
    child_plan = dataclasses.replace(plan, connect_rounds=plan.cpu_process_rounds)
    job = {"settings": child_settings(), "plan": dataclasses.asdict(child_plan)}
    env = {**os.environ, ENV_KEY: json.dumps(job)}
    secure: list[float] = []
    same: list[float] = []
    for number in range(plan.cpu_processes):
        say(f"   process {number + 1}/{plan.cpu_processes}")
        done = subprocess.run(
            [sys.executable, "-c", CHILD],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"connect CPU child failed: {done.stderr.strip()[-2000:]}")
        pairs = json.loads(done.stdout.strip().splitlines()[-1])
        secure.append(pairs["secure_vs_stock"]["median_diff_us"])
        same.append(pairs["stock_vs_stock"]["median_diff_us"])
    return {
        "connect_cpu_processes": {
            "processes": plan.cpu_processes,
            "rounds": plan.cpu_process_rounds,
            "secure_vs_stock": {"median_diff_us": statistics.median(secure), "each": secure},
            "stock_vs_stock": {"median_diff_us": statistics.median(same), "each": same},
        }
    }

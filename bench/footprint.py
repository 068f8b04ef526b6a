"""What a new connection touches, counted rather than timed: instructions and simulated cache
misses per connect, secure against stock, under callgrind.

The client-CPU figure (``processes``) is a time, and the backend's part of it is mostly cache
misses: its code runs after the TLS handshake and the SCRAM exchange have evicted the caches, and
what a miss costs depends on how busy the machine's shared L3 is (docs/performance.md: the same
code read +85 µs over stock on one day, +158 on the next). callgrind counts instead: each ENGINE
in its own child, side by side, makes ``connects`` new connections (after a few untimed ones)
under a simulated cache whose last level is the size of the L2 a connect's code meets, 1 MiB and
2 MiB, with the collector off as in the timed rounds. The counts repeat to about ±0.1 M
instructions and ±150 misses per connect (the handshake's own work varies); system calls are
not seen (the kernel runs them). Where valgrind is not installed the part says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import SECURE, STOCK, Plan, say
from bench.processes import child_settings

ROOT = Path(__file__).resolve().parent.parent
ENV_KEY = "SPB_BENCH_FOOTPRINT"
LAST_LEVELS = (1 << 20, 2 << 20)  # bytes of the simulated last-level cache
WARM_CONNECTS = 5

# The child: the bench's Django settings, a few untimed connects, then ``connects`` more inside
# the one call callgrind collects (``functools.reduce``).
CHILD = f"""
import functools, gc, json, os, sys
sys.path.insert(0, os.getcwd())
job = json.loads(os.environ[{ENV_KEY!r}])
import django
from django.conf import settings
settings.configure(**job["settings"])
django.setup()
from django.db import connections
wrapper = connections[job["alias"]]
for _ in range({WARM_CONNECTS}):
    wrapper.ensure_connection()
    wrapper.close()
def one(total, _):
    wrapper.ensure_connection()
    wrapper.close()
    return total
gc.collect()
gc.disable()
functools.reduce(one, range(job["connects"]), 0)
"""


def totals(text: str) -> dict[str, int]:
    """The event totals of a callgrind output file (its ``events:`` and ``totals:`` lines)."""
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("totals:") and names:
            return dict(zip(names, map(int, line.split()[1:]), strict=True))
    raise ValueError("no events and totals in the callgrind output")


def per_connect(counts: dict[str, int], connects: int) -> dict[str, float]:
    """Instructions, and misses at the first level and the simulated last level, per connect."""
    return {
        "instructions": counts["Ir"] / connects,
        "first_level_misses": (counts["I1mr"] + counts["D1mr"] + counts["D1mw"]) / connects,
        "last_level_misses": (counts["ILmr"] + counts["DLmr"] + counts["DLmw"]) / connects,
    }


def against_stock(secure: dict[str, float], stock: dict[str, float]) -> dict[str, Any]:
    """Each count of ``secure`` beside ``stock``'s: the difference and the ratio."""
    out: dict[str, Any] = {SECURE: secure, STOCK: stock}
    for name in secure:
        out[f"{name}_diff"] = secure[name] - stock[name]
        out[f"{name}_ratio"] = secure[name] / stock[name]
    return out


def measure(plan: Plan) -> dict[str, Any]:
    """``footprint``: per connect, for each simulated last-level size, secure against stock."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {"footprint": {"unavailable": "valgrind is not installed"}}
    connects = plan.footprint_connects
    django_settings = child_settings()
    runs: dict[tuple[int, str], tuple[subprocess.Popen[bytes], Path]] = {}
    work = Path(tempfile.mkdtemp(prefix="spb-footprint-"))  # removed at the end
    say(f"   what a connect touches (callgrind, {connects} connects per child)")
    for size in LAST_LEVELS:
        for alias in (SECURE, STOCK):
            out = work / f"{alias}-{size}.out"
            job = {
                "settings": django_settings,
                "alias": alias,
                "connects": connects,
            }
            command = [
                valgrind,
                "--tool=callgrind",
                "--cache-sim=yes",
                f"--LL={size},16,64",
                "--collect-atstart=no",
                "--toggle-collect=functools_reduce",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                CHILD,
            ]
            # Side by side: both children meet the same server. What they say goes to a file
            # (a pipe left unread while another child is waited for could fill and stall it).
            with open(out.with_suffix(".log"), "wb") as log:
                proc = subprocess.Popen(
                    command,
                    env={**os.environ, ENV_KEY: json.dumps(job)},
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            runs[size, alias] = proc, out
    counted: dict[int, dict[str, dict[str, float]]] = {}
    try:
        for (size, alias), (proc, out) in runs.items():
            if proc.wait(timeout=1800) != 0:
                said = out.with_suffix(".log").read_text(errors="replace").strip()
                raise RuntimeError(f"footprint child failed: {said[-2000:]}")
            counted.setdefault(size, {})[alias] = per_connect(totals(out.read_text()), connects)
    finally:
        for proc, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "footprint": {
            "connects": connects,
            "last_level": {
                str(size): against_stock(by_alias[SECURE], by_alias[STOCK])
                for size, by_alias in counted.items()
            },
        }
    }

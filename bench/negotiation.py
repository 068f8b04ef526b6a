"""New connections through a delaying proxy: ``secure_pg_backend`` (direct TLS by default) vs stock.

libpq's default negotiation sends an 8-byte SSLRequest and waits for the server's ``S`` before its
TLS ClientHello; ``sslnegotiation=direct`` (libpq and server 17+) sends the ClientHello first,
one round trip less per new connection. ``secure_pg_backend`` uses it by default once a
connection has shown the server can (``policy``: learned per endpoint), so on PostgreSQL 17+ its
new connections should be one round trip faster than the stock ENGINE's, and on an older server
exactly as fast. Loopback hides round trips, so both ENGINEs connect through ``DelayProxy`` (in
its own process) at
each of ``RTTS_MS``, alternating round by round, to a PostgreSQL 15 and a PostgreSQL 18 server
from ``scripts/pg-binaries`` (``PG_BIN_15`` / ``PG_BIN_18`` to use others). Same libpq settings
for both (verify-full, the same root certificate); neither sets ``sslnegotiation``.

On the old server two more variants, at the largest round trip, state what the default costs
there: ``first`` (every connect as the first to a new endpoint: the SSLRequest, then learning
from the connection's facts) and ``fallback`` (every connect as the one where the process
believed the endpoint could do direct TLS and it could not: the failed direct attempt, then
the SSLRequest; paid once per endpoint, only when an endpoint that did direct TLS is replaced
by one that cannot).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    SECURE_ENGINE,
    STOCK_ENGINE,
    TLS_OPTIONS,
    Step,
    compare,
    interleaved,
    repeat,
    version_text,
)
from bench.delay_proxy import DelayProxyProcess
from secure_pg_backend import handshake, policy
from secure_pg_backend.base import standalone_wrapper
from secure_pg_backend.testing import TestCA, TLSPostgres

SERVERS = (15, 18)  # PostgreSQL majors: before direct TLS, and with it
RTTS_MS = (1.0, 10.0)
OLD_SERVER = 15


class Unavailable(Exception):
    """No server binaries for a version here; the reason is reported instead of a figure."""


def server_bin(root: Path, major: int) -> Path:
    """``PG_BIN_<major>``, else the bin directory ``scripts/pg-binaries`` prints (installed
    on demand)."""
    given = os.environ.get(f"PG_BIN_{major}")
    if given:
        return Path(given)
    script = root / "scripts" / "pg-binaries"
    if not script.exists():
        raise Unavailable("scripts/pg-binaries is not in this checkout")
    done = subprocess.run([str(script), str(major)], capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise Unavailable(f"scripts/pg-binaries {major} failed: {why}")
    return Path(lines[-1])


def _wrapper(server: TLSPostgres, port: int, engine: str, alias: str) -> Any:
    """A wrapper outside settings.DATABASES, filled in as Django would; identical libpq
    settings for both ENGINEs (what secure_pg_backend forces, spelled out for stock)."""
    options = {"sslrootcert": server.root_cert, **TLS_OPTIONS}
    entry = server.database_settings(engine=engine, options=options, PORT=str(port))
    return standalone_wrapper(alias, entry)


def _connect_step(wrapper: Any, before: Callable[[], None] | None = None) -> Step:
    def step() -> None:
        if before is not None:
            before()
        wrapper.ensure_connection()
        wrapper.close()

    return step


def _endpoint(wrapper: Any) -> policy.DirectKey | None:
    decision = wrapper.policy_verdict().decision
    return decision.direct_key if decision is not None else None


def _as_first_connection(key: policy.DirectKey | None) -> Callable[[], None]:
    def forget() -> None:
        if key is not None:
            handshake._DIRECT.pop(key, None)

    return forget


def _as_misled(key: policy.DirectKey | None) -> Callable[[], None]:
    def believe() -> None:
        if key is not None:
            handshake._DIRECT[key] = True

    return believe


def _through_proxy(
    server: TLSPostgres, major: int, rtt_ms: float, rounds: int, iters: int, costs: bool
) -> dict[str, Any]:
    with DelayProxyProcess(server.port, rtt_ms / 1000) as proxy:
        secure = _wrapper(server, proxy.port, SECURE_ENGINE, f"secure_{major}_{rtt_ms:g}")
        stock = _wrapper(server, proxy.port, STOCK_ENGINE, f"stock_{major}_{rtt_ms:g}")
        key = _endpoint(secure)
        steps = {"secure": _connect_step(secure), "stock": _connect_step(stock)}
        if costs:
            steps["first"] = _connect_step(secure, _as_first_connection(key))
        try:
            per_round = interleaved(
                {name: repeat(step) for name, step in steps.items()}, rounds, iters
            )
            if costs:  # apart: the server process of a failed attempt must not slow "secure"
                misled = {
                    "fallback": repeat(_connect_step(secure, _as_misled(key))),
                    "stock_again": repeat(steps["stock"]),
                }
                per_round |= interleaved(misled, rounds, iters)
            _as_first_connection(_endpoint(secure))()
            used = []
            for _ in range(2):  # what the default does: the first connection, then the rest
                secure.ensure_connection()
                used.append(secure.tls_info.sslnegotiation)
                secure.close()
            secure.ensure_connection()
            version, alpn = version_text(secure.pg_version), secure.tls_info.alpn
        finally:
            secure.close()
            stock.close()
    out = compare("secure", "stock", per_round)
    out.update(
        server=version,
        rtt_ms=rtt_ms,
        saved_us=out["stock"]["median"] - out["secure"]["median"],
        sslnegotiation=used,
        alpn=alpn,
    )
    out["saved_round_trips"] = out["saved_us"] / (rtt_ms * 1000)
    if costs:
        first = compare("first", "stock", per_round)
        fallback = compare("fallback", "stock_again", per_round)
        out.update(first=first["first"], fallback=fallback["fallback"])
        out["first_ratio"], out["fallback_ratio"] = first["ratio"], fallback["ratio"]
        out["fallback_extra_us"] = (
            fallback["fallback"]["median"] - fallback["stock_again"]["median"]
        )
    return out


def measure(root: Path, rounds: int, iters: int) -> dict[str, Any]:
    """``negotiation``: per server and round trip, connect µs for both ENGINEs and the ratio.

    ``{"runs": [...]}``, with ``{"major": ..., "unavailable": reason}`` for a server that cannot
    be had here. Every endpoint starts unknown, as in a new process.
    """
    runs: list[dict[str, Any]] = []
    ca_dir = Path(tempfile.mkdtemp(prefix="spb-bench-neg-ca-"))
    try:
        ca = TestCA(directory=ca_dir)
        for major in SERVERS:
            try:
                pg_bin = server_bin(root, major)
            except Unavailable as exc:
                runs.append({"major": major, "unavailable": str(exc)})
                continue
            leaf = ca.issue("localhost", "127.0.0.1")
            with TLSPostgres(leaf, trust=ca, pg_bin=pg_bin) as server:
                for rtt_ms in RTTS_MS:
                    handshake.forget_direct()
                    costs = major == OLD_SERVER and rtt_ms == max(RTTS_MS)
                    run = _through_proxy(server, major, rtt_ms, rounds, iters, costs)
                    runs.append({"major": major, **run})
    finally:
        handshake.forget_direct()
        shutil.rmtree(ca_dir, ignore_errors=True)
    return {"runs": runs}

"""``sslnegotiation=direct`` against the default negotiation, on a PostgreSQL 17+ server.

By default libpq sends an 8-byte SSLRequest and waits for the server's ``S`` before its TLS
ClientHello; with ``direct`` (libpq and server 17+) the ClientHello goes first, which saves
one round trip per new connection. Loopback hides round trips, so both variants connect
through ``DelayProxy`` (``RTT_MS`` per round trip) to a PostgreSQL 18 server from
``scripts/pg-binaries``. Both are secure_pg_backend connections under the full policy,
alternating round by round; ALPN as ``tls_info`` reports it is recorded too.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Step, compare, interleaved, repeat, version_text
from bench.delay_proxy import DelayProxy
from secure_pg_backend.base import standalone_wrapper
from secure_pg_backend.testing import TestCA, TLSPostgres

SERVER_MAJOR = 18
RTT_MS = 10.0
VARIANTS = ("direct", "postgres")  # the values of OPTIONS["sslnegotiation"]


class Unavailable(Exception):
    """No PostgreSQL 17+ server binaries here; the reason is reported instead of a figure."""


def server_bin(root: Path) -> Path:
    """The bin directory ``scripts/pg-binaries`` prints (it installs the build on demand)."""
    script = root / "scripts" / "pg-binaries"
    if not script.exists():
        raise Unavailable("scripts/pg-binaries is not in this checkout")
    done = subprocess.run(
        [str(script), str(SERVER_MAJOR)], capture_output=True, text=True, timeout=900
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise Unavailable(f"scripts/pg-binaries {SERVER_MAJOR} failed: {why}")
    return Path(lines[-1])


def _wrapper(server: TLSPostgres, port: int, negotiation: str) -> Any:
    """A secure_pg_backend wrapper outside settings.DATABASES, filled in as Django would."""
    entry = server.database_settings(options={"sslnegotiation": negotiation}, PORT=str(port))
    return standalone_wrapper(f"negotiation_{negotiation}", entry)


def _connect_step(wrapper: Any) -> Step:
    def step() -> None:
        wrapper.ensure_connection()
        wrapper.close()

    return step


def _compare_through_proxy(server: TLSPostgres, rounds: int, iters: int) -> dict[str, Any]:
    with DelayProxy(server.port, RTT_MS / 1000) as proxy:
        wrappers = {name: _wrapper(server, proxy.port, name) for name in VARIANTS}
        try:
            per_round = interleaved(
                {name: repeat(_connect_step(w)) for name, w in wrappers.items()}, rounds, iters
            )
            alpn = {}
            for name, wrapper in wrappers.items():
                wrapper.ensure_connection()
                alpn[name] = wrapper.tls_info.alpn
            version = version_text(wrappers["direct"].pg_version)
        finally:
            for wrapper in wrappers.values():
                wrapper.close()
    out = compare("direct", "postgres", per_round)
    saved_us = out["postgres"]["median"] - out["direct"]["median"]
    out.update(
        server=version,
        rtt_ms=RTT_MS,
        saved_us=saved_us,
        saved_round_trips=saved_us / (RTT_MS * 1000),
        alpn=alpn,
    )
    return out


def measure(root: Path, rounds: int, iters: int) -> dict[str, Any]:
    """``negotiation``: connect µs per variant, the ratio direct/default, the saving.

    Or ``{"unavailable": reason}`` when no PostgreSQL 17+ server can be had here.
    """
    try:
        pg_bin = server_bin(root)
    except Unavailable as exc:
        return {"unavailable": str(exc)}
    ca_dir = Path(tempfile.mkdtemp(prefix="spb-bench-neg-ca-"))
    try:
        ca = TestCA(directory=ca_dir)
        with TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca, pg_bin=pg_bin) as server:
            return _compare_through_proxy(server, rounds, iters)
    finally:
        shutil.rmtree(ca_dir, ignore_errors=True)

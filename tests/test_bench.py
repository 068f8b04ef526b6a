"""The benchmark's own logic: the delaying proxy, the statement counter, partial reports.

The figures themselves come from ``make bench``; these check the instruments.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.delay_proxy import DelayProxy, DelayProxyProcess
from bench.report import check_targets, report
from bench.wire import statements_by_pid

RTT_S = 0.05


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback server that echoes every connection until EOF, then closes it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
    listener.close()
    thread.join(timeout=5)


def test_each_exchange_through_the_proxy_takes_a_round_trip(echo_port: int) -> None:
    with (
        DelayProxy(echo_port, RTT_S) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as client,
    ):
        for message in (b"SSLRequest", b"S", b"ClientHello"):
            start = time.monotonic()
            client.sendall(message)
            assert client.recv(100) == message
            assert time.monotonic() - start >= RTT_S


def test_the_proxy_in_its_own_process_delays_alike_and_exits(echo_port: int) -> None:
    proxy = DelayProxyProcess(echo_port, RTT_S)
    with proxy, socket.create_connection(("127.0.0.1", proxy.port)) as client:
        start = time.monotonic()
        client.sendall(b"ClientHello")
        assert client.recv(100) == b"ClientHello"
        assert time.monotonic() - start >= RTT_S
        child = proxy._process
    assert child is not None and child.returncode == 0  # ended when its stdin closed


def test_the_proxy_in_its_own_process_keeps_order_and_passes_the_end_of_stream_on(
    echo_port: int,
) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, many chunks
    proxy = DelayProxyProcess(echo_port, 0.002)
    with proxy, socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)  # the echo server sees EOF only through the proxy
        received = b""
        while data := client.recv(65536):
            received += data
    assert received == payload


def test_the_proxy_keeps_order_and_passes_the_end_of_stream_on(echo_port: int) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, many chunks
    with (
        DelayProxy(echo_port, 0.002) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as client,
    ):
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)  # the echo server sees EOF only through the proxy
        received = b""
        while data := client.recv(65536):
            received += data
    assert received == payload


def test_statements_are_matched_to_backend_pids() -> None:
    log = (
        "[101] LOG:  statement: SELECT set_config('TimeZone', 'UTC', false)\n"
        "[202] LOG:  execute <unnamed>: select 1\n"
        "[101] LOG:  statement: select 2 \n"
        "[303] LOG:  connection authorized: user=app\n"
    )
    assert statements_by_pid(log) == {
        101: ["SELECT set_config('TimeZone', 'UTC', false)", "select 2"],
        202: ["select 1"],
    }


def test_a_cold_start_that_could_not_run_is_reported_not_passed() -> None:
    results = {
        "mode": "full",
        "plan": {},
        "only": ["cold-start"],
        "duration_s": 1.0,
        "cold_start": {"unavailable": "bench/cold_start.py is not in this checkout"},
    }
    (target,) = check_targets(results)
    assert target["ok"] is None  # a full run fails on anything but True
    text = report(results, [target])
    assert "Cold start: not measured (bench/cold_start.py is not in this checkout)." in text
    assert "| cold start ratio ≤ 1.03 | not measured | n/a (not measured) |" in text


def test_cold_start_ratio_is_judged() -> None:
    cold = {
        "secure_ms_median": 331.0,
        "stock_ms_median": 300.0,
        "ratio": 331 / 300,
        "paired_ratio": 1.095,
        "rounds": 41,
        "instructions": {"secure": 1_364_000_000, "stock": 1_343_000_000, "ratio": 1.0156},
    }
    results = {"mode": "full", "plan": {}, "duration_s": 1.0, "cold_start": cold}
    (target,) = check_targets(results)
    assert target == {"name": "cold start ratio ≤ 1.03", "measured": "1.103", "ok": False}
    text = report(results, [target])
    assert (
        "secure 331.0 ms, stock 300.0 ms, ratio 1.103 (median of the per-pair ratios 1.095)" in text
    )
    assert "1,364,000,000 vs 1,343,000,000, ratio 1.0156" in text


def _run(server: str, rtt_ms: float, secure: float, stock: float) -> dict[str, object]:
    def timing(median: float) -> dict[str, float]:
        return {"median": median, "min": median, "max": median, "n": 41}

    return {
        "major": int(server.split(".")[0]),
        "server": server,
        "rtt_ms": rtt_ms,
        "secure": timing(secure),
        "stock": timing(stock),
        "ratio": secure / stock,
        "sslnegotiation": ["postgres", "direct" if server.startswith("18") else "postgres"],
    }


def test_direct_tls_by_default_is_judged_per_server() -> None:
    runs = [
        _run("15.19", 1.0, 25_300, 25_000),  # 1.012: over 1.01 at 1 ms counts too
        _run("15.19", 10.0, 90_000, 90_000),
        _run("18.6", 1.0, 24_000, 25_000),  # not judged: the saving is one 1 ms round trip
        _run("18.6", 10.0, 61_000, 72_000),
        {"major": 17, "unavailable": "scripts/pg-binaries 17 failed: offline"},
    ]
    results = {"mode": "full", "plan": {}, "duration_s": 1.0, "negotiation": {"runs": runs}}
    new, old = check_targets(results)
    assert (new["measured"], new["ok"]) == ("0.847", True)
    assert (old["measured"], old["ok"]) == ("1.012", False)
    text = report(results, [new, old])
    assert "| PostgreSQL 18.6, 10 ms | 61,000.0" in text and "| postgres, then direct |" in text
    assert "PostgreSQL 17: not measured (scripts/pg-binaries 17 failed: offline)." in text


def test_direct_tls_targets_without_servers_are_not_passed() -> None:
    runs = [{"major": 18, "unavailable": "no binaries"}]
    results = {"mode": "full", "plan": {}, "duration_s": 1.0, "negotiation": {"runs": runs}}
    assert [t["ok"] for t in check_targets(results)] == [None, None]


def _pair(diff_us: float) -> dict[str, object]:
    spread = {"median": diff_us, "min": diff_us, "max": diff_us, "n": 3}
    ratio = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 3}
    return {"median_diff_us": diff_us, "median_ratio": 1.0, "diff_us": spread,
            "ratio": ratio, "rounds": 3}  # fmt: skip


def test_client_cpu_is_judged_over_fresh_processes_where_measured() -> None:
    from bench.report import _cpu_processes, _cpu_target

    one_process = {"connect_cpu": {"secure_vs_stock": _pair(90), "stock_vs_stock": _pair(-5)}}
    assert _cpu_target(one_process)["ok"] is True
    spread = {
        "processes": 3,
        "rounds": 151,
        "secure_vs_stock": {"median_diff_us": 130.0, "each": [90.0, 130.0, 150.0]},
        "stock_vs_stock": {"median_diff_us": -2.0, "each": [-5.0, -2.0, 4.0]},
    }
    target = _cpu_target({**one_process, "connect_cpu_processes": spread})
    assert target["ok"] is False  # the one process's +90 was a lucky layout
    assert target["measured"] == "+130 µs (A/A -2 µs)"
    assert "3 fresh processes" in target["name"]
    (line,) = [text for text in _cpu_processes(spread) if text]
    assert "+90, +130, +150, median **+130**" in line and "-5, -2, +4, median -2" in line


def test_the_own_work_behind_real_handshakes_is_reported_beside_its_a_a_pair() -> None:
    from bench.report import _handshake_own_work

    assert _handshake_own_work(None) == []
    real = {"secure": 180.2, "stock": 75.0, "diff": 96.4, "aa": 1.2, "calls": 248}
    (line,) = [text for text in _handshake_own_work(real) if text]
    assert "248 rounds" in line and "**+96.4 µs**" in line and "stock_b against stock +1.2" in line


def test_what_a_connect_touches_is_counted_from_callgrind_totals() -> None:
    from bench.footprint import against_stock, per_connect, totals
    from bench.report import _footprint

    text = (
        "version: 1\ncmd: python -c ...\nevents: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw\n"
        "summary: 9 9 9 9 9 9 9 9 9\nfn=(1) main\n0 1 1 1 0 0 0 0 0 0\n"
        "totals: 2000000 10 10 300 200 100 40 30 10\n"
    )
    counts = totals(text)
    assert counts["Ir"] == 2_000_000 and counts["DLmw"] == 10
    secure = per_connect(counts, 2)
    assert secure == {
        "instructions": 1_000_000,
        "first_level_misses": 300,
        "last_level_misses": 40,
    }
    stock = {"instructions": 900_000.0, "first_level_misses": 250.0, "last_level_misses": 32.0}
    row = against_stock(secure, stock)
    assert row["last_level_misses_diff"] == 8 and row["last_level_misses_ratio"] == 1.25
    with pytest.raises(ValueError):
        totals("events: Ir\n")  # a file cut short: no totals line
    assert _footprint(None) == []
    (line,) = [text for text in _footprint({"unavailable": "valgrind is not installed"}) if text]
    assert "not counted (valgrind is not installed)" in line
    counted = {"connects": 2, "last_level": {str(2 << 20): row, str(1 << 20): row}}
    rows = [
        text
        for text in _footprint(counted)
        if text.startswith("| 1 MiB") or text.startswith("| 2 MiB")
    ]
    assert rows[0].startswith("| 1 MiB") and "40 / 32 (+8, 1.250)" in rows[0]
    assert "1.00 M / 0.90 M (+100 k)" in rows[1]


def test_a_footprint_child_that_fails_is_reported_with_what_it_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import tempfile

    from bench import footprint
    from bench.common import QUICK

    fake = tmp_path / "valgrind"
    fake.write_text("#!/bin/sh\necho 'callgrind: cannot simulate this' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(fake))
    monkeypatch.setattr(footprint, "child_settings", lambda: {})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match="cannot simulate this"):
        footprint.measure(QUICK)
    assert not list(tmp_path.glob("spb-footprint-*"))  # its files are gone
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert footprint.measure(QUICK) == {"footprint": {"unavailable": "valgrind is not installed"}}

"""What goes over the wire on a new connection: SQL statements and round trips.

Statements are counted by the server: a second server logs every statement
(``COUNTING_SETTINGS``), and log lines are matched to each connection's backend pid.
Round trips come from the kernel's counters for the client socket (``TCP_INFO``).
"""

from __future__ import annotations

import re
import socket
import statistics
import struct
import sys
import time
from collections import Counter
from typing import Any

from bench.common import COUNT_SECURE, COUNT_STOCK
from secure_pg_backend.testing import TLSPostgres

# postgresql.conf lines for the counting server; statements_by_pid reads this prefix.
COUNTING_SETTINGS = {"log_statement": "'all'", "log_line_prefix": "'[%p] '"}
MARKER = "select 'secure_pg_backend bench marker'"

# struct tcp_info (linux/tcp.h): offsets of the counters used here (kernel >= 4.19).
_TCP_INFO_LEN = 232
_TCPI = {
    "total_retrans": (100, "I"),
    "bytes_received": (128, "Q"),
    "data_segs_in": (152, "I"),
    "data_segs_out": (156, "I"),
    "bytes_sent": (200, "Q"),
    "bytes_retrans": (208, "Q"),
}
WIRE_KEYS = ("client_segments", "client_bytes", "server_segments", "server_bytes")


def tcp_counters(fd: int) -> dict[str, int] | None:
    """What the client's TCP socket carried so far (Linux only; None elsewhere).

    Retransmissions (a tail-loss probe on a busy machine) are taken out: they are the
    kernel's doing, not the backend's.
    """
    if not sys.platform.startswith("linux"):
        return None
    sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # a dup: libpq keeps its fd
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    finally:
        sock.close()
    if len(raw) < _TCP_INFO_LEN:
        return None
    tcpi = {name: struct.unpack_from(fmt, raw, off)[0] for name, (off, fmt) in _TCPI.items()}
    return {
        "client_segments": tcpi["data_segs_out"] - tcpi["total_retrans"],
        "client_bytes": tcpi["bytes_sent"] - tcpi["bytes_retrans"],
        "server_segments": tcpi["data_segs_in"],
        "server_bytes": tcpi["bytes_received"],
        "retransmitted_segments": tcpi["total_retrans"],
    }


def statements_by_pid(log_text: str) -> dict[int, list[str]]:
    pattern = re.compile(r"^\[(\d+)\] LOG:  (?:statement|execute [^:]*): (.*)$", re.M)
    found: dict[int, list[str]] = {}
    for match in pattern.finditer(log_text):
        found.setdefault(int(match.group(1)), []).append(match.group(2).strip())
    return found


def _mode(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


Seen = dict[str, list[tuple[int, dict[str, int] | None]]]


def _open_and_close(connections_each: int) -> Seen:
    """(backend pid, TCP counters) of fresh connections through both ENGINEs, alternating."""
    from django.db import connections

    seen: Seen = {COUNT_SECURE: [], COUNT_STOCK: []}
    for i in range(connections_each):
        for alias in (COUNT_SECURE, COUNT_STOCK) if i % 2 == 0 else (COUNT_STOCK, COUNT_SECURE):
            conn = connections[alias]
            conn.ensure_connection()
            counters = tcp_counters(conn.connection.pgconn.socket)
            seen[alias].append((conn.connection.info.backend_pid, counters))
            conn.close()
    return seen


def _server_log(server: TLSPostgres) -> str:
    # The server writes log lines in order: once the marker is there, ours are too.
    server.admin_sql(MARKER)
    deadline = time.monotonic() + 10
    while MARKER not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.log_text()


def measure(server: TLSPostgres, connections_each: int) -> dict[str, Any]:
    """``wire``: open fresh connections through both ENGINEs on the logging server, compare.

    Round trips: the kernel's counters for the client socket, read when Django hands the
    connection over: an extra round trip needs at least one extra client data segment
    (libpq sets TCP_NODELAY and the loopback MSS is 64 kB, so each flush is a segment).
    Equal segments and bytes both ways mean the same exchange (the server's bytes vary by a
    byte or two between connections: ECDSA signatures in the TLS handshake have a variable
    DER length).
    """
    seen = _open_and_close(connections_each)
    by_pid = statements_by_pid(_server_log(server))

    out: dict[str, Any] = {}
    for alias, rows in seen.items():
        statement_lists = [by_pid.get(pid, []) for pid, _ in rows]
        samples = [c for _, c in rows if c is not None]
        out[alias] = {
            "statements": list(_mode([tuple(s) for s in statement_lists])),
            "statement_counts": [len(s) for s in statement_lists],
            # Medians: a rare odd one out (e.g. a retransmission) does not decide it.
            "wire": {k: statistics.median(c[k] for c in samples) for k in WIRE_KEYS}
            if samples
            else None,
            "wire_samples": samples,
        }
    sec, sto = out[COUNT_SECURE], out[COUNT_STOCK]
    # Statements are deterministic: worst secure connection against the best stock one.
    out["extra_statements"] = max(sec["statement_counts"]) - min(sto["statement_counts"])
    # Statements the secure backend sent that the stock one did not (multiset difference).
    extra = Counter(sec["statements"]) - Counter(sto["statements"])
    out["extra_statement_texts"] = sorted(extra.elements())
    if sec["wire"] and sto["wire"]:
        out["extra_round_trips"] = sec["wire"]["client_segments"] - sto["wire"]["client_segments"]
        out["wire_difference"] = {k: sec["wire"][k] - sto["wire"][k] for k in WIRE_KEYS}
    else:
        out["extra_round_trips"] = None
    return {"wire": out}

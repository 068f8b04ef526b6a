"""The long scenarios' harness: a web-server model, connection attempts counted by the server,
and a path that resets connections, then stalls them.

``tests/support/faultkit.py`` drives closed loops (each thread sends its next request when the last
one ended), which hide what a slow failure costs a real site: there, requests keep arriving
whatever happens to the ones in progress. ``WebServer`` is the open loop: requests arrive at a
fixed rate into one queue, a fixed number of workers (a WSGI server's threads) take them in
order, and each request's response time counts from its arrival, so the time it waited in the
queue behind slow requests is included. Every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.db import connections, transaction

from tests.support.faultkit import failed_stage, percentile

ARRIVALS_CAP = 20_000  # per run: a fixed rate for a bounded time never gets near it


class Ledger(Protocol):
    def admin_sql(self, *statements: str, dbname: str = "postgres") -> list[Any]: ...


_serial = itertools.count()


# -- the web-server model ------------------------------------------------------------------
@dataclass
class WebRequest:
    arrived: float
    started: float | None = None
    ended: float | None = None
    ok: bool = False
    error: str = ""
    message: str = ""
    stage: str = ""

    @property
    def response(self) -> float | None:
        """Seconds from arrival to the answer (queueing included); None: never answered."""
        return None if self.ended is None else self.ended - self.arrived


@dataclass
class WebRun:
    """One ENGINE's run of an open-loop scenario."""

    scenario: str
    engine: str
    workers: int
    rate: float
    requests: list[WebRequest] = field(default_factory=list)
    acknowledged: set[int] = field(default_factory=set)
    present: set[int] = field(default_factory=set)
    fault_at: float | None = None
    removed_at: float | None = None
    arrivals_ended: float | None = None
    attempts: int | None = None  # TCP connections the server received from the app
    note: str = ""

    @property
    def arrived(self) -> int:
        return len(self.requests)

    @property
    def served(self) -> int:
        return sum(1 for r in self.requests if r.ok)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.requests if r.ended is not None and not r.ok)

    @property
    def unanswered(self) -> int:
        """Still queued (or in progress) when the run ended: a client that gave up."""
        return sum(1 for r in self.requests if r.ended is None)

    @property
    def lost(self) -> int:
        return len(self.acknowledged - self.present)

    def max_queue(self, since: float = float("-inf")) -> int:
        """The longest queue (requests arrived and not yet taken by a worker), from ``since``."""
        events = [(r.arrived, 1) for r in self.requests]
        events += [(r.started, -1) for r in self.requests if r.started is not None]
        length = longest = 0
        for moment, step in sorted(events, key=lambda e: (e[0], e[1])):
            length += step
            if moment >= since:
                longest = max(longest, length)
        return longest

    def responses(
        self, arrived_from: float = float("-inf"), arrived_until: float = float("inf")
    ) -> list[float]:
        """Response times of the answered requests that arrived in the window."""
        return [
            r.response
            for r in self.requests
            if r.response is not None and arrived_from <= r.arrived < arrived_until
        ]

    def in_window(
        self, arrived_from: float, arrived_until: float = float("inf")
    ) -> list[WebRequest]:
        return [r for r in self.requests if arrived_from <= r.arrived < arrived_until]

    def first_success_after(self, moment: float) -> float | None:
        ends = [
            r.ended for r in self.requests if r.ok and r.ended is not None and r.ended >= moment
        ]
        return min(ends) - moment if ends else None

    def slower_than(self, seconds: float) -> int:
        return sum(1 for value in self.responses() if value > seconds)

    @property
    def attempts_per_served(self) -> float | None:
        if self.attempts is None or not self.served:
            return None
        return self.attempts / self.served


class WebServer:
    """``workers`` threads serving requests that arrive at ``rate`` per second on ``alias``.

    A request: ``close_if_unusable_or_obsolete()`` (request_started), one INSERT of a unique id
    in ``transaction.atomic`` after ``hold_sql`` (the work that keeps the connection busy),
    ``close_if_unusable_or_obsolete()`` (request_finished). A worker takes the next request as
    soon as one ends, failed or not: a web server answers 500 and moves on.
    """

    def __init__(
        self,
        run: WebRun,
        alias: str,
        ledger: Ledger,
        *,
        hold_sql: str | None = None,
        deadline: float = 90.0,
    ) -> None:
        self.run = run
        self.alias = alias
        self.ledger = ledger
        self.hold_sql = hold_sql
        self.table = f"web_{os.getpid()}_{next(_serial)}"
        ledger.admin_sql(
            f"CREATE TABLE {self.table} (id bigint PRIMARY KEY, worker int NOT NULL)",
            f"GRANT ALL ON {self.table} TO app",
            dbname="app",
        )
        self._queue: queue.Queue[tuple[int, WebRequest] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._arrivals_stop = threading.Event()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + deadline
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        feeder = threading.Thread(target=self._feed, daemon=True)
        self._threads.append(feeder)
        for index in range(self.run.workers):
            self._threads.append(threading.Thread(target=self._work, args=(index,), daemon=True))
        for thread in self._threads:
            thread.start()

    def _feed(self) -> None:
        begin = time.monotonic()
        for serial in range(ARRIVALS_CAP):
            due = begin + serial / self.run.rate
            pause = due - time.monotonic()
            if pause > 0 and self._arrivals_stop.wait(pause):
                break
            if self._arrivals_stop.is_set() or time.monotonic() > self._deadline:
                break
            request = WebRequest(arrived=time.monotonic())
            with self._lock:
                self.run.requests.append(request)
            self._queue.put((serial, request))
        self.run.arrivals_ended = time.monotonic()

    def _work(self, index: int) -> None:
        try:
            for _ in range(ARRIVALS_CAP):
                if self._stop.is_set() or time.monotonic() > self._deadline:
                    break
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    break
                serial, request = item
                self._serve(index, serial, request)
        finally:
            with contextlib.suppress(Exception):
                connections[self.alias].close()

    def _serve(self, index: int, serial: int, request: WebRequest) -> None:
        conn = connections[self.alias]
        request.started = time.monotonic()
        stage = "connect"
        try:
            conn.close_if_unusable_or_obsolete()
            try:
                try:
                    conn.ensure_connection()
                except Exception:
                    if conn.connection is not None:
                        stage = "init"
                    raise
                stage = "query"
                with transaction.atomic(using=self.alias), conn.cursor() as cur:
                    if self.hold_sql:
                        cur.execute(self.hold_sql)
                    cur.execute(
                        f"INSERT INTO {self.table} (id, worker) VALUES (%s, %s)", [serial, index]
                    )
            finally:
                conn.close_if_unusable_or_obsolete()
        except Exception as exc:
            request.error = f"{type(exc).__module__}.{type(exc).__qualname__}"
            request.message = (str(exc).strip().splitlines() or [""])[0]
            request.stage = failed_stage(stage, exc)
            request.ended = time.monotonic()
            return
        request.ended = time.monotonic()
        request.ok = True
        with self._lock:
            self.run.acknowledged.add(serial)

    # -- the timeline ----------------------------------------------------------------
    def mark_fault(self) -> None:
        self.run.fault_at = time.monotonic()

    def mark_removed(self) -> None:
        self.run.removed_at = time.monotonic()

    def stop_arrivals(self) -> None:
        self._arrivals_stop.set()

    def drain(self, timeout: float) -> None:
        """Arrivals stopped: until the queue is empty and every request answered, or timeout."""
        self.stop_arrivals()
        end = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 2):
            if time.monotonic() > end:
                break
            with self._lock:
                pending = [r for r in self.run.requests if r.ended is None]
            if not pending:
                break
            time.sleep(0.05)

    def stop(self) -> None:
        self._arrivals_stop.set()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a web-server thread did not stop"

    def count(self) -> None:
        rows = self.ledger.admin_sql(f"SELECT id FROM {self.table}", dbname="app")
        self.run.present = {int(r[0]) for r in rows}


def wait_warm(server: WebServer, timeout: float = 15.0, served: int = 20) -> None:
    end = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 2):
        if server.run.served >= served or time.monotonic() > end:
            break
        time.sleep(0.05)


# -- connection attempts, as the server counted them -------------------------------------
def tcp_connections_received(log_text: str) -> int:
    """``log_connections`` lines for TCP clients (the superuser's Unix socket excluded)."""
    return sum(
        1
        for line in log_text.splitlines()
        if "connection received: host=" in line and "host=[local]" not in line
    )


# -- reset, then stall ------------------------------------------------------------------
class ResetThenStall:
    """A listener on 127.0.0.1 whose first ``resets`` connections are reset at once (RST),
    and every later one accepted and never answered: a path that hangs up on a reconnect,
    then stops answering (a failing load balancer, a half-dead host). Counts connections."""

    def __init__(self, resets: int, port: int = 0, lifetime: float = 120.0) -> None:
        self.resets = resets
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._deadline = time.monotonic() + lifetime
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        for _ in range(100_000):
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() > self._deadline:
                client.close()
                return
            self.accepted += 1
            if self.accepted <= self.resets:
                # SO_LINGER 0: close() sends RST, libpq sees "Connection reset by peer"
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            else:
                self._held.append(client)  # read nothing, answer nothing

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)
        for sock in self._held:
            sock.close()

    def __enter__(self) -> ResetThenStall:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the report -----------------------------------------------------------------------------
WEB_HEADER = (
    "| scenario | ENGINE | workers | arrived | served | failed | unanswered | lost "
    "| max queue | response p50/p99/max (s) | over 5 s | TCP attempts per served |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def web_row(run: WebRun) -> str:
    values = run.responses()
    times = "/".join(f"{percentile(values, q):.2f}" for q in (0.5, 0.99, 1.0)) if values else "—"
    ratio = run.attempts_per_served
    return (
        f"| {run.scenario} | {run.engine} | {run.workers} | {run.arrived} | {run.served} "
        f"| {run.failed} | {run.unanswered} | {run.lost} | {run.max_queue()} | {times} "
        f"| {run.slower_than(5.0)} | {'—' if ratio is None else f'{ratio:.2f}'} |"
    )


def web_summary(runs: dict[str, WebRun]) -> str:
    return "; ".join(web_row(run) for run in runs.values())


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    begin = time.monotonic()
    try:
        value = call()
    except Exception as exc:
        return time.monotonic() - begin, exc
    return time.monotonic() - begin, value

"""The fault suite's harness: a fault proxy, a load driver, a side-by-side runner, a report.

Everything here runs against real PostgreSQL servers with real TLS (``TLSPostgres``); nothing
is mocked. ``tests/test_faults.py`` builds each scenario from these parts and runs it for the
stock ENGINE (``django.db.backends.postgresql`` with ``sslmode=verify-full`` + ``sslrootcert``)
and for ours on the same server, one after the other, so the two columns of the table in
``docs/reliability.md`` are measured under the same conditions.

Definitions used in the table (also in docs/reliability.md):

- *attempted*: requests started; *failed*: requests that raised.
- *lost*: ids whose INSERT was acknowledged (the commit returned) but that are missing from the
  table afterwards, counted by the superuser over the server's Unix socket.
- *time to recover*: from the moment the cause was removed (``Load.mark_removed``) to the end of
  the first successful request of EVERY thread that ended after it (the slowest thread counts).
  ``first`` is the same for the quickest thread. A request that started during the fault and
  succeeded after the cause went away counts at its end, so waiting inside a retry is included.
- *latency*: request durations (ok or failed) of the requests ending before the fault (before),
  and of the requests overlapping the fault window [fault start, cause removed] (during).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import selectors
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import connections, transaction

from secure_pg_backend.causes import password_sent
from secure_pg_backend.testing import SUPERUSER, TLSPostgres
from secure_pg_backend.testing.servers import _chown_tree, _pg_owner, _run_as_owner

STOCK = "django.db.backends.postgresql"
OURS = "secure_pg_backend"
ENGINES = {"stock": STOCK, "ours": OURS}

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

BACKOFF = 0.05  # a client pausing after an error, so a failing loop does not spin the CPU
MAX_REQUESTS = 20_000  # per thread; the deadline ends a run long before
RUN_DEADLINE = 25.0  # per run, whatever happens: a hang shows as a short run, not a stuck job


# -- the fault proxy ------------------------------------------------------------------
class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server, with faults switchable at run time.

    Modes apply to NEW connections; connections already relayed keep flowing in every mode
    (``reset()`` closes them, as a restarting server would):

    - ``"pass"``: relay both ways.
    - ``"cut"``: answer the SSLRequest with ``S`` (or read a direct ClientHello), then close:
      the client sees ``SSL error: unexpected eof while reading`` (what a restart or failover
      looks like).
    - ``"drop"``: close at once: ``server closed the connection unexpectedly``.
    - ``"reset-direct"``: reset (RST) a connection that opens with a TLS ClientHello (direct
      TLS), as a firewall that only knows the PostgreSQL protocol does; relay the others.

    One relay thread per connection, at most ``max_connections`` at a time (more are closed
    at once, like a full listen queue); ``close()`` stops every thread.
    """

    def __init__(
        self, target_port: int, max_connections: int = 64, lifetime: float = 300.0
    ) -> None:
        self.target = ("127.0.0.1", target_port)
        self._deadline = time.monotonic() + lifetime  # every loop here ends by then
        self.mode = "pass"
        self.cuts_left = 0  # the next N new connections are cut, whatever the mode
        self.max_connections = max_connections
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: dict[int, tuple[socket.socket, socket.socket]] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "cut", "drop", "reset-direct"), mode
        self.mode = mode

    def reset(self) -> int:
        """Close every relayed connection (both sides), as a server going down would."""
        with self._lock:
            pairs = list(self._live.values())
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return len(pairs)

    def close(self) -> None:
        self._stop.set()
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown() does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.reset()
        self._acceptor.join(timeout=5)
        for thread in list(self._threads):
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        for serial in itertools.count():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set() or time.monotonic() > self._deadline:
                client.close()
                return
            self.accepted += 1
            mode = self.mode
            if self.cuts_left > 0:
                self.cuts_left -= 1
                mode = "cut"
            self._threads = [t for t in self._threads if t.is_alive()]
            if mode == "drop" or len(self._threads) >= self.max_connections:
                client.close()
                continue
            thread = threading.Thread(
                target=self._cut if mode == "cut" else self._relay,
                args=(serial, client),
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _cut(serial: int, client: socket.socket) -> None:
        """Accept the SSLRequest (declining GSSAPI encryption first if asked), then hang up."""
        client.settimeout(2.0)
        try:
            for _ in range(2):
                packet = _recv_exactly(client, 8)
                if len(packet) < 8:
                    return
                _, code = struct.unpack("!ii", packet)
                if code == GSSENC_REQUEST_CODE:
                    client.sendall(b"N")
                    continue
                if code == SSL_REQUEST_CODE:
                    client.sendall(b"S")
                else:  # a direct ClientHello: read it whole, so the close is an EOF, not a reset
                    with contextlib.suppress(OSError):
                        client.settimeout(0.2)
                        client.recv(65536)
                return
        except OSError:
            return
        finally:
            client.close()

    def _relay(self, serial: int, client: socket.socket) -> None:
        if self.mode == "reset-direct" and _opens_with_tls(client):
            # SO_LINGER 0: close() sends RST instead of FIN.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):  # as libpq and the server do
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        with self._lock:
            self._live[serial] = (client, upstream)
        peer = {client: upstream, upstream: client}
        selector = selectors.DefaultSelector()
        try:
            for sock in peer:
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                for key, _ in selector.select(timeout=0.2):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    dst = peer[src]
                    dst.setblocking(True)  # a short blocking write keeps the order simple
                    dst.settimeout(5)
                    dst.sendall(data)
                    dst.setblocking(False)
        except OSError:
            return
        finally:
            selector.close()
            with self._lock:
                self._live.pop(serial, None)
            for sock in peer:
                sock.close()


def _opens_with_tls(client: socket.socket) -> bool:
    """Whether the client's first byte is a TLS handshake record (peeked, left unread)."""
    client.settimeout(2.0)
    try:
        first = client.recv(1, socket.MSG_PEEK)
    except OSError:
        return False
    finally:
        client.settimeout(None)
    return first == b"\x16"


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    for _ in range(size):
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) == size:
            break
    return data


# -- the load driver ----------------------------------------------------------------
@dataclass
class Request:
    thread: int
    start: float
    end: float
    ok: bool
    error: str = ""  # exception class, module-qualified
    message: str = ""  # its first line
    # Where it failed: "connect" (opening or getting a connection), "login" (a connect that
    # failed after libpq sent the password: never retried, except the server's or PgBouncer's
    # explicit "not now", see causes.classify), "init" (Django's session setup on a
    # connection just opened) or "query".
    stage: str = ""


@dataclass
class Run:
    """One scenario for one ENGINE: every request and the moments of the fault."""

    scenario: str
    engine: str
    threads: int
    requests: list[Request] = field(default_factory=list)
    acknowledged: set[int] = field(default_factory=set)
    present: set[int] = field(default_factory=set)
    retries: int = 0
    fault_at: float | None = None
    removed_at: float | None = None
    note: str = ""

    @property
    def attempted(self) -> int:
        return len(self.requests)

    @property
    def failures(self) -> list[Request]:
        return [r for r in self.requests if not r.ok]

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def connect_failures(self) -> list[Request]:
        return [r for r in self.failures if r.stage == "connect"]

    @property
    def lost(self) -> int:
        return len(self.acknowledged - self.present)

    def error_classes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.failures:
            name = r.error.rsplit(".", 1)[-1]
            counts[name] = counts.get(name, 0) + 1
        return counts

    def first_success_after_removal(self) -> dict[int, float]:
        """Per thread: seconds from the cause's removal to its first success ending after it."""
        assert self.removed_at is not None
        firsts: dict[int, float] = {}
        for r in sorted(self.requests, key=lambda r: r.end):
            if r.ok and r.end >= self.removed_at and r.thread not in firsts:
                firsts[r.thread] = r.end - self.removed_at
        return firsts

    @property
    def recovery(self) -> float | None:
        """Every thread recovered after this long (None: no removal, or a thread never did)."""
        if self.removed_at is None:
            return None
        firsts = self.first_success_after_removal()
        if len(firsts) < self.threads:
            return None
        return max(firsts.values())

    @property
    def recovery_first(self) -> float | None:
        if self.removed_at is None:
            return None
        firsts = self.first_success_after_removal()
        return min(firsts.values()) if firsts else None

    def before(self) -> list[float]:
        if self.fault_at is None:
            return [r.end - r.start for r in self.requests]
        return [r.end - r.start for r in self.requests if r.end < self.fault_at]

    def during(self) -> list[float]:
        if self.fault_at is None:
            return []
        until = self.removed_at if self.removed_at is not None else float("inf")
        return [r.end - r.start for r in self.requests if r.start < until and r.end > self.fault_at]

    def failures_after(self, moment: float) -> list[Request]:
        return [r for r in self.failures if r.start >= moment]


def failed_stage(stage: str, exc: BaseException) -> str:
    """A connect that failed after libpq sent the password is a "login" failure (libpq's own
    state on psycopg's exception, which Django's wraps as its ``__cause__``)."""
    if stage == "connect" and password_sent(exc.__cause__ or exc):
        return "login"
    return stage


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RetryCounter:
    """Counts ``connection_retried`` signals per alias (absent before the mechanism lands)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        from secure_pg_backend import signals

        self.signal = getattr(signals, "connection_retried", None)
        if self.signal is not None:
            self.signal.connect(self._count, weak=False)

    def _count(self, sender: Any = None, **kwargs: Any) -> None:
        alias = str(kwargs.get("alias", ""))
        with self._lock:
            self.counts[alias] = self.counts.get(alias, 0) + 1

    def close(self) -> None:
        if self.signal is not None:
            self.signal.disconnect(self._count)


_table_serial = itertools.count()


class Load:
    """``threads`` threads doing Django-style requests on ``alias``, each INSERTing one row.

    Each request: ``close_if_unusable_or_obsolete()`` (request_started), one INSERT of a
    unique id inside ``transaction.atomic`` (acknowledged only if the commit returned),
    ``close_if_unusable_or_obsolete()`` (request_finished). A failed request is followed by
    ``BACKOFF`` seconds of sleep, as a client would back off. ``ledger`` is the server the table
    lives on (the superuser reads it back over the Unix socket to count lost rows).
    """

    def __init__(
        self, run: Run, alias: str, ledger: TLSPostgres, deadline: float = RUN_DEADLINE
    ) -> None:
        self.run = run
        self.alias = alias
        self.ledger = ledger
        self.table = f"fault_{os.getpid()}_{next(_table_serial)}"
        ledger.admin_sql(
            f"CREATE TABLE {self.table} (id bigint PRIMARY KEY, thread int NOT NULL)",
            f"GRANT ALL ON {self.table} TO app",
            dbname="app",
        )
        self._stop = threading.Event()
        self._deadline = time.monotonic() + deadline
        self._run_deadline = deadline
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self.ok_per_thread = [0] * run.threads

    # -- the threads --------------------------------------------------------------
    def start(self) -> None:
        for index in range(self.run.threads):
            thread = threading.Thread(target=self._work, args=(index,), daemon=True)
            self._workers.append(thread)
            thread.start()

    def _work(self, index: int) -> None:
        ids = itertools.count(index * 10_000_000)
        try:
            for _ in range(MAX_REQUESTS):
                if self._stop.is_set() or time.monotonic() > self._deadline:
                    break
                self._one(index, next(ids))
        finally:
            with contextlib.suppress(Exception):
                connections[self.alias].close()  # this thread's wrapper (back to the pool)

    def _one(self, index: int, row_id: int) -> None:
        conn = connections[self.alias]
        began, stage = time.monotonic(), "connect"
        try:
            conn.close_if_unusable_or_obsolete()  # request_started
            try:
                try:
                    conn.ensure_connection()  # what the first query does; here for the stage
                except Exception:
                    # Opened, then lost while Django set the session up: past authentication,
                    # so not a connect failure (and not one a connect retry may repeat).
                    if conn.connection is not None:
                        stage = "init"
                    raise
                stage = "query"
                with transaction.atomic(using=self.alias), conn.cursor() as cur:
                    cur.execute(
                        f"INSERT INTO {self.table} (id, thread) VALUES (%s, %s)", [row_id, index]
                    )
            finally:
                conn.close_if_unusable_or_obsolete()  # request_finished
        except Exception as exc:
            ended = time.monotonic()
            message = (str(exc).strip().splitlines() or [""])[0]
            error = f"{type(exc).__module__}.{type(exc).__qualname__}"
            stage = failed_stage(stage, exc)
            with self._lock:
                self.run.requests.append(Request(index, began, ended, False, error, message, stage))
            time.sleep(BACKOFF)
            return
        ended = time.monotonic()
        with self._lock:
            self.run.requests.append(Request(index, began, ended, True))
            self.run.acknowledged.add(row_id)
            self.ok_per_thread[index] += 1

    # -- the timeline ---------------------------------------------------------------
    def mark_fault(self) -> None:
        self.run.fault_at = time.monotonic()

    def mark_removed(self) -> None:
        self.run.removed_at = time.monotonic()

    def wait_warm(self, settle: float = 0.5, timeout: float = 15.0) -> None:
        """Until every thread has succeeded once, then ``settle`` seconds of steady load."""
        _until(lambda: min(self.ok_per_thread) >= 1, timeout)
        time.sleep(settle)

    def wait_recovered(self, timeout: float = 12.0, tail: float = 0.5) -> None:
        """Until every thread has a success after the removal (or ``timeout``), then ``tail``."""
        if self.run.removed_at is not None:
            _until(lambda: self.run.recovery is not None, timeout)
        time.sleep(tail)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=self._run_deadline + 15)
        assert not any(t.is_alive() for t in self._workers), "a load thread did not stop"

    def count(self, ledger: TLSPostgres | None = None) -> None:
        """Read back every id on the server (``ledger`` after a failover: the new primary)."""
        rows = (ledger or self.ledger).admin_sql(f"SELECT id FROM {self.table}", dbname="app")
        self.run.present = {int(r[0]) for r in rows}


def _until(condition: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        if condition() or time.monotonic() > end:
            break
        time.sleep(step)
    return condition()


# -- settings for both ENGINEs ----------------------------------------------------------
POOL = {"min_size": 4, "max_size": 16, "timeout": 10}
MODES: dict[str, dict[str, Any]] = {
    "CONN_MAX_AGE=0": {"CONN_MAX_AGE": 0},
    "persistent+health": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": True},
    "pool+health": {"CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": True, "pool": POOL},
}


def engine_settings(
    server: TLSPostgres,
    engine: str,
    mode: str = "CONN_MAX_AGE=0",
    *,
    port: int | None = None,
    options: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The same server, TLS settings and connection mode for ``stock`` or ``ours``.

    Stock gets ``sslmode=verify-full`` + ``sslrootcert`` (the same CA); ours needs neither
    spelled out. ``connect_timeout`` is 10 for both (our default, stock's is unbounded).
    """
    mode_settings = dict(MODES[mode])
    pool_options = pool or mode_settings.pop("pool", None)
    opts: dict[str, Any] = {"connect_timeout": 10}
    if engine == "stock":
        opts["sslmode"] = "verify-full"
    if pool_options is not None:
        opts["pool"] = dict(pool_options)
    opts.update(options or {})
    entry = server.database_settings(engine=ENGINES[engine], options=opts)
    if port is not None:
        entry["PORT"] = str(port)
    entry.update(mode_settings)
    entry.update(extra)
    return entry


# -- side by side -------------------------------------------------------------------------
_order = itertools.count()


def engine_order() -> list[str]:
    """Alternate which ENGINE runs first, so neither always gets the warmer machine."""
    return ["stock", "ours"] if next(_order) % 2 == 0 else ["ours", "stock"]


Body = Callable[[Load], None]


def drive(
    scenario: str,
    engine: str,
    alias: str,
    ledger: TLSPostgres,
    body: Body,
    *,
    threads: int = 4,
    retries: RetryCounter | None = None,
    count_on: Callable[[], TLSPostgres] | None = None,
    deadline: float = RUN_DEADLINE,
) -> Run:
    """Run ``body`` (which starts the load and plays the fault) and collect one ``Run``."""
    run = Run(scenario=scenario, engine=engine, threads=threads)
    load = Load(run, alias, ledger, deadline)
    try:
        body(load)
        load.wait_recovered()
    finally:
        load.stop()
        with contextlib.suppress(Exception):
            connections[alias].close()
        if connections[alias].pool is not None:
            connections[alias].close_pool()
    load.count(count_on() if count_on else None)
    if retries is not None:
        run.retries = retries.counts.get(alias, 0)
    return run


def side_by_side(
    scenario: str,
    add_alias: Callable[..., None],
    settings_for: Callable[[str], dict[str, Any]],
    ledger: TLSPostgres | Callable[[str], TLSPostgres],
    body: Body,
    *,
    threads: int = 4,
    before_each: Callable[[str], None] | None = None,
    count_on: Callable[[str], TLSPostgres] | None = None,
    deadline: float = RUN_DEADLINE,
) -> dict[str, Run]:
    """The scenario for stock and for ours, one after the other; both results by ENGINE."""
    runs: dict[str, Run] = {}
    retries = RetryCounter()
    try:
        for engine in engine_order():
            if before_each is not None:
                before_each(engine)
            alias = f"{engine}_{next(_table_serial)}"
            add_alias(**{alias: settings_for(engine)})
            server = ledger(engine) if callable(ledger) else ledger
            runs[engine] = drive(
                scenario,
                engine,
                alias,
                server,
                body,
                threads=threads,
                retries=retries,
                count_on=(lambda e=engine: count_on(e)) if count_on else None,
                deadline=deadline,
            )
    finally:
        retries.close()
    return runs


# -- the report ---------------------------------------------------------------------------
REPORT_HEADER = (
    "| scenario | ENGINE | threads | attempted | failed (connect/other) | lost | retries "
    "| recover, every thread (s) | recover, first (s) "
    "| latency before p50/p99 (ms) | during p50/p99/max (ms) | failures by class |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _ms(values: list[float], *qs: float) -> str:
    if not values:
        return "—"
    parts = [f"{percentile(values, q) * 1000:.0f}" for q in qs]
    return "/".join(parts)


def report_row(run: Run) -> str:
    classes = ", ".join(f"{k} {v}" for k, v in sorted(run.error_classes().items())) or "—"
    if run.note:
        classes = f"{classes} ({run.note})"
    return (
        f"| {run.scenario} | {run.engine} | {run.threads} | {run.attempted} "
        f"| {run.failed} ({len(run.connect_failures)}/{run.failed - len(run.connect_failures)}) "
        f"| {run.lost} | {run.retries} | {_seconds(run.recovery)} "
        f"| {_seconds(run.recovery_first)} | {_ms(run.before(), 0.5, 0.99)} "
        f"| {_ms(run.during(), 0.5, 0.99, 1.0)} | {classes} |"
    )


def summary(runs: dict[str, Run]) -> str:
    """One line for an assertion message: the two ENGINEs' counts and some failure texts."""
    parts = []
    for engine, run in runs.items():
        samples = sorted({r.message for r in run.failures})[:3]
        parts.append(
            f"{engine}: {run.attempted} attempted, {run.failed} failed, {run.lost} lost, "
            f"recovery {_seconds(run.recovery)} s, {run.error_classes()}, e.g. {samples}"
        )
    return "; ".join(parts)


def mechanism_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(rows: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"<!-- tests/test_faults.py, commit {mechanism_commit()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores -->\n"
        f"{REPORT_HEADER}\n" + "\n".join(rows) + "\n"
    )
    path.write_text(text)


# -- a CA bundle that can go missing --------------------------------------------------------
@contextlib.contextmanager
def movable_root(source: Path) -> Iterator[Path]:
    """A private copy of the CA bundle (the session's own file stays put for other tests)."""
    directory = Path(tempfile.mkdtemp(prefix="spb-root-"))
    path = directory / "root.pem"
    path.write_bytes(source.read_bytes())
    try:
        yield path
    finally:
        for leftover in directory.iterdir():
            leftover.unlink()
        directory.rmdir()


def hide(path: Path) -> None:
    path.rename(path.with_suffix(".away"))


def restore(path: Path) -> None:
    path.with_suffix(".away").rename(path)


# -- a primary and a streaming standby ------------------------------------------------------
class PrimaryPostgres(TLSPostgres):
    """A TLSPostgres that also lets the superuser replicate over its Unix socket."""

    def _write_conf(self) -> None:
        super()._write_conf()
        hba = self.data / "pg_hba.conf"
        hba.write_text(hba.read_text() + f"local replication {SUPERUSER} scram-sha-256\n")

    def make_synchronous(self) -> None:
        """Commits wait for the standby's flush from now on (after the standby is up: the
        bootstrap's CREATE DATABASE would otherwise wait for a standby that does not exist)."""
        self.admin_sql(
            "ALTER SYSTEM SET synchronous_commit = 'on'",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "SELECT pg_reload_conf()",
        )


@dataclass
class StandbyPostgres(TLSPostgres):
    """A streaming standby of ``primary`` (``pg_basebackup -R``), with its own certificate."""

    primary: PrimaryPostgres | None = None

    def start(self) -> StandbyPostgres:
        primary = self.primary
        assert primary is not None and self.pg_bin is not None
        self.superuser_password = primary.superuser_password  # the same cluster, copied
        self.socket_dir.mkdir()
        _chown_tree(self.base, _pg_owner())
        # The password goes in the environment, not on a command line anyone can read in ps;
        # -R writes it into the standby's primary_conninfo. A fast checkpoint: the default
        # (spread) would wait for most of checkpoint_timeout.
        _run_as_owner(
            [
                str(self.pg_bin / "pg_basebackup"),
                *("-D", str(self.data), "-R", "-c", "fast"),
                *("-h", str(primary.socket_dir), "-p", str(primary.port), "-U", SUPERUSER),
            ],
            env={**os.environ, "PGPASSWORD": primary.superuser_password},
            timeout=60,
        )
        self.data.chmod(0o700)
        self._write_tls_files()
        # Appended lines win over the primary's copied ones. A promoted standby must not wait
        # for a standby of its own, so synchronous_standby_names is empty here.
        lines = {
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "synchronous_standby_names": "''",
            "hot_standby": "on",
            **self.settings,
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# faultkit standby\n")
            conf.writelines(f"{key} = {value}\n" for key, value in lines.items())
        _chown_tree(self.base, _pg_owner())
        self._started()
        return self

    def promote(self) -> None:
        self._pg_ctl("promote", "-w", "-t", "30")


def wait_streaming(primary: TLSPostgres, timeout: float = 15.0) -> bool:
    def streaming() -> bool:
        rows = primary.admin_sql(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        )
        return int(rows[0][0]) >= 1

    return _until(streaming, timeout, step=0.1)


# -- verified sessions ----------------------------------------------------------------------
class VerifiedLog(logging.Handler):
    """The backend's per-connection records (emitted only after the checks passed)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._records_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._records_lock:
            self.records.append(record)

    def for_port(self, port: int) -> list[logging.LogRecord]:
        with self._records_lock:
            return [r for r in self.records if getattr(r, "db_port", None) == port]

    def verified(self, alias: str) -> list[logging.LogRecord]:
        with self._records_lock:
            return [
                r
                for r in self.records
                if getattr(r, "db_alias", None) == alias and hasattr(r, "tls_transport")
            ]


@contextlib.contextmanager
def capture_verified() -> Iterator[VerifiedLog]:
    """Every record of the ``secure_pg_backend`` logger, DEBUG included, while inside."""
    logger = logging.getLogger("secure_pg_backend")
    handler, level = VerifiedLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def app_sessions(server: TLSPostgres) -> list[str]:
    """Sessions the server authorised for the app user (log_connections = on; the superuser
    uses the Unix socket)."""
    return [
        line
        for line in server.log_text().splitlines()
        if "connection authorized: user=app " in line
    ]

"""The endpoints' circuit breakers: one per (host, port), shared by every connection of the
process (plain, persistent and pooled, of every alias).

After a connect spent its whole retry budget without reaching an endpoint, later connects to
it fail at once with the last cause, one caller at a time probes with a single attempt, and any
connection reaching it closes it for everyone. Hosts with an open breaker or a recent timeout
are tried last. ``retry.loop`` consults them around each connect; ``docs/reliability.md`` states
the bounds.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

import psycopg

from . import lifecycle, signals
from .causes import TRANSIENT, classify
from .errors import redact

__all__ = [
    "BREAKERS",
    "CLOSED",
    "OPEN",
    "Breaker",
    "Breakers",
    "Endpoint",
    "breakers",
    "endpoints_of",
    "order_hosts",
    "reset",
]

logger = logging.getLogger("secure_pg_backend")

Endpoint = tuple[str, str]  # (host, port), as HOST and PORT give them
CLOSED, OPEN = "closed", "open"
RECENT_TIMEOUT = 30.0  # a host whose attempt timed out this recently is tried last

# The breakers' lock, held for a few dictionary operations (never around I/O or a signal); a
# forked child gets a new one (``reset``).
_lock = threading.Lock()


_NEVER = float("-inf")


class Breaker:
    """One endpoint's circuit breaker.

    Closed: connects go through. Opened when a connect spent its whole retry budget without
    reaching the endpoint (or a probe failed): from then on a connect whose every endpoint is
    open fails at once with the last cause, while one caller at a time probes with a single
    attempt; a probe's success (or any connect reaching the endpoint) closes it for everyone.
    """

    __slots__ = ("endpoint", "last", "openings", "probing", "since", "state", "timed_out")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.state = CLOSED
        self.since = 0.0
        self.last: BaseException | None = None
        self.openings = 0
        self.probing = False
        self.timed_out = _NEVER

    @property
    def name(self) -> str:
        return f"{self.endpoint[0]}:{self.endpoint[1]}"


class Breakers:
    """Every endpoint's breaker in this process: plain, persistent and pooled connections of
    every alias share them."""

    def __init__(self) -> None:
        # The endpoints a connect has failed to reach (empty until one fails): while it is
        # empty a successful connect has nothing to close (``retry.loop`` asks first).
        self.by_endpoint: dict[Endpoint, Breaker] = {}
        # Breakers now open: while none is, admitting a connect takes no lock (every connect
        # asks). Read without the lock: a breaker opening at that instant is seen by the next.
        self.open_count = 0

    def _get(self, endpoint: Endpoint) -> Breaker:
        breaker = self.by_endpoint.get(endpoint)
        if breaker is None:
            breaker = self.by_endpoint[endpoint] = Breaker(endpoint)
        return breaker

    def admit(self, endpoints: tuple[Endpoint, ...]) -> tuple[bool, BaseException | None]:
        """(probe, refused): go ahead unless every endpoint is open; then this caller probes
        (one attempt) if nobody else does, else it gets the last cause to raise at once."""
        if not self.open_count:
            return False, None
        with _lock:
            breakers = [self.by_endpoint.get(e) for e in endpoints]
            opened = [b for b in breakers if b is not None and b.state == OPEN]
            if len(opened) < len(endpoints):
                return False, None
            if not any(b.probing for b in opened):
                for b in opened:
                    b.probing = True
                return True, None
            last = max(opened, key=lambda b: b.since).last
        return False, _again(last)

    def release(self, endpoints: tuple[Endpoint, ...]) -> None:
        with _lock:
            for endpoint in endpoints:
                breaker = self.by_endpoint.get(endpoint)
                if breaker is not None:
                    breaker.probing = False

    def note(self, endpoints: tuple[Endpoint, ...], exc: BaseException) -> None:
        """Remember which hosts of a failed attempt timed out (tried last for a while)."""
        timed_out = _timed_out(endpoints, exc)
        if timed_out:
            now = time.monotonic()
            with _lock:
                for endpoint in timed_out:
                    self._get(endpoint).timed_out = now

    def trip(self, endpoints: tuple[Endpoint, ...], exc: BaseException, budget: float) -> None:
        """The budget was spent without reaching any of ``endpoints``: open their breakers."""
        opened: list[Breaker] = []
        now = time.monotonic()
        with _lock:
            for endpoint in endpoints:
                breaker = self._get(endpoint)
                breaker.last = exc
                if breaker.state == CLOSED:
                    breaker.state, breaker.since = OPEN, now
                    breaker.openings += 1
                    self.open_count += 1
                    opened.append(breaker)
        for breaker in opened:
            _changed(breaker, exc, budget)

    def probed(self, endpoints: tuple[Endpoint, ...], exc: BaseException, budget: float) -> None:
        """A probe failed: open still if for a transient cause; an endpoint that answered
        (a refusal, a wrong password) is reachable, so its breaker closes."""
        cause = classify(exc)
        if cause is not None and cause.kind == TRANSIENT:
            self.trip(endpoints, exc, budget)
            return
        for endpoint in endpoints:
            self._close(endpoint)

    def reached(self, endpoints: tuple[Endpoint, ...], connection: Any) -> None:
        """A connection was made: close the breaker of the endpoint it reached."""
        endpoint = _endpoint_of(connection, endpoints)
        if endpoint is not None:
            self._close(endpoint)

    def _close(self, endpoint: Endpoint) -> None:
        known = self.by_endpoint.get(endpoint)
        if known is None or (known.state == CLOSED and known.timed_out == _NEVER):
            return  # the usual case, every connect: nothing to change, no lock taken
        with _lock:
            breaker = self.by_endpoint.get(endpoint)
            if breaker is None:
                return
            breaker.timed_out = _NEVER
            if breaker.state == CLOSED:
                return
            breaker.state, breaker.last = CLOSED, None
            self.open_count -= 1
            since = breaker.since
        _changed(breaker, None, time.monotonic() - since)

    def order(self, endpoints: tuple[Endpoint, ...]) -> list[int]:
        """Indexes of ``endpoints``, open breakers and recent timeouts last (stable)."""
        now = time.monotonic()
        with _lock:
            rank = []
            for endpoint in endpoints:
                b = self.by_endpoint.get(endpoint)
                rank.append(
                    0
                    if b is None
                    else (2 if b.state == OPEN else 0) + (now - b.timed_out < RECENT_TIMEOUT)
                )
        return sorted(range(len(endpoints)), key=lambda i: rank[i])

    def snapshot(self) -> list[dict[str, Any]]:
        """Every known endpoint's state (the health check, tests, an operator's shell)."""
        now = time.monotonic()
        with _lock:
            breakers = list(self.by_endpoint.values())
            return [
                {
                    "endpoint": b.name,
                    "state": b.state,
                    "for": now - b.since if b.state == OPEN else 0.0,
                    "openings": b.openings,
                    "probing": b.probing,
                    "last": " ".join(str(b.last).split()) if b.last is not None else "",
                }
                for b in breakers
            ]

    def clear(self) -> None:
        self.by_endpoint = {}
        self.open_count = 0


BREAKERS = Breakers()


def reset() -> None:
    """Every breaker closed (a forked child; tests)."""
    global _lock
    _lock = threading.Lock()  # one held by a parent thread at the fork stays held in the child
    BREAKERS.clear()


lifecycle.reset_in_child(reset)


def breakers() -> list[dict[str, Any]]:
    """The state of every endpoint this process connected to (see ``Breakers.snapshot``)."""
    return BREAKERS.snapshot()


def _changed(breaker: Breaker, exc: BaseException | None, seconds: float) -> None:
    """The one log line (and signal) per change of state."""
    if exc is not None:
        words = redact(" ".join(str(exc).split()), ())
        logger.warning(
            "database endpoint %s: no connection within the %.1f-s retry budget: connects "
            "to it now fail at once with the last error, one probe at a time: %s",
            breaker.name,
            seconds,
            words,
            extra={"db_endpoint": breaker.name, "breaker_state": OPEN},
        )
    else:
        logger.warning(
            "database endpoint %s: reachable again after %.1f s: connects go through",
            breaker.name,
            seconds,
            extra={"db_endpoint": breaker.name, "breaker_state": CLOSED},
        )
    signals.breaker_changed.send(
        Breakers, endpoint=breaker.name, state=breaker.state, openings=breaker.openings
    )


def _again(last: BaseException | None) -> BaseException:
    """A new exception like the last cause (same class and words), as stock would raise."""
    if last is None:
        return psycopg.OperationalError("connection failed")
    try:
        return type(last)(str(last))
    except Exception:
        return psycopg.OperationalError(str(last))


def endpoints_of(params: Mapping[str, Any]) -> tuple[Endpoint, ...]:
    """(host, port) of each host libpq will try, as the parameters give them."""
    host = params.get("host")
    if not host:
        return ()
    port = str(params.get("port") or "")
    if "," not in (text := str(host)) and "," not in port:  # one host: every connect's case
        return ((text.strip(), port.strip() or "5432"),)
    hosts = [h.strip() for h in text.split(",")]
    ports = [p.strip() for p in port.split(",")]
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):
        return ()  # libpq refuses these itself
    return tuple((h, p or "5432") for h, p in zip(hosts, ports, strict=True))


_LISTS = ("host", "port", "hostaddr")


def order_hosts(params: Mapping[str, Any], endpoints: tuple[Endpoint, ...]) -> dict[str, Any]:
    """``params`` with the hosts (and their ports and addresses) in the breakers' order."""
    shaped = dict(params)
    if len(endpoints) < 2:
        return shaped
    order = BREAKERS.order(endpoints)
    if order == sorted(order):
        return shaped
    return _pick(shaped, order, len(endpoints))


def _pick(params: dict[str, Any], order: list[int], hosts: int) -> dict[str, Any]:
    for key in _LISTS:
        value = params.get(key)
        if value is None or value == "":
            continue
        items = str(value).split(",")
        if len(items) == hosts:  # a single port (or address) applies to every host: kept
            params[key] = ",".join(items[i] for i in order)
    return params


@functools.cache
def _segment() -> re.Pattern[str]:  # compiled when a connect first times out, not at import
    return re.compile(r"^- host: '([^']*)', port: '([^']*)'.*: (.*)$")


def _timed_out(endpoints: tuple[Endpoint, ...], exc: BaseException) -> list[Endpoint]:
    text = str(exc)
    if "timeout expired" not in text:
        return []
    if len(endpoints) == 1:
        return list(endpoints)
    found = []
    for line in text.splitlines():  # psycopg: "- host: 'h', port: 'p', hostaddr: ...: error"
        match = _segment().match(line.strip())
        if match and "timeout expired" in match.group(3):
            found.append((match.group(1), match.group(2)))
    return found


def _endpoint_of(connection: Any, endpoints: tuple[Endpoint, ...]) -> Endpoint | None:
    if len(endpoints) == 1:
        return endpoints[0]
    try:
        pgconn = connection.pgconn
        endpoint = (pgconn.host.decode(), pgconn.port.decode())
    except Exception:
        return None
    return endpoint if endpoint in endpoints else None

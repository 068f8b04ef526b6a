"""The retry state of one connect, and the bucket every connect of the process draws on.

* ``Retry`` (as psycopg_pool's ``AttemptWithBackoff``): the budget, the deadline, the next
  delay, the attempt number; only a transient failure is retried, never a refusal, and after the
  password was sent only the server's (or PgBouncer's) explicit "not now".
* ``Bucket``: a per-process token bucket retries draw on, refilled by successful connects, so
  retries cannot multiply an overload.
* the endpoints' ``breakers`` (their own module: per process, not per connect), consulted
  around each connect.

The attempt itself (files, credentials, TLS, the parameters judged, the link) is ``pipeline``'s;
``docs/reliability.md`` states every bound as the code here enforces it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from . import certificates, lifecycle, policy, signals
from .breakers import (  # the documented retry.breakers() and the names tests use stay here
    BREAKERS,
    CLOSED,
    OPEN,
    Breakers,
    Endpoint,
    breakers,
    endpoints_of,
    order_hosts,
)
from .breakers import reset as _reset_breakers
from .causes import TRANSIENT, Cause, classify
from .errors import redact

__all__ = [
    "BREAKERS",
    "BUCKET",
    "CLOSED",
    "DEFAULT_RETRY_BUDGET",
    "OPEN",
    "Breakers",
    "Bucket",
    "Retry",
    "attempt_once",
    "breakers",
    "deadline",
    "endpoints_of",
    "loop",
    "order_hosts",
    "reset",
    "retry_budget",
    "retrying",
    "time_left",
]

logger = logging.getLogger("secure_pg_backend")

T = TypeVar("T")


# -- the retry state of one connect ----------------------------------------------------------
DEFAULT_RETRY_BUDGET = 5.0  # seconds: a fast restart or a failover takes one or two
FIRST_DELAY, MAX_DELAY = 0.05, 0.5  # a fault that clears is noticed within half a second
# "Too many clients": the server is up and full. A retry costs it a fork, a TLS handshake and
# often a SCRAM exchange, so it waits longer (0.5 s doubling to 2 s, jittered) and draws more
# from the bucket: a storm is not fed by the clients it turned away.
CROWDED_FIRST_DELAY, CROWDED_MAX_DELAY = 0.5, 2.0
# libpq (and psycopg, which enforces it) reads connect_timeout in whole seconds, 1 as 2: no
# attempt is started with less than this left before the deadline.
MIN_ATTEMPT = 2
# The retry budget against storms: one bucket per process, shared by every alias and pool.
# A retry draws RETRY_COST (CROWDED_COST after "too many clients"); a successful connect puts
# back SUCCESS_REFILL and whatever its own retries drew. Full, it pays for 100 retries: eight
# threads riding out a 1-s restart use about 60 and get them back as they reconnect.
BUCKET_CAPACITY, RETRY_COST, CROWDED_COST, SUCCESS_REFILL = 500.0, 5.0, 10.0, 1.0


def retry_budget(options: Mapping[str, Any] | None, connect_timeout: object) -> float:
    """Seconds during which a retry may start: OPTIONS['connect_retry'] (validated by the
    gate), capped by libpq's connect_timeout, which bounds the whole connect (``deadline``)."""
    value = options.get(policy.CONNECT_RETRY, DEFAULT_RETRY_BUDGET) if options else None
    budget = float(DEFAULT_RETRY_BUDGET if value is None else value)
    try:
        timeout = float(connect_timeout)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return budget
    return min(budget, timeout) if timeout > 0 else budget


def deadline(connect_timeout: object, hosts: int = 1) -> float | None:
    """Seconds one connect may take, over every host and attempt: ``connect_timeout`` read
    as libpq reads it (whole seconds), and at least ``MIN_ATTEMPT`` for each host (libpq's
    floor); None when it is 0 or absent (libpq's own: no bound)."""
    try:
        seconds = int(float(connect_timeout))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return float(max(seconds, MIN_ATTEMPT * max(hosts, 1))) if seconds > 0 else None


# The bucket's lock, held for a few instructions; a forked child gets a new one (``reset``).
_lock = threading.Lock()


class Bucket:
    """Tokens that pay for retries (see ``BUCKET_CAPACITY``)."""

    __slots__ = ("capacity", "tokens")

    def __init__(self, capacity: float = BUCKET_CAPACITY) -> None:
        self.capacity = capacity
        self.tokens = capacity

    def take(self, cost: float) -> bool:
        with _lock:
            if self.tokens < cost:
                return False
            self.tokens -= cost
            return True

    def give(self, amount: float) -> None:
        with _lock:
            self.tokens = min(self.capacity, self.tokens + amount)


class Retry:
    """The retry state of one connect (as psycopg_pool's ``AttemptWithBackoff``).

    - ``budget``: no retry starts after it (``OPTIONS['connect_retry']``);
    - ``limit``: the deadline: every attempt ends by it, because each host is given an equal
      share of what is left (``params_for``), in libpq's whole seconds, and no retry starts
      with less than ``MIN_ATTEMPT`` left for each host (``room``);
    - the delay before the next attempt (jittered exponential backoff, longer after "too many
      clients"), paid for by the process's ``BUCKET``;
    - ``endpoints``: what it connects to, for the breakers and the order of the hosts.
    """

    # What every connect starts with, read from the class until an attempt changes it: a new
    # connection stores only what is its own (no __slots__, so these can be class defaults).
    limit: float | None = None  # span seconds from the first libpq call (params_for)
    delay = FIRST_DELAY
    crowded = CROWDED_FIRST_DELAY
    attempt = 1
    drawn = 0.0
    exhausted = False
    probe = False  # this connect probes open breakers: one attempt, no retry

    def __init__(
        self,
        budget: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        limit: float | None = None,
        endpoints: tuple[Endpoint, ...] = (),
    ) -> None:
        self.budget = 0.0 if _ONCE.get() else budget
        self.clock = clock
        self.deadline = clock() + self.budget
        self.span = limit
        self.endpoints = endpoints

    def cause(self, exc: BaseException) -> Cause | None:
        """The transient cause worth another attempt, or None."""
        if self.budget <= 0 or self.probe:
            return None
        cause = classify(exc)
        return cause if cause is not None and cause.kind == TRANSIENT else None

    def wait(self, cause: Cause | None = None) -> float | None:
        """The delay before the next attempt, or None: past the budget, no honest attempt
        left before the deadline, or no token in the bucket."""
        crowded = cause is not None and cause.name == "too_many"
        ceiling = self.crowded if crowded else self.delay
        wait = random.uniform(ceiling / 2, ceiling)  # jitter: restarts hit many clients at once
        starts = self.clock() + wait
        if starts >= self.deadline or (self.limit is not None and self.limit - starts < self.room):
            self.exhausted = True  # the budget (or the deadline) is spent
            return None
        cost = CROWDED_COST if crowded else RETRY_COST
        if not BUCKET.take(cost):
            return None  # not spent: the process is retrying too much, this one fails as stock
        self.drawn += cost
        return wait

    def advance(self, cause: Cause | None = None) -> None:
        self.attempt += 1
        if cause is not None and cause.name == "too_many":
            self.crowded = min(self.crowded * 2, CROWDED_MAX_DELAY)
        else:
            self.delay = min(self.delay * 2, MAX_DELAY)

    @property
    def room(self) -> float:
        """Seconds an attempt needs: ``MIN_ATTEMPT`` for each host it tries."""
        return float(MIN_ATTEMPT * max(len(self.endpoints), 1))

    def spent(self) -> bool:
        """The budget (or the deadline) is used up: no further retry could start in it."""
        if self.exhausted:
            return True
        now = self.clock()
        if now >= self.deadline:
            return True
        return self.limit is not None and self.limit - now < self.room

    def succeeded(self) -> None:
        """Refund what this connect drew, and ``SUCCESS_REFILL`` more (``loop`` calls it only
        when the bucket is not full or this connect drew: otherwise there is nothing to do)."""
        BUCKET.give(SUCCESS_REFILL + self.drawn)

    def params_for(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """``params`` for one libpq call starting now: the hosts in the breakers' order and
        ``connect_timeout`` each host's equal share of what is left, in whole seconds (libpq
        and psycopg give every host that much). None when a share would be under
        ``MIN_ATTEMPT`` (a direct-TLS fallback that finds the deadline near)."""
        endpoints = self.endpoints
        shaped = dict(params) if len(endpoints) < 2 else order_hosts(params, endpoints)
        if self.span is None:
            return shaped
        now = self.clock()
        if self.limit is None:  # the first libpq call: the deadline counts from here
            self.limit = now + self.span
        share = int((self.limit - now) // max(len(endpoints), 1))
        if share < MIN_ATTEMPT:
            return None
        shaped["connect_timeout"] = _seconds(share)
        return shaped


# The text of a share, one object per value: a connection whose parameters are the very
# objects judged last time is not judged again (``pipeline.judge``).
_seconds = functools.lru_cache(maxsize=256)(str)

_ONCE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "secure_pg_backend_once", default=False
)


@contextlib.contextmanager
def attempt_once() -> Iterator[None]:
    """No retries inside: a probe (``dbtls``) reports the state now; its caller retries."""
    token = _ONCE.set(True)
    try:
        yield
    finally:
        _ONCE.reset(token)


def retrying(
    connect: Callable[[], T],
    *,
    alias: str,
    budget: float,
    sender: type,
    secrets: Callable[[], object] = tuple,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    before_attempt: Callable[[], None] | None = None,
) -> T:
    """``connect()``, tried again after transient failures until ``budget`` seconds are spent;
    the last failure is raised unchanged. (No endpoint, so no breaker and no deadline: what
    ``connect`` uses, with both.)"""
    retry = Retry(budget, clock)
    return loop(
        retry,
        lambda _params: connect(),
        {},
        alias=alias,
        sender=sender,
        secrets=secrets,
        sleep=sleep,
        before_attempt=before_attempt,
    )


# The deadline of this thread's last connect that failed (monotonic seconds): a refusal's
# diagnostic handshake (``diagnose``), made right after on the same thread, fits in it.
_FAILED_BY: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "secure_pg_backend_failed_by", default=None
)


def time_left() -> float | None:
    """Seconds left of the deadline of this thread's last failed connect (None: no deadline,
    or none failed)."""
    limit = _FAILED_BY.get()
    return None if limit is None else max(limit - time.monotonic(), 0.0)


def loop(
    retry: Retry,
    connect: Callable[[Mapping[str, Any]], T],
    params: Mapping[str, Any],
    *,
    alias: str,
    sender: type,
    secrets: Callable[[], object],
    sleep: Callable[[float], None] = time.sleep,
    before_attempt: Callable[[], None] | None = None,
) -> T:
    """``connect(params)`` until it succeeds or fails for good (``Retry``); ``connect`` gets
    the same ``params`` each time and must not change them."""
    endpoints = retry.endpoints
    if _FAILED_BY.get() is not None:  # a set allocates a new context: only when it changes
        _FAILED_BY.set(None)
    # No breaker without retries (connect_retry=0, dbtls); none to ask while none is open.
    if endpoints and retry.budget > 0 and BREAKERS.open_count:
        retry.probe, refused = BREAKERS.admit(endpoints)
        if refused is not None:
            raise refused  # the last cause, at once: another caller's probe is on its way
    try:
        while True:
            if before_attempt is not None:
                before_attempt()
            try:
                result = connect(params)
            except Exception as exc:
                if endpoints:
                    BREAKERS.note(endpoints, exc)
                cause = retry.cause(exc)
                wait = retry.wait(cause) if cause is not None else None
                if cause is None or wait is None:
                    _FAILED_BY.set(retry.limit)
                    if retry.probe:  # still unreachable, or it answered (a refusal, a password)
                        BREAKERS.probed(endpoints, exc, retry.budget)
                    elif cause is not None and endpoints and retry.spent():
                        BREAKERS.trip(endpoints, exc, retry.budget)
                    raise
                _announce(sender, alias, retry.attempt, cause, wait, exc, secrets)
                sleep(wait)
                retry.advance(cause)
            else:
                # The usual connect calls neither: the bucket full and nothing drawn, no
                # endpoint ever failed (so no breaker to close).
                if retry.drawn or BUCKET.tokens < BUCKET.capacity:
                    retry.succeeded()
                if endpoints and BREAKERS.by_endpoint:
                    BREAKERS.reached(endpoints, result)
                return result
    finally:
        if retry.probe:
            BREAKERS.release(endpoints)


def _announce(
    sender: type,
    alias: str,
    attempt: int,
    cause: Cause,
    delay: float,
    exc: Exception,
    secrets: Callable[[], object],
) -> None:
    # One DEBUG record per retry; what an operator needs is the breakers' one line per change
    # of state (a 30-s outage used to log hundreds of WARNINGs from one process). Secrets
    # gathered only when sent; the server's words shown under the one text rule.
    words = certificates.certificate_text(redact(" ".join(str(exc).split()), secrets()))
    logger.debug(
        "database alias %r: connection attempt %d failed (%s), retrying in %.2f s: %s",
        alias,
        attempt,
        cause.name,
        delay,
        words,
        extra={"db_alias": alias, "retry_attempt": attempt, "retry_cause": cause.name},
    )
    signals.connection_retried.send(
        sender, alias=alias, attempt=attempt, cause=cause.name, delay=delay, message=words
    )


BUCKET = Bucket()


def _reset_own() -> None:
    global _lock
    _lock = threading.Lock()  # one held by a parent thread at the fork stays held in the child
    BUCKET.tokens = BUCKET.capacity
    _FAILED_BY.set(None)


def reset() -> None:
    """A fresh state: every breaker closed, the bucket full (tests; a forked child resets each
    module's state by itself)."""
    _reset_own()
    _reset_breakers()


lifecycle.reset_in_child(_reset_own)

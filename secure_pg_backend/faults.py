"""Why opening a connection failed, and whether trying again can help.

A failed attempt to open a connection is one of three things:

- a **refusal**: the server could not be verified (certificate not trusted, wrong name, no
  TLS, protocol or cipher below the minimum, no ALPN, client certificate rejected). Trying
  again cannot help. The error names the alias, the cause and the fix, and Django's pool
  hands it to waiting requests at once; the next attempt after the fix succeeds.
- **transient**: the server or the path was briefly unable, before any session existed
  (connection refused or reset, EOF during the handshake, starting up, shutting down, too
  many clients, a timeout, a standby during a failover). Retried with jittered backoff
  within ``OPTIONS['connect_retry']``; then raised exactly as the stock backend raises it.
- **anything else** (a wrong password, a missing database, a sentence not recognised):
  raised as the stock backend raises it, and not retried.

How a failure is recognised: psycopg's exception class (``ConnectionTimeout``), the failed
attempt's libpq state that psycopg keeps (``exc.pgconn``: whether the server had already
accepted the login and started a session),
the reasons OpenSSL gives for TLS failures (never translated), and libpq's and the server's
sentences in English (a Python process runs libpq with ``LC_MESSAGES=C`` unless the
application calls ``setlocale``). A failure not recognised falls in the third group, so an
unknown or translated message can neither become a refusal nor a retry: it behaves as stock.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from . import signals
from .errors import ConnectionFileError, InsecureConnectionError, link_message, redact

__all__ = ["Cause", "attempt_once", "classify", "explain", "retry_budget", "retrying"]

logger = logging.getLogger("secure_pg_backend")

T = TypeVar("T")

REFUSAL, TRANSIENT = "refusal", "transient"
RETRY_OPTION = "connect_retry"
DEFAULT_RETRY_BUDGET = 5.0  # seconds: a fast restart or a failover takes one or two
FIRST_DELAY, MAX_DELAY = 0.05, 0.5  # a fault that clears is noticed within half a second


class Cause:
    """One kind of failure: its name (a metric label), its kind, and for refusals the words."""

    __slots__ = ("fix", "kind", "markers", "name", "problem")

    def __init__(
        self, name: str, kind: str, markers: tuple[str, ...], problem: str = "", fix: str = ""
    ) -> None:
        self.name = name
        self.kind = kind
        self.markers = markers  # lower-case substrings of libpq's message
        self.problem = problem
        self.fix = fix

    def __repr__(self) -> str:
        return f"Cause({self.name!r}, {self.kind!r})"


_ROOT_FIX = (
    "set OPTIONS['sslrootcert'] to the CA bundle that issued the server's certificate "
    "(see docs/cloud-providers.md), or renew it if expired."
)

# Order matters: the first cause whose marker appears wins (a specific reason before a
# general one), and every refusal is tried before any transient cause.
CAUSES = (
    Cause(
        "hostname",
        REFUSAL,
        ("does not match host name",),
        "the server's certificate is not valid for the host name connected to "
        "(a machine-in-the-middle, or the wrong name in HOST).",
        "set HOST to a name listed on the certificate; to reach it by IP, keep the "
        "name in HOST and put the IP in OPTIONS['hostaddr'].",
    ),
    Cause(
        "untrusted",
        REFUSAL,
        ("certificate verify failed",),
        "the server's certificate is not signed by a CA in the root certificate file "
        "(or is expired or not yet valid).",
        _ROOT_FIX,
    ),
    Cause(
        "no_tls",
        REFUSAL,
        ("server does not support ssl",),
        "the server does not offer TLS.",
        "enable ssl on the server (ssl = on with a certificate); this backend never "
        "falls back to plaintext.",
    ),
    Cause(
        "root_file",
        REFUSAL,
        ("root certificate file",),
        "libpq could not use the root certificate file.",
        "point OPTIONS['sslrootcert'] at a readable PEM CA bundle.",
    ),
    Cause(
        # libpq 17+, sslnegotiation=direct: "...established without ALPN protocol negotiation
        # extension" or "...with unexpected ALPN protocol"
        "alpn",
        REFUSAL,
        ("alpn",),
        "direct TLS negotiation did not select ALPN 'postgresql': the peer is not known "
        "to be a PostgreSQL server (cross-protocol attacks).",
        "connect to a PostgreSQL 17+ server (or a proxy that negotiates ALPN 'postgresql'), "
        "or remove OPTIONS['sslnegotiation'].",
    ),
    Cause(
        "client_certificate",
        REFUSAL,
        (
            "alert unknown ca",
            "certificate required",
            "alert bad certificate",
            "certificate unknown",
        ),
        "the server refused this client's certificate during the TLS handshake.",
        "check OPTIONS['sslcert'] and OPTIONS['sslkey'] (a certificate issued by the CA in "
        "the server's ssl_ca_file, for this USER).",
    ),
    Cause(
        "protocol",
        REFUSAL,
        (
            "unsupported protocol",
            "no protocols available",
            "alert protocol version",
            "wrong version number",
            "handshake failure",
            "no shared cipher",
            "no ciphers available",
            "insufficient security",
            "version too low",
        ),
        "the TLS handshake failed: the server offers no protocol version or cipher this "
        "backend accepts.",
        "check the server's TLS configuration (protocol versions and ciphers) against this "
        "backend's minimum; with OPTIONS['sslnegotiation'] = 'direct' the server must be "
        "PostgreSQL 17 or newer.",
    ),
    # -- transient: nothing verified, nothing sent; the same attempt can work a moment later
    Cause(
        "starting",
        TRANSIENT,
        (
            "the database system is starting up",
            "not yet accepting connections",
            "is in recovery mode",
            "the database system is shutting down",
            "terminating connection due to administrator command",
        ),
    ),
    Cause(
        "too_many",
        TRANSIENT,
        (
            "too many clients",
            "remaining connection slots",
            "too many connections",
            "no more connections allowed",
        ),
    ),
    Cause(
        # target_session_attrs=read-write during a failover: the standby is not promoted yet
        "standby",
        TRANSIENT,
        ("in hot standby mode", "session is read-only", "server is in read-only mode"),
    ),
    Cause("timeout", TRANSIENT, ("timeout expired", "timed out")),
    Cause("refused", TRANSIENT, ("connection refused",)),
    Cause(
        "closed",
        TRANSIENT,
        (
            "server closed the connection unexpectedly",
            "ssl connection has been closed unexpectedly",
            "connection reset",
            "broken pipe",
            "unexpected eof",
            "eof detected",
            "ssl syscall error",
            "could not receive data from server",
            "could not send data to server",
            "could not send ssl negotiation packet",
            "could not send startup packet",
            "pgbouncer cannot connect to server",
            "server login has been failing",
        ),
    ),
    Cause(
        "network",
        TRANSIENT,
        ("no route to host", "network is unreachable", "temporary failure in name resolution"),
    ),
)
# Judged by the backend itself (``ConnectionFileError``): a file this process saw and that is
# gone now is being replaced (a deploy, a renewal), so retried; any other file problem, a
# path that never existed for example, is reported at once. And the policy's own refusals.
FILE_REPLACED = Cause("file", TRANSIENT, ())
FILE = Cause("file", REFUSAL, ())
POLICY = Cause("policy", REFUSAL, ())
# The server accepted the login and began a session: only its "not now" answers (which it
# can give after authentication, e.g. slots reserved for superusers) are worth another try.
_AFTER_LOGIN = frozenset({"starting", "too_many", "standby"})
_ATTEMPTS_HEADER = "multiple connection attempts failed"


def _cause_of(text: str) -> Cause | None:
    lowered = text.lower()
    for cause in CAUSES:
        if any(marker in lowered for marker in cause.markers):
            return cause
    return None


def _segments(text: str) -> list[str]:
    """One message per host tried (psycopg joins them when several hosts failed)."""
    head, sep, tail = text.lower().partition(_ATTEMPTS_HEADER)
    if not sep:
        return [text]
    return tail.split("\n- host:")[1:] or [head]


def classify(exc: BaseException) -> Cause | None:
    """The cause of a failed connection attempt, or None when it is not one we know."""
    if isinstance(exc, ConnectionFileError):
        return FILE_REPLACED if exc.replaced else FILE
    if isinstance(exc, InsecureConnectionError):  # already judged: the policy refused it
        return POLICY
    causes = [_cause_of(segment) for segment in _segments(str(exc))]
    refusals = [c for c in causes if c is not None and c.kind == REFUSAL]
    if refusals:
        return refusals[0]  # one host failing verification is a refusal, whatever the others did
    if not causes or None in causes:
        return None
    cause = causes[-1]
    assert cause is not None
    pgconn = getattr(exc, "pgconn", None)
    logged_in = getattr(pgconn, "backend_pid", 0) or getattr(pgconn, "server_version", 0)
    if logged_in and cause.name not in _AFTER_LOGIN:
        return None
    return cause


def explain(
    exc: BaseException, alias: str, host: str | None, secrets: object = None
) -> InsecureConnectionError | None:
    """A refusal, as an error naming the alias, the host, libpq's words and the fix.

    None for everything else: the caller raises the original exception, as stock does.
    """
    if isinstance(exc, InsecureConnectionError):
        return exc
    cause = classify(exc)
    if cause is None or cause.kind != REFUSAL:
        return None
    detail = " ".join(str(exc).split())
    message = link_message(alias, host, f"{cause.problem} libpq said: {detail}.", cause.fix)
    return InsecureConnectionError(
        redact(message, secrets), alias=alias, host=host, cause=cause.name
    )


# -- retrying a transient failure ----------------------------------------------------------------
def retry_budget(options: dict[str, Any] | Any, connect_timeout: object) -> float:
    """Seconds to keep retrying: OPTIONS['connect_retry'] (validated by the gate), capped by
    libpq's connect_timeout so that a caller who set a short timeout is not held longer."""
    value = options.get(RETRY_OPTION, DEFAULT_RETRY_BUDGET) if options else DEFAULT_RETRY_BUDGET
    budget = float(value)
    try:
        timeout = float(connect_timeout)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return budget
    return min(budget, timeout) if timeout > 0 else budget


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
) -> T:
    """``connect()``, tried again after transient failures until ``budget`` seconds are spent.

    Only opening the connection is retried (``connect`` returns before any query), never a
    refusal nor an unknown failure; no attempt starts once the budget is spent, and the last
    failure is raised unchanged.
    """
    if _ONCE.get():
        budget = 0.0
    deadline = clock() + budget
    delay = FIRST_DELAY
    attempt = 1
    while True:
        try:
            return connect()
        except Exception as exc:
            cause = classify(exc) if budget > 0 else None
            if cause is None or cause.kind != TRANSIENT:
                raise
            wait = random.uniform(delay / 2, delay)  # jitter: restarts hit many clients at once
            if clock() + wait >= deadline:
                raise
            _announce(
                sender, alias, attempt, cause, wait, redact(" ".join(str(exc).split()), secrets())
            )
            sleep(wait)
            attempt += 1
            delay = min(delay * 2, MAX_DELAY)


def _announce(
    sender: type, alias: str, attempt: int, cause: Cause, delay: float, words: str
) -> None:
    logger.warning(
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

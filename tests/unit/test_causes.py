"""Failed connect attempts (causes.classify): refusals, transient faults, the retry loop.

No server: the messages are libpq's and OpenSSL's own, as captured from real failures
(libpq 15 and 18); the retry loop runs on a fake clock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from secure_pg_backend import causes, refusals, signals
from secure_pg_backend import retry as retries
from secure_pg_backend.errors import ConnectionFileError, InsecureConnectionError
from secure_pg_backend.policy import Request
from secure_pg_backend.policy.rules import e017_connect_retry

HOST = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '

REFUSALS = {
    "untrusted": HOST + "SSL error: certificate verify failed",
    "hostname": HOST + 'server certificate for "evil.test" does not match host name "localhost"',
    "no_tls": HOST + "server does not support SSL, but SSL was required",
    "protocol": HOST + "SSL error: unsupported protocol",
    "client_certificate": HOST + "SSL error: tlsv13 alert certificate required",
    "alpn": HOST + "SSL connection was established without ALPN protocol negotiation extension",
}
TRANSIENT = {
    "closed": HOST + "SSL error: unexpected eof while reading",
    "refused": HOST + "Connection refused\n\tIs the server running on that host and accepting "
    "TCP/IP connections?",
    "starting": HOST + "FATAL:  the database system is starting up",
    "too_many": HOST + "FATAL:  sorry, too many clients already",
    "timeout": "connection timeout expired",
    "standby": HOST + "server is in hot standby mode",
}
UNKNOWN = {
    "password": HOST + 'FATAL:  password authentication failed for user "app"',
    "database": HOST + 'FATAL:  database "nope" does not exist',
    "translated": HOST + "Verbindung abgelehnt",
    "other ssl": HOST + "SSL error: decryption failed or bad record mac",
}


@pytest.mark.parametrize(("name", "message"), REFUSALS.items())
def test_refusals_are_recognised(name: str, message: str) -> None:
    cause = causes.classify(psycopg.OperationalError(message))
    assert cause is not None and (cause.name, cause.kind) == (name, causes.REFUSAL)


@pytest.mark.parametrize(("name", "message"), TRANSIENT.items())
def test_transient_failures_are_recognised(name: str, message: str) -> None:
    cause = causes.classify(psycopg.OperationalError(message))
    assert cause is not None and (cause.name, cause.kind) == (name, causes.TRANSIENT)


@pytest.mark.parametrize("message", UNKNOWN.values())
def test_anything_else_is_neither(message: str) -> None:
    assert causes.classify(psycopg.OperationalError(message)) is None
    assert refusals.explain(psycopg.OperationalError(message), "default", "db") is None


def test_an_eof_is_never_explained_as_a_tls_configuration_problem() -> None:
    # The blip of issue 16: "SSL error: unexpected eof" was once a TLS refusal.
    assert refusals.explain(psycopg.OperationalError(TRANSIENT["closed"]), "default", "db") is None


def test_a_refusal_is_explained_with_the_fix_and_without_the_password() -> None:
    error = refusals.explain(
        psycopg.OperationalError(REFUSALS["untrusted"] + " pw-Secret-1"),
        "default",
        "db.example.com",
        secrets="pw-Secret-1",
    )
    assert isinstance(error, InsecureConnectionError) and error.cause == "untrusted"
    text = str(error)
    assert "DATABASES['default'] (host 'db.example.com')" in text and "Fix:" in text
    assert "pw-Secret-1" not in text
    assert error.copy().cause == "untrusted"


def _several(*messages: str) -> psycopg.OperationalError:
    """psycopg's message when every host of a list failed."""
    lines = [messages[-1], "Multiple connection attempts failed. All failures were:"]
    lines += [f"- host: 'h{i}', port: '5432', hostaddr: None: {m}" for i, m in enumerate(messages)]
    return psycopg.OperationalError("\n".join(lines))


def test_one_host_refused_makes_the_whole_attempt_a_refusal() -> None:
    cause = causes.classify(_several(REFUSALS["untrusted"], TRANSIENT["refused"]))
    assert cause is not None and cause.kind == causes.REFUSAL


def test_every_host_transient_is_transient() -> None:
    cause = causes.classify(_several(TRANSIENT["refused"], TRANSIENT["standby"]))
    assert cause is not None and cause.kind == causes.TRANSIENT


def test_one_host_unknown_is_not_retried() -> None:
    assert causes.classify(_several(TRANSIENT["refused"], UNKNOWN["password"])) is None


class _PasswordSent:
    """psycopg's FinishedPGconn of a failed attempt after libpq sent the password."""

    used_password = True
    backend_pid = 0
    server_version = 0


class _NoPassword:
    used_password = False
    backend_pid = 0
    server_version = 0


NOT_NOW = {
    "starting": TRANSIENT["starting"],
    "too_many": TRANSIENT["too_many"],
    "too_many ": HOST + "FATAL:  remaining connection slots are reserved for roles with the "
    "SUPERUSER attribute",
    "standby": HOST + "session is read-only",
    "pooler": HOST + "ERROR:  server login has been failing, try again later (server_login_retry)",
    "pooler ": HOST + "ERROR:  pgbouncer cannot connect to server",
}


@pytest.mark.parametrize(("name", "message"), NOT_NOW.items())
def test_after_the_password_an_explicit_not_now_is_retried(name: str, message: str) -> None:
    sent: Any = _PasswordSent()
    cause = causes.classify(psycopg.OperationalError(message, pgconn=sent))
    assert cause is not None and cause.name == name.strip() and cause.kind == causes.TRANSIENT


@pytest.mark.parametrize(
    "message",
    [
        TRANSIENT["closed"],
        HOST + "SSL connection has been closed unexpectedly",  # a restart during SCRAM
        HOST + "FATAL:  terminating connection due to administrator command",
        TRANSIENT["refused"],
    ],
)
def test_nothing_else_is_retried_once_the_password_was_sent(message: str) -> None:
    sent: Any = _PasswordSent()
    assert causes.classify(psycopg.OperationalError(message, pgconn=sent)) is None
    # libpq's own state decides, not the message: before the password, the same is transient
    before: Any = _NoPassword()
    cause = causes.classify(psycopg.OperationalError(message, pgconn=before))
    assert cause is not None and cause.kind == causes.TRANSIENT


def test_the_backends_own_refusals_are_refusals() -> None:
    files = ConnectionFileError("the root certificate does not exist", alias="a")
    assert causes.classify(files) is causes.FILE and causes.FILE.kind == causes.REFUSAL
    replaced = ConnectionFileError.from_violations("a", None, (), replaced=True)
    assert causes.classify(replaced) is causes.FILE_REPLACED
    assert causes.FILE_REPLACED.kind == causes.TRANSIENT
    assert causes.classify(replaced.copy()) is causes.FILE_REPLACED
    policy = InsecureConnectionError("weak cipher", alias="a")
    cause = causes.classify(policy)
    assert cause is not None and cause.kind == causes.REFUSAL


# -- the budget -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "timeout", "budget"),
    [
        ({}, "10", 5.0),
        ({"connect_retry": 2}, "10", 2.0),
        ({"connect_retry": 30}, "3", 3.0),  # never longer than the caller's connect_timeout
        ({"connect_retry": 0}, "10", 0.0),
        ({"connect_retry": 4}, "0", 4.0),  # 0: libpq waits for ever, so no cap
        ({"connect_retry": 4}, None, 4.0),
    ],
)
def test_budget(options: dict[str, Any], timeout: str | None, budget: float) -> None:
    assert retries.retry_budget(options, timeout) == budget


@pytest.mark.parametrize("value", [-1, "5", True, None, float("nan"), 1e9])
def test_connect_retry_must_be_seconds(value: object) -> None:
    violation = e017_connect_retry(Request("default", {}, {}, options={"connect_retry": value}))
    assert violation is not None and violation.code == "E017"
    assert "connect_retry" in violation.problem and "Fix" not in violation.problem


@pytest.mark.parametrize("value", [0, 0.5, 5, 60])
def test_connect_retry_accepts_seconds(value: float) -> None:
    assert e017_connect_retry(Request("default", {}, {}, options={"connect_retry": value})) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    """Fails with ``error`` ``failures`` times, then returns "connected"."""

    def __init__(self, error: Exception, failures: int, clock: FakeClock, cost: float = 0.01):
        self.error, self.failures, self.clock, self.cost = error, failures, clock, cost
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        self.clock.now += self.cost  # an attempt takes time too
        if self.calls <= self.failures:
            raise self.error
        return "connected"


@pytest.fixture
def retried() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        seen.append(kwargs)

    signals.connection_retried.connect(receiver, weak=False, dispatch_uid="test_faults_unit")
    yield seen
    signals.connection_retried.disconnect(dispatch_uid="test_faults_unit")


def _retry(connect: Flaky, clock: FakeClock, budget: float = 5.0, secrets: str = "") -> Any:
    return retries.retrying(
        connect,
        alias="default",
        budget=budget,
        sender=object,
        secrets=lambda: secrets,
        sleep=clock.sleep,
        clock=clock,
    )


def test_transient_failures_are_retried_until_it_works(
    retried: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    connect = Flaky(psycopg.OperationalError(TRANSIENT["refused"] + " pw-S3"), 4, clock)
    with caplog.at_level(logging.DEBUG, logger="secure_pg_backend"):
        assert _retry(connect, clock, secrets="pw-S3") == "connected"
    assert connect.calls == 5
    assert [r["attempt"] for r in retried] == [1, 2, 3, 4]
    assert {r["cause"] for r in retried} == {"refused"} and {r["alias"] for r in retried} == {
        "default"
    }
    # jittered exponential backoff: each delay within [d/2, d], d doubling from 50 ms
    for number, delay in enumerate(clock.sleeps):
        ceiling = min(retries.FIRST_DELAY * 2**number, retries.MAX_DELAY)
        assert ceiling / 2 <= delay <= ceiling
    assert [r["delay"] for r in retried] == clock.sleeps
    assert len(caplog.records) == 4 and all(r.levelno == logging.DEBUG for r in caplog.records)
    assert "attempt 1 failed (refused)" in caplog.records[0].getMessage()
    assert all("pw-S3" not in r.getMessage() for r in caplog.records)
    assert all("pw-S3" not in r["message"] for r in retried)


def test_no_attempt_starts_after_the_budget(retried: list[dict[str, Any]]) -> None:
    clock = FakeClock()
    error = psycopg.OperationalError(TRANSIENT["starting"])
    connect = Flaky(error, 10_000, clock, cost=0.2)
    with pytest.raises(psycopg.OperationalError) as caught:
        _retry(connect, clock, budget=3.0)
    assert caught.value is error  # raised unchanged, as stock raises it
    assert clock.now - 100.0 <= 3.0 + 0.2  # the last attempt started within the budget
    assert 3 <= connect.calls <= 12


@pytest.mark.parametrize("message", [*REFUSALS.values(), *UNKNOWN.values()])
def test_refusals_and_unknown_failures_fail_on_the_first_attempt(
    message: str, retried: list[dict[str, Any]]
) -> None:
    clock = FakeClock()
    connect = Flaky(psycopg.OperationalError(message), 5, clock)
    with pytest.raises(psycopg.OperationalError):
        _retry(connect, clock)
    assert connect.calls == 1 and retried == [] and clock.sleeps == []


def test_a_probe_attempts_once(retried: list[dict[str, Any]]) -> None:
    clock = FakeClock()
    connect = Flaky(psycopg.OperationalError(TRANSIENT["refused"]), 1, clock)
    with retries.attempt_once(), pytest.raises(psycopg.OperationalError):
        _retry(connect, clock)
    assert connect.calls == 1 and retried == []
    assert _retry(Flaky(psycopg.OperationalError(TRANSIENT["refused"]), 1, clock), clock)


def test_a_zero_budget_never_retries(retried: list[dict[str, Any]]) -> None:
    clock = FakeClock()
    connect = Flaky(psycopg.OperationalError(TRANSIENT["refused"]), 1, clock)
    with pytest.raises(psycopg.OperationalError):
        _retry(connect, clock, budget=0)
    assert connect.calls == 1 and retried == []

"""What a password provider may return, the cache by expiry and the second chance, without a
server (the real-server side is tests/test_rotation.py)."""

from __future__ import annotations

import datetime as dt
import logging
import pickle
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
import pytest

import secure_pg_backend
from secure_pg_backend import provider, signals
from secure_pg_backend.errors import CredentialProviderError
from secure_pg_backend.provider import Credentials, credentials_for, rotated, with_credentials

SECRET = "rotating-Pw-5ecrE7"
NEWER = "rotating-Pw-n3wer"
NOW = 1_900_000_000.0


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """A wall clock the test moves; a clean cache for every test."""
    now = [NOW]
    monkeypatch.setattr(provider, "_clock", lambda: now[0])
    provider.forget()
    yield now
    provider.forget()


def entry(fn: object, **extra: Any) -> dict[str, Any]:
    return {"HOST": "db.test", "USER": "app", "OPTIONS": {"password_provider": fn}, **extra}


class Counting:
    """A provider that counts its calls and answers from a list (the last one repeats)."""

    def __init__(self, *answers: object, delay: float = 0.0) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, alias: str, settings_dict: Mapping[str, Any]) -> object:
        with self.lock:
            self.calls += 1
            answer = self.answers[min(self.calls, len(self.answers)) - 1]
        time.sleep(self.delay)
        return answer


# -- the value ------------------------------------------------------------------------------
def test_credentials_is_exported_and_never_shows_the_password() -> None:
    creds = secure_pg_backend.Credentials("alice", SECRET, expires_at=NOW)
    assert creds is not None and isinstance(creds, Credentials)
    assert SECRET not in repr(creds) and "alice" in repr(creds)
    assert SECRET not in str(creds)
    with pytest.raises(AttributeError, match="immutable"):
        creds.password = "x"  # type: ignore[misc]
    with pytest.raises(TypeError, match="cannot be pickled") as e:
        pickle.dumps(creds)
    assert SECRET not in str(e.value)


def test_the_user_and_password_go_last_in_the_parameters() -> None:
    fn = Counting(Credentials("alice", SECRET))
    params = {"host": "db.test", "user": "app", "password": "from-env", "sslmode": "verify-full"}
    out = with_credentials("main", entry(fn), params)
    assert list(out) == ["host", "sslmode", "user", "password"]
    assert (out["user"], out["password"]) == ("alice", SECRET)
    # user=None keeps USER
    kept = with_credentials("main", entry(Counting(Credentials(None, SECRET))), params)
    assert (kept["user"], kept["password"]) == ("app", SECRET)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (Credentials("al\x00ice host=evil", SECRET), r"user is a value containing .*'\\x00'"),
        (Credentials("alice\n", SECRET), r"user is a value containing .*'\\n'"),
        (Credentials("", SECRET), "user is an empty string"),
        (Credentials(b"alice", SECRET), "user is a bytes instead"),  # type: ignore[arg-type]
        (Credentials("alice", SECRET + "\x00"), r"password is a value containing .*'\\x00'"),
        (Credentials("alice", None), "password is a NoneType instead"),  # type: ignore[arg-type]
        (Credentials("alice", SECRET, dt.datetime(2030, 1, 1)), "naive datetime"),
        (Credentials("alice", SECRET, "2030-01-01"), "expires_at is a str"),  # type: ignore[arg-type]
        (Credentials("alice", SECRET, True), "expires_at is a bool"),
        (("alice", SECRET), "a tuple instead of a non-empty str or secure_pg_backend.Credentials"),
    ],
)
def test_unusable_answers_are_refused_naming_the_alias_never_the_value(
    value: object, shown: str
) -> None:
    with pytest.raises(CredentialProviderError, match=shown) as e:
        credentials_for("main", entry(lambda alias, settings_dict: value))
    message = str(e.value)
    assert SECRET not in message and "alice" not in message and "evil" not in message
    assert "DATABASES['main'] (host 'db.test')" in message
    assert "Nothing was sent" in message and "Fix:" in message


# -- the cache by expiry ----------------------------------------------------------------------
def test_an_answer_with_expires_at_is_reused_until_its_margin(clock: list[float]) -> None:
    fn = Counting(
        Credentials("alice", SECRET, expires_at=NOW + 900),
        Credentials("alice", NEWER, expires_at=NOW + 2000),
    )
    settings = entry(fn)
    for _ in range(5):
        assert credentials_for("main", settings).password == SECRET  # type: ignore[union-attr]
    assert fn.calls == 1
    clock[0] = NOW + 900 - 61  # a minute and a second before the end: still served
    assert credentials_for("main", settings).password == SECRET  # type: ignore[union-attr]
    clock[0] = NOW + 900 - 59  # inside the margin: fetched again
    assert credentials_for("main", settings).password == NEWER  # type: ignore[union-attr]
    assert fn.calls == 2


def test_margin_is_a_quarter_of_a_short_life() -> None:
    assert provider.margin(900) == 60
    assert provider.margin(40) == 10
    assert provider.margin(-5) == 0


def test_aware_datetimes_and_timestamps_both_set_the_expiry(clock: list[float]) -> None:
    moment = dt.datetime.fromtimestamp(NOW + 3600, dt.timezone(dt.timedelta(hours=2)))
    fn = Counting(Credentials(None, SECRET, expires_at=moment))
    credentials_for("main", entry(fn))
    clock[0] = NOW + 3500
    credentials_for("main", entry(fn))
    assert fn.calls == 1  # 100 s left of an hour: outside the minute's margin
    clock[0] = NOW + 3550
    credentials_for("main", entry(fn))
    assert fn.calls == 2


def test_without_expires_at_every_connection_asks(clock: list[float]) -> None:
    fn = Counting(SECRET, Credentials("alice", SECRET))
    settings = entry(fn)
    for _ in range(3):
        credentials_for("main", settings)
    assert fn.calls == 3


def test_an_expired_answer_is_used_once_and_not_cached(clock: list[float]) -> None:
    fn = Counting(Credentials("alice", SECRET, expires_at=NOW - 1))
    credentials_for("main", entry(fn))
    credentials_for("main", entry(fn))
    assert fn.calls == 2


def test_another_alias_or_host_is_another_credential() -> None:
    fn = Counting(Credentials("alice", SECRET, expires_at=NOW + 900))
    credentials_for("a", entry(fn))
    credentials_for("b", entry(fn))
    credentials_for("a", entry(fn, HOST="replica.test"))
    credentials_for("a", entry(fn))
    assert fn.calls == 3


def test_a_burst_of_new_connections_costs_one_fetch() -> None:
    fn = Counting(Credentials("alice", SECRET, expires_at=NOW + 900), delay=0.2)
    settings = entry(fn)
    barrier = threading.Barrier(8)
    got: list[str] = []

    def connect() -> None:
        barrier.wait()
        answer = credentials_for("main", settings)
        assert answer is not None
        got.append(answer.password)

    threads = [threading.Thread(target=connect) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert got == [SECRET] * 8
    assert fn.calls == 1  # the seven others waited for the one fetch in flight


def test_while_one_thread_refreshes_the_others_keep_the_still_valid_answer(
    clock: list[float],
) -> None:
    fn = Counting(
        Credentials("alice", SECRET, expires_at=NOW + 900),
        Credentials("alice", NEWER, expires_at=NOW + 2000),
        delay=0.0,
    )
    settings = entry(fn)
    credentials_for("main", settings)
    clock[0] = NOW + 870  # inside the margin, not expired
    fn.delay = 0.5
    refresher = threading.Thread(target=credentials_for, args=("main", settings))
    refresher.start()
    time.sleep(0.1)
    started = time.monotonic()
    answer = credentials_for("main", settings)
    assert answer is not None and answer.password == SECRET
    assert time.monotonic() - started < 0.3  # did not wait for the refresh
    refresher.join(5)
    assert credentials_for("main", settings).password == NEWER  # type: ignore[union-attr]
    assert fn.calls == 2


def test_a_refused_answer_bypasses_the_cache_once() -> None:
    fn = Counting(
        Credentials("alice", SECRET, expires_at=NOW + 900),
        Credentials("bob", NEWER, expires_at=NOW + 900),
    )
    settings = entry(fn)
    stale = credentials_for("main", settings)
    fresh = credentials_for("main", settings, stale=stale)
    assert fresh is not None and (fresh.user, fresh.password) == ("bob", NEWER)
    # A second refusal of the same stale answer (another pool worker) takes the newer one.
    assert credentials_for("main", settings, stale=stale) is fresh
    assert credentials_for("main", settings) is fresh
    assert fn.calls == 2


def test_a_failing_provider_is_not_cached() -> None:
    fn = Counting(RuntimeError, Credentials("alice", SECRET, expires_at=NOW + 900))

    def provider_(alias: str, settings_dict: Mapping[str, Any]) -> object:
        answer = fn(alias, settings_dict)
        if answer is RuntimeError:
            raise RuntimeError("secrets service unavailable")
        return answer

    settings = entry(provider_)
    with pytest.raises(CredentialProviderError, match="secrets service unavailable"):
        credentials_for("main", settings)
    assert credentials_for("main", settings).password == SECRET  # type: ignore[union-attr]


# -- recognising a rotation -----------------------------------------------------------------
# libpq's words for a failed connect, as psycopg 3.3 raises them (sqlstate None), measured on
# PostgreSQL 15: tests/test_rotation.py checks the real ones.
PASSWORD_FAILED = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
    'password authentication failed for user "alice"'
)
HBA = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
    'no pg_hba.conf entry for host "127.0.0.1", user "alice", database "app", SSL encryption'
)
CLIENT_CERT = "FATAL:  connection requires a valid client certificate"
PAM = 'FATAL:  PAM authentication failed for user "iam_app"'


class WithState(psycopg.OperationalError):
    sqlstate_value: str | None = None

    @property
    def sqlstate(self) -> str | None:  # type: ignore[override]
        return self.sqlstate_value


def test_rotated_is_a_28p01_answer_to_a_provider_credential() -> None:
    handed = provider.Answer("alice", SECRET, None)
    assert rotated(psycopg.OperationalError(PASSWORD_FAILED), handed)
    assert not rotated(psycopg.OperationalError(PASSWORD_FAILED), None)  # a static PASSWORD
    for other in (HBA, CLIENT_CERT, PAM, "could not connect: Connection refused"):
        assert not rotated(psycopg.OperationalError(other), handed), other
    coded = WithState("whatever the words")
    coded.sqlstate_value = "28P01"
    assert rotated(coded, handed)
    coded.sqlstate_value = "28000"  # a SQLSTATE, when there is one, outranks the words
    coded.args = (PASSWORD_FAILED,)
    assert not rotated(coded, handed)


# -- the second chance, with a stand-in connect (the real one: tests/test_rotation.py) --------
class Wrapper:
    """Sender class for the signal."""


def test_second_chance_asks_again_and_connects_once_more(caplog: pytest.LogCaptureFixture) -> None:
    fn = Counting(
        Credentials("alice", SECRET, expires_at=NOW + 900),
        Credentials("alice", NEWER, expires_at=NOW + 900),
    )
    settings = entry(fn)
    retried: list[dict[str, Any]] = []

    def on_retry(sender: object, **kwargs: Any) -> None:
        retried.append(kwargs)

    signals.connection_retried.connect(on_retry)
    used: list[str] = []

    def connect() -> str:
        params = with_credentials("main", settings, {"dbname": "app"})
        used.append(params["password"])
        if params["password"] == SECRET:
            raise psycopg.OperationalError(PASSWORD_FAILED)
        return "connected"

    caplog.set_level(logging.WARNING, logger="secure_pg_backend")
    try:
        assert provider.second_chance(connect, alias="main", sender=Wrapper) == "connected"
    finally:
        signals.connection_retried.disconnect(on_retry)
    assert used == [SECRET, NEWER] and fn.calls == 2
    assert [(r["cause"], r["attempt"], r["alias"]) for r in retried] == [("rotated", 1, "main")]
    assert "rotated" in caplog.text and "alice" in caplog.text
    assert SECRET not in caplog.text + retried[0]["message"]


def test_second_chance_is_once_per_connect_and_never_for_static_passwords() -> None:
    fn = Counting(Credentials("alice", SECRET))  # always the refused value
    settings = entry(fn)
    attempts = []

    def connect() -> None:
        attempts.append(with_credentials("main", settings, {"dbname": "app"}))
        raise psycopg.OperationalError(PASSWORD_FAILED)

    with provider.one_connect():
        for _ in range(3):  # three attempts of one connect (a retry loop around them)
            with pytest.raises(psycopg.OperationalError):
                provider.second_chance(connect, alias="main", sender=Wrapper)
    assert len(attempts) == 4 and fn.calls == 4  # one second chance in all

    static = {"HOST": "db.test", "USER": "app", "PASSWORD": "wrong", "OPTIONS": {}}
    attempts.clear()

    def connect_static() -> None:
        attempts.append(with_credentials("main", static, {"dbname": "app", "password": "wrong"}))
        raise psycopg.OperationalError(PASSWORD_FAILED)

    with pytest.raises(psycopg.OperationalError):
        provider.second_chance(connect_static, alias="main", sender=Wrapper)
    assert len(attempts) == 1

"""What a password provider hands out, when it is asked again, and its second chance.

``policy`` (its "password provider" section) decides whether ``OPTIONS['password_provider']``
may be used at all (E015, before any I/O). This module is what happens at connect time:

* ``Credentials(user, password, expires_at=None)``: what a provider may return instead of a
  bare password (a ``str`` stays the password, as before), so that the *user* can rotate
  too (AWS Secrets Manager's alternating users, Vault's database engine). The user goes to
  libpq for that physical connection only; the settings are never changed.
* Screening: the answer must be something libpq can take (no control characters: a NUL would
  cut off the TLS keywords after it). Its values are never shown in a message.
* The cache by expiry: an answer with ``expires_at`` is reused until it is near its end
  (``margin``), so a pool's burst of new connections costs one fetch; concurrent callers wait
  for the fetch in flight instead of starting their own. An answer without ``expires_at`` is
  never cached: the provider is asked for every physical connection, as before.
* The second chance: when the server answers "password authentication failed" (SQLSTATE
  28P01) to credentials a provider supplied, they were most likely rotated between the fetch
  and the use. The provider is asked once more, bypassing the cache, and the connect tried
  once more. Never for a static ``PASSWORD`` (nothing new to ask for), never for another
  refusal (pg_hba, a client certificate: 28000, and a new password would not help), never
  more than once per connect.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from .errors import REDACTED, CredentialProviderError, location, redact
from .policy import control_character, load_provider
from .policy.providers import FIELD, Provider

__all__ = [
    "ROTATED",
    "Answer",
    "Credentials",
    "credentials_for",
    "forget",
    "margin",
    "one_connect",
    "rotated",
    "screen",
    "second_chance",
    "with_credentials",
]

logger = logging.getLogger("secure_pg_backend")
T = TypeVar("T")


class Credentials:
    """A provider's answer with the user: ``Credentials(user, password, expires_at=None)``.

    ``user``: the database user for this physical connection, or None to keep ``USER``.
    ``password``: the password or token (never shown: ``repr`` hides it).
    ``expires_at``: when the value stops working, as an aware ``datetime`` or a Unix
    timestamp (Azure's ``AccessToken.expires_on``); with it the answer is cached until shortly
    before then instead of the provider being asked for every new physical connection.
    Checked when the backend receives it (``screen``), so an error names the alias.
    """

    __slots__ = ("expires_at", "password", "user")

    user: str | None
    password: str
    expires_at: dt.datetime | float | None

    def __init__(
        self, user: str | None, password: str, expires_at: dt.datetime | float | None = None
    ) -> None:
        object.__setattr__(self, "user", user)
        object.__setattr__(self, "password", password)
        object.__setattr__(self, "expires_at", expires_at)

    def __setattr__(self, name: str, value: object) -> None:
        # Shared between the threads of a pool through the cache: never changed in place.
        raise AttributeError(f"Credentials are immutable; cannot set {name!r}")

    def __repr__(self) -> str:
        return (
            f"Credentials(user={self.user!r}, password={REDACTED!r}, "
            f"expires_at={self.expires_at!r})"
        )

    def __reduce__(self) -> Any:
        # Pickling would write the secret somewhere (a cache, a task queue): refuse it.
        raise TypeError("Credentials hold a secret and cannot be pickled")


class Answer:
    """A provider's answer, screened: what libpq is given, and until when it may be reused."""

    __slots__ = ("expires", "password", "user")

    def __init__(self, user: str | None, password: str, expires: float | None) -> None:
        self.user = user
        self.password = password
        self.expires = expires  # Unix time, or None: never cached

    def __repr__(self) -> str:
        return f"Answer(user={self.user!r}, password={REDACTED!r}, expires={self.expires!r})"


_FIX = (
    "return the password or token as a str without control characters, or "
    "secure_pg_backend.Credentials(user, password, expires_at=None) with a str user (or None "
    "to keep USER), a str password, and expires_at an aware datetime, a Unix timestamp or None."
)


def _text_problem(value: object, what: str) -> str | None:
    """Why a text value cannot go to libpq, worded without the value; None if it can."""
    if not isinstance(value, str):
        return f"{what} a {type(value).__name__} instead of a non-empty str."
    if not value:
        return f"{what} an empty string instead of a non-empty str."
    found = control_character(value)
    if found is not None:
        # libpq reads the connection string as a C string: a NUL would cut off every
        # keyword after the value, the forced TLS settings among them.
        return f"{what} a value containing the control character {found}, which libpq cannot take."
    return None


def _expiry(value: object) -> tuple[float | None, str | None]:
    """``expires_at`` as Unix time, or why it cannot be used (the value is not shown: a
    wrongly typed field may hold anything)."""
    if value is None:
        return None, None
    if isinstance(value, dt.datetime):
        if value.utcoffset() is None:
            # A naive datetime is local time to Python and UTC to google-auth: guessing
            # would cache an expired token, or refuse a valid one, by the UTC offset.
            return None, (
                "Credentials whose expires_at is a naive datetime (no time zone); use an aware "
                "one, e.g. datetime.now(timezone.utc) + timedelta(minutes=15)."
            )
        return value.timestamp(), None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), None
    return None, (
        f"Credentials whose expires_at is a {type(value).__name__}, not a datetime, a number "
        "or None."
    )


def screen(value: object) -> tuple[Answer | None, str | None]:
    """A provider's return value as an ``Answer``, or why libpq cannot be given it."""
    if isinstance(value, str):
        problem = _text_problem(value, "")
        return (None, problem.lstrip()) if problem else (Answer(None, value, None), None)
    if not isinstance(value, Credentials):
        return None, (
            f"a {type(value).__name__} instead of a non-empty str or secure_pg_backend.Credentials."
        )
    problem = _text_problem(value.password, "Credentials whose password is")
    if problem is None and value.user is not None:
        problem = _text_problem(value.user, "Credentials whose user is")
    expires, expiry_problem = _expiry(value.expires_at)
    problem = problem or expiry_problem
    if problem is not None:
        return None, problem
    return Answer(value.user, value.password, expires), None


# -- asking the provider ------------------------------------------------------------------
def _ask(provider: Provider, name: str, alias: str, settings_dict: Mapping[str, Any]) -> Answer:
    host = settings_dict.get("HOST") or None
    where = location(alias, host)
    head = f"secure_pg_backend could not get a password for {where}: the password provider {name!r}"
    try:
        value = provider(alias, settings_dict)
    except Exception as exc:
        # The provider failed before producing a secret: its own message names the cause.
        detail = " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(".")
        fix = "check the provider's credentials and configuration."
        message = f"{head} raised {detail}. Fix: {fix}"
        raise CredentialProviderError(message, alias=alias, host=host) from exc
    answer, problem = screen(value)
    if answer is None:
        # Never show the value: a wrongly typed or malformed secret is still a secret.
        message = f"{head} ({FIELD}) returned {problem} Nothing was sent. Fix: {_FIX}"
        raise CredentialProviderError(message, alias=alias, host=host)
    return answer


# -- the cache by expiry ----------------------------------------------------------------------
# An answer is fetched again once less than ``margin`` of its life is left: at most a minute,
# and at most a quarter of its life (a Secrets Manager value cached for 60 s is fetched again
# after 45 s, an RDS IAM token after 14 minutes). Connections already open are not affected:
# the server checks the password only when a connection is opened.
MARGIN_SECONDS = 60.0
MARGIN_FRACTION = 0.25

_clock: Callable[[], float] = time.time  # wall clock: expires_at is a point in time


def margin(lifetime: float) -> float:
    """How long before its end a cached answer of this lifetime is fetched again."""
    return min(MARGIN_SECONDS, max(lifetime, 0.0) * MARGIN_FRACTION)


class _Slot:
    """The cached answer of one provider for one alias, and the lock of the fetch in flight."""

    __slots__ = ("answer", "expires", "lock", "provider", "refresh_at")

    def __init__(self, provider: Provider) -> None:
        self.provider = provider  # held: its id() is part of the key
        self.answer: Answer | None = None
        self.refresh_at = self.expires = 0.0
        self.lock = threading.Lock()

    def get(self, fetch: Callable[[], Answer], stale: Answer | None) -> Answer:
        """The cached answer while it is fresh, else one fetch shared by concurrent callers.

        ``stale``: an answer the server refused; the cache may serve only a newer one (another
        thread's second chance may have fetched it already), else the provider is asked.
        """
        if stale is None:
            answer, now = self.answer, _clock()
            if answer is not None and now < self.refresh_at:
                return answer
            if answer is not None and now < self.expires and self.lock.locked():
                return answer  # near its end but still valid; another thread is fetching
        with self.lock:  # one fetch in flight; the others wait here and take its answer
            answer, now = self.answer, _clock()
            # Fresh from the fetch this caller waited for; for a second chance, any answer
            # newer than the refused one that is still valid.
            until = self.expires if stale is not None else self.refresh_at
            if answer is not None and answer is not stale and now < until:
                return answer
            answer = fetch()
            self._store(answer, _clock())
            return answer

    def _store(self, answer: Answer, now: float) -> None:
        if answer.expires is None or answer.expires <= now:
            self.answer = None  # nothing to reuse: asked again for the next connection
            return
        self.expires = answer.expires
        self.refresh_at = answer.expires - margin(answer.expires - now)
        self.answer = answer


_slots: dict[tuple[Any, ...], _Slot] = {}
_slots_lock = threading.Lock()
MAX_SLOTS = 256  # settings changed in a long-running process (tests) leave old entries behind


def _slot(alias: str, settings_dict: Mapping[str, Any], provider: Provider) -> _Slot:
    # The answer depends on where it is used: another HOST, PORT, NAME or USER is another
    # credential (an IAM token is signed for them).
    fields = tuple(str(settings_dict.get(f) or "") for f in ("HOST", "PORT", "NAME", "USER"))
    key = (alias, id(provider), *fields)
    slot = _slots.get(key)
    if slot is not None and slot.provider is provider:
        return slot
    with _slots_lock:
        slot = _slots.get(key)
        if slot is None or slot.provider is not provider:
            if len(_slots) >= MAX_SLOTS:
                _slots.clear()
            slot = _slots[key] = _Slot(provider)
        return slot


def forget() -> None:
    """Drop every cached answer (tests; a process that wants every provider asked anew)."""
    with _slots_lock:
        _slots.clear()


def credentials_for(
    alias: str, settings_dict: Mapping[str, Any], stale: Answer | None = None
) -> Answer | None:
    """The provider's answer for one new physical connection; None without a provider.

    Cached while an answer with ``expires_at`` is fresh; ``stale`` (the second chance)
    bypasses the cache for the answer the server refused.
    """
    loaded = load_provider(alias, settings_dict)
    if loaded is None:
        return None
    provider, name = loaded
    return _slot(alias, settings_dict, provider).get(
        lambda: _ask(provider, name, alias, settings_dict), stale
    )


# -- the second chance: one connect's record of what it was handed ----------------------------
class _Connect:
    """One connect: the answer its last attempt was handed, and whether its second chance
    was used (once per connect, however many attempts the retries make)."""

    __slots__ = ("handed", "refused", "used")

    def __init__(self) -> None:
        self.handed: Answer | None = None  # set by with_credentials, on this thread
        self.refused: Answer | None = None  # the answer the server refused: fetch anew
        self.used = False


_CONNECT: contextvars.ContextVar[_Connect | None] = contextvars.ContextVar(
    "secure_pg_backend_connect", default=None
)


@contextlib.contextmanager
def one_connect() -> Iterator[None]:
    """Scope of one connect (all its attempts and retries): at most one second chance."""
    if _CONNECT.get() is not None:  # nested (a pool attempt inside a wrapper's connect)
        yield
        return
    token = _CONNECT.set(_Connect())
    try:
        yield
    finally:
        _CONNECT.reset(token)


def with_credentials(
    alias: str, settings_dict: Mapping[str, Any], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Connection parameters with the provider's answer (unchanged without a provider).

    Without a provider the parameters are returned as they are (the gate never passes the
    provider key on): no copy on every new connection. The answer is appended last, not
    replaced in place (a password libpq resolved from PGPASSWORD may sit early in the
    parameters): nothing the provider returns comes before a TLS keyword.
    """
    current = _CONNECT.get()
    refused = current.refused if current is not None else None
    answer = credentials_for(alias, settings_dict, stale=refused)
    if current is not None:
        current.handed = answer
        current.refused = None  # one fresh fetch per second chance
    if answer is None:
        return params if isinstance(params, dict) else dict(params)
    out = {k: v for k, v in params.items() if k not in ("password_provider", "password", "user")}
    out["user"] = answer.user if answer.user is not None else params.get("user")
    if out["user"] is None:
        del out["user"]
    out["password"] = answer.password
    return out


# SQLSTATE 28P01 (invalid_password): PostgreSQL sends it for password, md5 and SCRAM only (PAM,
# LDAP, certificates, pg_hba rejections are 28000). psycopg 3.3 keeps no SQLSTATE for a failed
# connect (``exc.sqlstate`` is None; measured on PostgreSQL 15), so the server's sentence is
# read too, in English as the rest of ``errors`` reads libpq (see its docstring).
INVALID_PASSWORD = "28P01"
_INVALID_PASSWORD_TEXT = "password authentication failed for user"


def rotated(exc: BaseException, handed: Answer | None) -> bool:
    """Whether a failed connect is the server refusing a provider's credentials (28P01).

    ``handed``: what the provider supplied for that attempt; None (a static ``PASSWORD``, or
    no provider) is never a rotation.
    """
    if handed is None:
        return False
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return bool(sqlstate == INVALID_PASSWORD)
    return _INVALID_PASSWORD_TEXT in str(exc).lower()


ROTATED = "rotated"  # the retry metric's cause label and the log record's


def second_chance(
    connect: Callable[[], T],
    *,
    alias: str,
    sender: type,
    secrets: Callable[[], object] = tuple,
) -> T:
    """``connect()``; if the server refused the provider's credentials (``rotated``), the
    provider is asked again (bypassing the cache) and ``connect()`` tried once more.

    ``connect`` must take its parameters from ``with_credentials`` inside this call (the pool's
    kwargs callable does, on the same thread). Once per ``one_connect``; the second failure
    is raised unchanged.
    """
    current = _CONNECT.get()
    if current is None:
        with one_connect():
            return second_chance(connect, alias=alias, sender=sender, secrets=secrets)
    current.handed = None
    try:
        return connect()
    except Exception as exc:
        handed = current.handed
        if current.used or not rotated(exc, handed):
            raise
        current.used = True
        current.refused = handed
        _announce(sender, alias, redact(" ".join(str(exc).split()), _secrets(secrets, handed)))
    return connect()


def _secrets(secrets: Callable[[], object], handed: Answer | None) -> list[object]:
    found: list[object] = [handed.password] if handed is not None else []
    more = secrets()
    found.extend(more if isinstance(more, tuple | list) else [more])
    return found


def _announce(sender: type, alias: str, words: str) -> None:
    """Counted like a transient retry (the retry metric, cause 'rotated'); no secret."""
    logger.warning(
        "database alias %r: the server refused the password provider's credentials (%s); "
        "asking the provider again and retrying once: %s",
        alias,
        ROTATED,
        words,
        extra={"db_alias": alias, "retry_attempt": 1, "retry_cause": ROTATED},
    )
    from . import signals

    signals.connection_retried.send(
        sender, alias=alias, attempt=1, cause=ROTATED, delay=0.0, message=words
    )


def password_for(alias: str, settings_dict: Mapping[str, Any]) -> str | None:
    """The provider's password for one new physical connection; None when none is configured."""
    answer = credentials_for(alias, settings_dict)
    return None if answer is None else answer.password

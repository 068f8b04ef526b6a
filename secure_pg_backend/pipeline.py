"""One connection attempt, the same on every path: the choke point of the policy.

Plain and persistent connections (``base``), Django's pool (``pool``, through psycopg_pool's
``connection_class``), the test database and the no-database alias all open their physical
connections here and nowhere else, in these steps::

    files -> credentials -> how TLS starts -> the parameters judged -> libpq -> the link checked

and retry the whole attempt while it fails for a transient cause (``Retry``).

*The parameters judged* is the guarantee: immediately before psycopg hands them to libpq, the
exact parameters (whatever a subclass's ``get_connection_params``/``get_new_connection``, a
receiver or a ``DATABASES`` edit made of them) are turned into the connection string psycopg
builds and read back by libpq's own parser; every value the policy forces must be there, or the
attempt is refused before a byte is sent. For plain connections the check sits in
``Database.connect`` (``JudgingDatabase``), the call Django's ``get_new_connection`` makes; for
the pool in the pool's connection class. Both refuse a connect made outside an attempt. What
was judged is then what libpq is handed: each attempt's connection string is built from those
very parameters (``psycopg_connect``, psycopg's connect without its parse-backs of them).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from itertools import compress, repeat
from operator import is_
from typing import Any, TypeVar

import psycopg

from . import files, handshake, libpq, lifecycle, policy, psycopg_connect, signals
from .breakers import Endpoint
from .errors import (
    ConnectionFileError,
    InsecureConnectionError,
    link_message,
    redact,
    secret_values,
)
from .retry import Retry, deadline, endpoints_of, loop, retry_budget

__all__ = [
    "JudgingDatabase",
    "Plan",
    "connect",
    "connection_class",
    "judge",
    "tls_info_of",
    "verify",
]

logger = logging.getLogger("secure_pg_backend")

T = TypeVar("T")

# Stored on each psycopg connection: what the link check saw, then the TLSInfo built from it.
LINK_ATTR = "_secure_pg_backend_link"
TLS_INFO_ATTR = "_secure_pg_backend_tls_info"
# ... and the judged parameter set it was opened with (``judge``), for ``verify``.
JUDGED_ATTR = "_secure_pg_backend_judged"


class Hooks:
    """What a caller adds around each attempt (a plan without any has ``hooks=None``); the
    pool's stop it at exit or once closed."""

    def before_attempt(self) -> None:
        """Called before each attempt (a retry included); may raise to stop retrying."""

    def verifying(self) -> contextlib.AbstractContextManager[None]:
        """Around the Python work after libpq returns (the check, the log line, receivers)."""
        return contextlib.nullcontext()


class Plan:
    """What every attempt of one alias (or one pool) shares, for one policy decision.

    ``changers``: the methods below ``VerifiedTLSMixin`` that can change the parameters
    (a subclass's ``get_connection_params``/``get_new_connection``), named in a refusal.
    """

    __slots__ = (
        "alias",
        "changers",
        "confirmed",
        "decision",
        "file_paths",
        "hooks",
        "judged",
        "last_judged",
        "looping",
        "passed",
        "provider",
        "sender",
        "settings_dict",
        "shapes",
        "strings",
        "watch",
    )

    def __init__(
        self,
        alias: str,
        decision: policy.Decision,
        settings_dict: Mapping[str, Any],
        sender: type,
        changers: tuple[str, ...] = (),
        hooks: Hooks | None = None,
    ) -> None:
        self.alias = alias
        self.decision = decision
        self.settings_dict = settings_dict
        self.sender = sender
        self.changers = changers
        self.hooks = hooks
        # Parameter sets already read back by libpq and found to carry the policy (the
        # password aside, see ``judge``): a new connection with the same parameters costs a
        # dict lookup, not a second parse of what psycopg parses anyway.
        self.judged: dict[tuple[Any, ...], None] = {}
        # The last of them as (keys, values, its key in ``judged``): a connection handed the
        # very same objects (the usual one) is not keyed at all. Replaced whole: threads
        # sharing a pool's plan read a consistent one.
        self.last_judged: tuple[tuple[str, ...], tuple[Any, ...], tuple[Any, ...]] | None = None
        # libpq's effective settings, read back from the first live connection of each judged
        # parameter set (and its sslnegotiation): what libpq makes of a connection string
        # depends on that string alone, so later connections read only the facts the server
        # decides (TLS in use, protocol, cipher, ALPN, GSSAPI), never a second PQconninfo.
        self.confirmed: dict[tuple[Any, ...], Mapping[str, str]] = {}
        # The connection string of each attempt with judged parameters (``psycopg_connect``).
        self.strings: dict[Any, str] = {}
        self.file_paths = tuple(need.path for need in decision.files)
        self.watch = files.Watch(decision.files)
        # What the post-handshake rules last read and passed (``verify``): a link that shows
        # the same facts (the same server, protocol and cipher, usually) is not ruled on again.
        self.passed: tuple[Any, ...] | None = None
        self.provider = policy.has_provider(settings_dict)  # credentials asked per attempt
        # (connect_timeout, host, port) -> the retry budget, the deadline and the endpoints:
        # the same for every connect of the alias unless a subclass varies them.
        self.shapes: dict[tuple[Any, ...], tuple[float, float | None, tuple[Endpoint, ...]]] = {}
        # What the retry loop is told besides the attempt (``retry.loop``'s keywords).
        self.looping: dict[str, Any] = {
            "alias": alias,
            "sender": sender,
            "secrets": self.secrets,
            "before_attempt": hooks.before_attempt if hooks is not None else None,
        }

    def with_hooks(self, hooks: Hooks) -> Plan:
        return Plan(
            self.alias, self.decision, self.settings_dict, self.sender, self.changers, hooks
        )

    @property
    def host(self) -> str | None:
        return self.decision.host_display

    def retry_for(self, params: Mapping[str, Any]) -> Retry:
        """The retry state of one connect with ``params`` (``retry``)."""
        timeout = params.get("connect_timeout")
        key = (timeout, params.get("host"), params.get("port"))
        shape = self.shapes.get(key)
        if shape is None:
            endpoints = endpoints_of(params)
            options = self.settings_dict.get("OPTIONS")
            shape = (retry_budget(options, timeout), deadline(timeout, len(endpoints)), endpoints)
            if len(self.shapes) >= 16:
                self.shapes.clear()
            self.shapes[key] = shape
        budget, limit, endpoints = shape
        return Retry(budget, limit=limit, endpoints=endpoints)

    def secrets(self) -> object:
        """What a message about this alias must never show (gathered only when one is made)."""
        return secret_values(self.settings_dict)


# -- the attempt ---------------------------------------------------------------------------
# Paths of the files libpq opens that this process has seen usable: one missing now is being
# replaced (retried as transient), not a path that never existed (reported at once).
_SEEN_FILES: set[str] = set()

# The plan of the attempt in progress on this thread (or task): what ``JudgingDatabase`` and
# the pool's connection class judge the final parameters against.
_CURRENT: contextvars.ContextVar[Plan | None] = contextvars.ContextVar(
    "secure_pg_backend_attempt", default=None
)


def connect(
    plan: Plan,
    params: Mapping[str, Any],
    open_: Callable[[dict[str, Any]], T],
    settle: Callable[[T], None] | None = None,
) -> T:
    """Open one verified connection with ``open_`` (Django's ``get_new_connection``, or
    psycopg's ``Connection.connect`` for the pool): retried within the alias's budget, ended
    by its deadline, through the endpoints' breakers.

    ``settle``: Django's session setup (its time zone and role), run inside the attempt. Through
    PgBouncer it is the first statement that needs a server, and PgBouncer's "not now" to it
    ("server login has been failing", "cannot connect to server": it then hangs up) is retried
    like a connect's: nothing of a request ran. (A pool runs it itself, as ``configure``.)"""
    retry = plan.retry_for(params)
    # A partial of positional arguments, not a closure: no Python frame between the loop and
    # the attempt, and no keyword dict made per call.
    one = functools.partial(attempt, plan, open_, retry, settle)
    if not plan.provider:
        return loop(retry, one, params, **plan.looping)
    from . import provider  # only with a provider: not on every connection's path

    with provider.one_connect():  # a provider's second chance: at most once per connect
        return loop(retry, one, params, **plan.looping)


def attempt(
    plan: Plan,
    open_: Callable[[dict[str, Any]], T],
    retry: Retry | None,
    settle: Callable[[T], None] | None,
    params: Mapping[str, Any],
) -> T:
    """One attempt with ``params`` (last: the loop's argument): the files now, fresh
    credentials, how TLS starts, libpq, the link, the session set up."""
    check_files(plan)
    opened = functools.partial(_opened, plan, open_, retry)
    if not plan.provider:  # a static PASSWORD: nothing to ask
        connection = handshake.negotiate(plan.decision, params, opened)
    else:
        from . import provider

        connection = provider.second_chance(  # its second libpq call: in the deadline too
            lambda: handshake.negotiate(
                plan.decision,
                provider.with_credentials(plan.alias, plan.settings_dict, params),
                opened,
            ),
            alias=plan.alias,
            sender=plan.sender,
            secrets=plan.secrets,
        )
    if settle is not None:
        try:
            settle(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()  # type: ignore[attr-defined]
            raise
    return connection


def _opened(
    plan: Plan,
    open_: Callable[[dict[str, Any]], T],
    retry: Retry | None,
    params: Mapping[str, Any],
) -> T:
    # Every libpq call, a direct-TLS fallback too, within the deadline; a copy either way
    # (what ``open_`` is handed is its own).
    shaped = retry.params_for(params) if retry is not None else dict(params)
    if shaped is None:
        raise psycopg.errors.ConnectionTimeout("connection timeout expired")
    token = _CURRENT.set(plan)
    try:
        connection = open_(shaped)
    except psycopg.OperationalError as exc:
        recheck_files(plan, exc)
        raise
    finally:
        _CURRENT.reset(token)
    if plan.hooks is None:
        verify(plan, connection)
    else:
        with plan.hooks.verifying():
            verify(plan, connection)
    return connection


def check_files(plan: Plan, again: bool = False) -> None:
    """The files libpq will open, as they are now (``stat`` only; the rules run again only
    when a file changed, ``files.Watch``). ``again``: judge them afresh, whatever stat says
    (libpq has just failed on one)."""
    problems: Sequence[tuple[files.FileNeed, str]]
    if again:
        problems = files.file_problems(plan.decision.files)
    else:
        problems = plan.watch.problems()
        if problems is files.UNCHANGED:  # as when last found usable (and remembered then)
            return
    if not problems:
        _SEEN_FILES.update(plan.file_paths)
        return
    raise ConnectionFileError.from_violations(
        plan.alias,
        plan.host,
        [files.file_violation(need, problem) for need, problem in problems],
        replaced=all(
            problem == files.MISSING and need.path in _SEEN_FILES for need, problem in problems
        ),
    )


def recheck_files(plan: Plan, exc: Exception) -> None:
    """libpq could not open a file checked a moment ago: report it as the file it is."""
    if " file " in str(exc):  # libpq: 'root certificate file "..." does not exist', ...
        check_files(plan, again=True)


# -- the parameters judged, immediately before libpq sees them -----------------------------
_STR = repeat(str)  # issubclass(type(value), str) for each value, in C


def judge(plan: Plan | None, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """Refuse unless the exact parameters psycopg will hand libpq carry the policy; return
    what the verdict was remembered by (None: not remembered, e.g. a NUL byte).

    ``params`` are ``psycopg.connect``'s keyword arguments. The libpq keywords among them
    become the connection string psycopg builds, read back by libpq's parser (which skips
    spaces around a key, lets a later duplicate win and stops at a NUL byte, as when it
    connects), and every forced value must be what libpq reads.

    What libpq reads for a forced keyword depends only on which keys there are (``" sslmode"``
    is another key that libpq reads as ``sslmode``), on the forced keys' own values and on a NUL
    byte anywhere: psycopg quotes every value, so no other value can add or change a keyword.
    So a verdict is remembered by exactly that, and a new connection whose password, timeout
    (the deadline shares what is left) or host order changed costs a lookup, not a parse.
    """
    if plan is None:
        raise InsecureConnectionError(
            "secure_pg_backend refused a connection opened outside its attempt pipeline: "
            "Database.connect was called directly. Fix: open connections through the "
            "DatabaseWrapper (ensure_connection, or Django's pool).",
            cause="policy",
        )
    # The very objects judged last time, in the same order (``_remember``): the same
    # connection string, so the same answer, for two identity tests per parameter.
    last = plan.last_judged
    if (
        last is not None
        and len(params) == len(last[0])
        and all(map(is_, params, last[0]))
        and all(map(is_, params.values(), last[1]))
    ):
        return last[2]
    forced_keys = plan.decision.forced
    # The key: every key as given (psycopg's own arguments too: constant for an alias) and the
    # forced keys' values. Built, like the NUL test over every text value (str subclasses
    # too), by C-level iteration: this runs on every new connection.
    values = params.values()
    nul = "\x00" in "".join(compress(values, map(issubclass, map(type, values), _STR)))
    key = None if nul else (tuple(params), tuple(map(str, map(params.get, forced_keys))))
    if key is not None and key in plan.judged:
        _remember(plan, params, key)
        return key
    keywords = {k: v for k, v in params.items() if k not in policy.PSYCOPG_ARGUMENTS}
    try:
        parsed = libpq.parse(libpq.conninfo(keywords))
    except psycopg.ProgrammingError as exc:  # libpq cannot parse it: it would not connect
        parsed = {}
        detail = f" (libpq: {' '.join(str(exc).split())})"
    else:
        detail = ""
    for forced_key, forced in forced_keys.items():
        if parsed.get(forced_key, "") != forced:
            raise _weakened(plan, forced_key, forced, parsed.get(forced_key), detail)
    if key is not None:
        if len(plan.judged) >= 16:  # parameters that keep changing: keep the last few
            plan.judged.clear()
        plan.judged[key] = None
        _remember(plan, params, key)
    return key


# Types whose value an object cannot change, nor what str() makes of it (psycopg's text).
_FIXED = frozenset({str, int, float, bool, type(None)})


def _remember(plan: Plan, params: Mapping[str, Any], key: tuple[Any, ...]) -> None:
    """Keep a judged parameter set as its objects, for ``judge``'s identity test: only when
    every libpq value is of a type that cannot change in place (psycopg's own arguments are
    not part of the connection string)."""
    if all(
        type(value) in _FIXED
        for name, value in params.items()
        if name not in policy.PSYCOPG_ARGUMENTS
    ):
        plan.last_judged = (tuple(params), tuple(params.values()), key)


def _open_judged(cls: Any, plan: Plan | None, params: Mapping[str, Any]) -> Any:
    """Judge ``params``, then open ``cls``'s connection with them; mark it with the judged
    parameter set it was opened with (``verify``)."""
    key = judge(plan, params)
    if key is None or plan is None:  # not remembered (a NUL byte): psycopg's whole connect
        return cls.connect("", **params)
    connection = psycopg_connect.connect(cls, params, plan.strings)
    setattr(connection, JUDGED_ATTR, (key, params.get(policy.NEGOTIATION)))
    return connection


def _weakened(
    plan: Plan, key: str, forced: str, actual: str | None, detail: str
) -> InsecureConnectionError:
    if len(plan.changers) == 1:
        by = f"changed by {plan.changers[0]}"
    elif plan.changers:
        by = "changed by one of " + ", ".join(plan.changers)
    else:
        by = "changed after the policy judged the settings"
    problem = (
        f"the parameters handed to libpq carry {key}={actual!r}, not the policy's "
        f"{forced!r}{detail}: {by}. Nothing was sent to the server."
    )
    fix = (
        f"leave {key} as the policy sets it: a subclass may add to the parameters "
        "get_connection_params returns, not change or remove what the policy forces."
    )
    message = link_message(plan.alias, plan.host, problem, fix)
    return InsecureConnectionError(
        redact(message, secret_values(plan.settings_dict)),
        alias=plan.alias,
        host=plan.host,
        cause="policy",
    )


class JudgingDatabase(types.ModuleType):
    """psycopg, as Django's ``get_new_connection`` calls it (``self.Database.connect``), with
    the final parameters judged first. Every other attribute is psycopg's own."""

    def __init__(self) -> None:
        super().__init__("psycopg", psycopg.__doc__)

    def __getattr__(self, name: str) -> Any:
        value = getattr(psycopg, name)
        setattr(self, name, value)  # looked up once (Django reads exception classes here)
        return value

    def connect(self, conninfo: str = "", **kwargs: Any) -> Any:
        # Django passes keyword parameters only; a string would escape the judgment.
        return _open_judged(psycopg.Connection, None if conninfo else _CURRENT.get(), kwargs)


def connection_class(plan: Plan, base: type[Any] = psycopg.Connection) -> type[Any]:
    """A psycopg connection class for a pool: its ``connect`` is this pipeline."""

    class VerifiedConnection(base):  # type: ignore[misc]
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            if conninfo:
                judge(None, kwargs)  # refused: the pool is built with keyword parameters only
            opener = super()

            def open_(params: dict[str, Any]) -> Any:
                return _open_judged(opener, _CURRENT.get(), params)

            return connect(plan, kwargs, open_)

    VerifiedConnection.__qualname__ = VerifiedConnection.__name__ = f"Verified{base.__name__}"
    return VerifiedConnection


# -- the link, checked after the handshake -------------------------------------------------
def verify(plan: Plan, connection: Any) -> None:
    """The post-handshake check: libpq state only, no SQL, no round trip."""
    decision = plan.decision
    judged = getattr(connection, JUDGED_ATTR, None)
    confirmed = plan.confirmed.get(judged) if judged is not None else None
    facts = handshake.read_facts(
        connection.pgconn, peer=decision.allow_local_proxy, effective=confirmed
    )
    if facts != plan.passed:  # else these very facts passed the rules of this decision
        problem = handshake.check_link(decision, facts)
        if problem is not None:
            connection.close()
            cause, what, fix = problem
            message = link_message(plan.alias, facts.host, what, fix)
            raise InsecureConnectionError(message, alias=plan.alias, host=facts.host, cause=cause)
        plan.passed = facts
    setattr(connection, LINK_ATTR, (facts, decision))
    if confirmed is None and judged is not None:
        if len(plan.confirmed) >= 16:
            plan.confirmed.clear()
        plan.confirmed[judged] = facts.effective
    handshake.learn_direct(decision, connection.pgconn)
    lifecycle.track_connection(connection)  # a forked child must drop it unwritten
    signals.verified(plan.sender, plan.alias, connection, facts, tls_info_of)


def tls_info_of(connection: Any) -> Any:
    """The TLSInfo of a verified connection, built once while its TLS session is live.

    Built on first use rather than at connect time: a connection nobody inspects and
    nobody logs costs only the two libpq calls the policy check needs.
    """
    info = getattr(connection, TLS_INFO_ATTR, None)
    if info is None:
        from .tlsinfo import inspect_connection  # the report: only when something asks

        checked = getattr(connection, LINK_ATTR, None)
        if checked is None:
            raise InsecureConnectionError(
                "this connection was not opened by secure_pg_backend's attempt pipeline"
            )
        info = inspect_connection(connection.pgconn, *checked)
        setattr(connection, TLS_INFO_ATTR, info)
    return info

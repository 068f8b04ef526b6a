"""The DatabaseWrapper: Django's PostgreSQL backend with the TLS policy enforced.

And what happens to its connections when the process forks or exits.

Process lifecycle: what the backend does when the process forks and when it exits.

**Fork** (gunicorn ``--preload``, Celery prefork, multiprocessing, uWSGI with
``py-call-osafterfork``): a child inherits the parent's sockets, and with them the parent's TLS
sessions. Two processes writing to one TLS session corrupt it for both, and even closing the
inherited connection in the child would send a TLS close_notify and a Terminate message on the
parent's session. So, right after the fork and before the child runs any other code, every
connection this backend opened in the parent is dropped without writing a byte: its socket
descriptor is replaced by a dead socket, then libpq frees it (what it would send goes nowhere).
Wrappers forget the connection and the backend's pools leave Django's pool registry, so the
child's first query opens, verifies and logs its own connection. The parent is untouched.

**Exit**: the connection pool runs daemon threads. When the interpreter finalizes, a daemon
thread that wakes up is stopped where it stands (``pthread_exit``); inside a Rust or C++
extension (``cryptography``, or a log handler or signal receiver using one) that aborts the
whole process (``FATAL: exception not rethrown``, SIGABRT). So the connection path runs no
such code of ours, and before finalization starts (``atexit``) each open pool of this backend
stops running Python on its threads: a configure step already running (the check, the log
line, the receivers) may finish, for at most ``EXIT_GRACE`` seconds; a handshake completing
later parks its thread instead; then the pool closes, unless a connection attempt is still in
progress (closing would wait for it; its thread is blocked in libpq, which is safe to stop).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base as postgresql
from django.db.utils import ConnectionHandler

from . import errors, handshake, libpq, policy, signals
from .client import DatabaseClient
from .errors import (
    ConnectionFileError,
    InsecureConnectionError,
    SecurePolicyError,
    link_message,
    secret_values,
)
from .validation import DatabaseValidation

if TYPE_CHECKING:  # imported when first built: a cold start that inspects nothing skips it
    from .tlsinfo import TLSInfo

__all__ = ["EXIT_GRACE", "DatabaseWrapper", "VerifiedTLSMixin", "after_fork_in_child"]

# Paths of the files libpq opens that this process has seen usable: one missing now is being
# replaced (retried as transient), not a path that never existed (reported at once).
_SEEN_FILES: set[str] = set()

# Stored on each psycopg connection: what the check saw, then the TLSInfo built from it.
_LINK_ATTR = "_secure_pg_backend_link"
_TLS_INFO_ATTR = "_secure_pg_backend_tls_info"


def _tls_info_of(connection: Any) -> TLSInfo:
    """Build (once) the TLSInfo of a verified connection, while its TLS session is live.

    Built on first use rather than at connect time: a connection nobody inspects and
    nobody logs costs only the two libpq calls the policy check needs.
    """
    info: TLSInfo | None = getattr(connection, _TLS_INFO_ATTR, None)
    if info is None:
        from .tlsinfo import inspect_connection

        checked = getattr(connection, _LINK_ATTR, None)
        if checked is None:  # pragma: no cover - every connection is verified on creation
            raise ImproperlyConfigured("connection was not opened by secure_pg_backend")
        info = inspect_connection(connection.pgconn, *checked)
        setattr(connection, _TLS_INFO_ATTR, info)
    return info


def standalone_wrapper(alias: str, settings_dict: Mapping[str, Any]) -> Any:
    """The wrapper Django would build for a DATABASES entry, outside ``connections``.

    For judging settings (system checks, dbshell) without touching the process's
    connections; nothing is opened. Django fills in its defaults on a copy.
    """
    entry = {**settings_dict, "TEST": dict(settings_dict.get("TEST") or {})}
    handler = ConnectionHandler(
        {DEFAULT_DB_ALIAS: {"ENGINE": "django.db.backends.dummy"}, alias: entry}
    )
    return handler[alias]


def verified_aliases() -> list[str]:
    """The aliases whose wrapper carries the policy: by class (mixins too), not ENGINE name."""
    from django.db import connections

    aliases = []
    for alias in connections:
        try:
            wrapper = connections[alias]
        except ImproperlyConfigured:  # an ENGINE that does not load: Django reports it
            continue
        if isinstance(wrapper, VerifiedTLSMixin):
            aliases.append(alias)
    return aliases


if TYPE_CHECKING:  # the mixin is only ever combined with a postgresql wrapper
    _WrapperBase = postgresql.DatabaseWrapper
else:
    _WrapperBase = object


class VerifiedTLSMixin(_WrapperBase):
    """The whole TLS policy, on top of any wrapper derived from Django's postgresql one.

    Put it first: ``class DatabaseWrapper(VerifiedTLSMixin, other.DatabaseWrapper)``.
    """

    client_class = DatabaseClient
    validation_class = DatabaseValidation

    _decision: policy.Decision | None = None
    _verdict: policy.Verdict | None = None
    _verdict_key: tuple[Any, ...] | None = None
    _connection_pools: dict[str, Any]  # Django's class-level registry (not in the stubs)

    # -- settings -> libpq parameters, before any network I/O ------------------
    def get_connection_params(self) -> dict[str, Any]:
        verdict = self.policy_verdict()
        if verdict.decision is None or verdict.params is None:
            error: Exception
            if verdict.violations:  # the configuration: found without I/O
                error = SecurePolicyError(
                    self.alias, verdict.host, verdict.violations, secret_values(self.settings_dict)
                )
            else:  # a named service's file, looked at before libpq reads it
                error = ConnectionFileError.from_violations(
                    self.alias, verdict.host, verdict.file_violations
                )
            signals.connection_refused.send(type(self), alias=self.alias, error=error)
            raise error
        self._decision = verdict.decision
        return dict(verdict.params)

    def policy_verdict(self) -> policy.Verdict:
        """Judge the current settings without I/O: the gate, the checks and dbshell use it."""
        params = self._django_connection_params()
        key = self._settings_key()
        if key is not None and key == self._verdict_key and self._verdict is not None:
            return self._verdict
        verdict = policy.judge(self.alias, self.settings_dict, params)
        self._verdict, self._verdict_key = verdict, key
        return verdict

    def _django_connection_params(self) -> dict[str, Any]:
        # Django's method edits OPTIONS in place (it drops "service" when NAME is None,
        # as on the no-database path); hand it a copy so the alias's settings stay intact.
        original = self.settings_dict
        self.settings_dict = {**original, "OPTIONS": dict(original.get("OPTIONS") or {})}
        try:
            params = dict(super().get_connection_params())
        finally:
            self.settings_dict = original
        service = (original.get("OPTIONS") or {}).get("service")
        if original.get("NAME") is None and service:
            # Beyond stock: without its service a service-only configuration would fall to
            # the local socket (refused). Keep it (its host, port, TLS settings, judged as
            # usual); Django's dbname 'postgres' stays explicit and outranks the service's.
            params["service"] = service
        return params

    def _settings_key(self) -> tuple[Any, ...] | None:
        """Inputs of the verdict, or None when it depends on a file's contents (a service).

        The verdict is about configuration only: whether the files libpq opens are usable
        is checked again before every physical connection (``_check_files``).
        """
        options = self.settings_dict.get("OPTIONS") or {}
        if "service" in options or "PGSERVICE" in os.environ:
            return None
        fields = tuple(self.settings_dict.get(f) for f in ("HOST", "PORT", "NAME", "USER"))
        password = self.settings_dict.get("PASSWORD")
        return (fields, password, repr(options), libpq.environment_snapshot())

    # -- the connection, checked after the handshake ---------------------------
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        try:
            if self.pool is not None:  # the pool opens, retries and verifies (see pool)
                connection = super().get_new_connection(conn_params)
            else:
                with self._one_connect():  # at most one second chance per connect
                    connection = self._retrying(lambda: self._open(conn_params), conn_params)
        except Exception as exc:
            refusal = self._explain(exc)
            if refusal is None:
                raise  # transient or not ours: exactly what stock raises
            signals.connection_refused.send(type(self), alias=self.alias, error=refusal)
            if refusal is exc:
                raise
            raise refusal from exc
        if self.pool is None:  # pooled connections were verified in the pool's configure
            self._verify(connection)
        track_wrapper(self)  # so a forked child can make it forget the connection
        return connection

    def _open(self, conn_params: dict[str, Any]) -> Any:
        """One attempt: the files checked now, a fresh password, libpq's handshake."""
        self._check_files()
        connect = super().get_new_connection

        def handshake_with_credentials() -> Any:
            params = policy.with_password(self.alias, self.settings_dict, conn_params)
            return handshake.negotiate(
                self._decision, lambda direct: connect(handshake.with_negotiation(params, direct))
            )

        try:
            return self._second_chance(handshake_with_credentials)
        except self.Database.OperationalError as exc:
            self._recheck_files(exc)
            raise

    def _second_chance(self, connect: Callable[[], Any]) -> Any:
        """``connect``, once more with the provider's fresh answer if the server refused the
        one it was given as rotated (SQLSTATE 28P01; ``provider.second_chance``)."""
        if not policy.has_provider(self.settings_dict):  # a static PASSWORD: nothing to ask
            return connect()
        from . import provider  # only with a provider: not on every connection's path

        return provider.second_chance(
            connect,
            alias=self.alias,
            sender=type(self),
            secrets=lambda: secret_values(self.settings_dict),
        )

    def _one_connect(self) -> contextlib.AbstractContextManager[None]:
        """The scope of one connect's second chance (``provider.one_connect``), if any."""
        if not policy.has_provider(self.settings_dict):
            return contextlib.nullcontext()
        from . import provider

        return provider.one_connect()

    def _retrying(self, connect: Callable[[], Any], conn_params: Mapping[str, Any]) -> Any:
        """``connect`` with transient failures retried within OPTIONS['connect_retry']."""
        options = self.settings_dict.get("OPTIONS") or {}
        return errors.retrying(
            connect,
            alias=self.alias,
            budget=errors.retry_budget(options, conn_params.get("connect_timeout")),
            sender=type(self),
            secrets=lambda: secret_values(self.settings_dict),  # only when a retry is logged
        )

    def _check_files(self) -> None:
        """The files libpq will open, as they are now (``stat`` only, a few microseconds)."""
        decision = self._decision
        if decision is None:  # pragma: no cover - get_connection_params always runs first
            raise ImproperlyConfigured("connection opened without the policy's decision")
        problems = policy.file_problems(decision.files)
        if not problems:
            _SEEN_FILES.update(need.path for need in decision.files)
            return
        raise ConnectionFileError.from_violations(
            self.alias,
            decision.host_display,
            [policy.file_violation(need, problem) for need, problem in problems],
            replaced=all(
                problem == policy.MISSING and need.path in _SEEN_FILES for need, problem in problems
            ),
        )

    def _recheck_files(self, exc: Exception) -> None:
        """libpq could not open a file checked a moment ago: report it as the file it is."""
        if " file " in str(exc):  # libpq: 'root certificate file "..." does not exist', ...
            self._check_files()

    def _configure_connection(self, connection: Any) -> bool:
        # Django's pool calls this for every physical connection it opens.
        if getattr(connection, _LINK_ATTR, None) is None:
            self._verify(connection)
        return bool(super()._configure_connection(connection))  # type: ignore[misc]

    def _verify(self, connection: Any) -> None:
        """The post-handshake check: libpq state only, no SQL, no round trip."""
        decision = self._decision
        if decision is None:  # pragma: no cover - get_connection_params always runs first
            raise ImproperlyConfigured("connection opened without the policy's decision")
        facts = handshake.read_facts(connection.pgconn, peer=decision.allow_local_proxy)
        problem = handshake.check_link(decision, facts)
        if problem is not None:
            connection.close()
            error = InsecureConnectionError(
                link_message(self.alias, facts.host, *problem), alias=self.alias, host=facts.host
            )
            signals.connection_refused.send(type(self), alias=self.alias, error=error)
            raise error
        setattr(connection, _LINK_ATTR, (facts, decision))
        handshake.learn_direct(decision, connection.pgconn)
        track_connection(connection)  # a forked child must drop it unwritten
        not_after = handshake.not_after_once(connection.pgconn)
        client_validity = handshake.client_validity_once(connection.pgconn)
        signals.announce(self.alias, not_after, lambda: _tls_info_of(connection), client_validity)
        signals.connection_verified.send(
            type(self),
            alias=self.alias,
            tls_info=lambda: _tls_info_of(connection),
            facts=facts,
            not_after=not_after,
            client_validity=client_validity,
        )

    def _explain(self, exc: Exception) -> InsecureConnectionError | None:
        host = self._decision.host_display if self._decision else self.settings_dict.get("HOST")
        return errors.explain(exc, self.alias, host, secret_values(self.settings_dict))

    @property
    def tls_info(self) -> TLSInfo:
        """What this alias's current connection negotiated (connects if needed)."""
        if self.connection is None:
            self.ensure_connection()
        info: TLSInfo | None = getattr(self.connection, _TLS_INFO_ATTR, None)
        return info if info is not None else _tls_info_of(self.connection)

    # -- Django's pool, with refusals reported at once -------------------------
    # Django's property builds psycopg_pool.ConnectionPool (imported inside it: no hook for the
    # class) only when the alias has none in the class-level registry, and returns what is
    # registered. So ours is registered first and Django's property does the rest: which
    # aliases pool, the refusal of CONN_MAX_AGE with a pool, what it returns.
    # tests/test_retry.py pins that contract of Django's property.
    @property
    def pool(self) -> Any:
        pool_options = self.settings_dict["OPTIONS"].get("pool")
        if not pool_options or self.alias == NO_DB_ALIAS:
            return None  # Django's answer too, asked on every cursor: kept as cheap as Django's
        if (
            self.alias not in self._connection_pools
            and self.settings_dict.get("CONN_MAX_AGE", 0) == 0
        ):
            self._connection_pools.setdefault(self.alias, self._verified_pool(pool_options))
        return super().pool

    def _verified_pool(self, pool_options: Any) -> Any:
        """The pool Django would build, with the policy's retries and prompt refusals."""
        try:
            from .pool import VerifiedConnectionPool
        except ImportError as err:
            raise ImproperlyConfigured(
                "Error loading psycopg_pool module.\n"
                "Did you install secure-pg-backend[pool] (psycopg[pool])?"
            ) from err
        pool_options = {} if pool_options is True else {**pool_options}
        connect_kwargs = self.get_connection_params()
        connect_kwargs["autocommit"] = True  # as Django's: it sets the real value later
        pool_options.setdefault(  # overridable, as from Django 6.1
            "check",
            VerifiedConnectionPool.check_connection
            if self.settings_dict["CONN_HEALTH_CHECKS"]
            else None,
        )
        kwargs = policy.pool_kwargs(self.alias, self.settings_dict, connect_kwargs)
        decision = self._decision
        negotiates = policy.pool_negotiates(decision)
        if negotiates:  # each new connection's parameters: direct TLS where known to work
            kwargs = handshake.negotiated_kwargs(decision, kwargs)

        def retry(connect: Callable[[], Any]) -> Any:
            def attempt() -> Any:  # the kwargs callable asks the provider, on this thread
                if negotiates:  # one fallback to the SSLRequest, as for unpooled connections
                    return self._second_chance(
                        lambda: handshake.negotiate(decision, lambda direct: connect())
                    )
                return self._second_chance(connect)

            with self._one_connect():  # at most one second chance per connect
                return self._retrying(attempt, connect_kwargs)

        return VerifiedConnectionPool(
            kwargs=kwargs,
            open=False,  # as Django's: opened on first use, not at start-up
            configure=self._configure_connection,
            explain=self._explain,
            prepare=self._check_files,
            recheck=self._recheck_files,
            retry=retry,
            **pool_options,
        )


class DatabaseWrapper(VerifiedTLSMixin, postgresql.DatabaseWrapper):
    """Django's PostgreSQL wrapper under the verified-TLS policy.

    ``display_name`` stays Django's: Django builds user-facing messages from it ("PostgreSQL 14
    or later is required", "... does not support ..."), which must read as on the stock ENGINE.
    What the link is shows in ``tls_info`` and ``manage.py dbtls``.
    """


# -- the process forks or exits ----------------------------------------------------------
# Longest wait at exit for configure steps already running on pool threads.
EXIT_GRACE = 0.5

T = TypeVar("T")


class _Registry(Generic[T]):
    """Weak references to live objects.

    No lock (a fork could leave one held in the child): snapshots copy a dict's values,
    which is atomic under the GIL, and a dead object removes its own entry.
    """

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[T]] = {}

    def add(self, obj: T) -> None:
        key = id(obj)
        refs = self._refs
        refs[key] = weakref.ref(
            obj, lambda ref: refs.pop(key, None) if refs.get(key) is ref else None
        )

    def live(self) -> list[T]:
        return [obj for ref in list(self._refs.values()) if (obj := ref()) is not None]

    def clear(self) -> None:
        self._refs.clear()


_connections: _Registry[Any] = _Registry()  # psycopg connections opened (and verified) here
_wrappers: _Registry[Any] = _Registry()  # DatabaseWrappers that held one of them
_pools: _Registry[Any] = _Registry()  # VerifiedConnectionPool instances


def track_connection(connection: Any) -> None:
    _connections.add(connection)


def track_wrapper(wrapper: Any) -> None:
    _wrappers.add(wrapper)


def track_pool(pool: Any) -> None:
    _pools.add(pool)


# -- fork (see the module docstring) ---------------------------------------------------
def _dead_socket() -> socket.socket:
    """A socket whose peer is gone: writes fail (EPIPE), nothing reaches any server."""
    ours, peer = socket.socketpair()
    peer.close()
    return ours


def _drop_inherited(connection: Any) -> None:
    pgconn = connection.pgconn
    if not pgconn.pgconn_ptr:  # already closed
        return
    try:
        fd = pgconn.socket
    except Exception:  # libpq has no socket for it: nothing shared to protect
        fd = -1
    if fd >= 0:
        with _dead_socket() as dead:
            os.dup2(dead.fileno(), fd)  # the parent's socket is no longer reachable from here
    pgconn.finish()  # frees libpq's state; its Terminate and close_notify go nowhere


def after_fork_in_child() -> None:
    """Forget everything the parent opened; the child then opens its own connections.

    Registered with ``os.register_at_fork``. Call it yourself right after a fork that
    bypasses Python's hooks (uWSGI without ``py-call-osafterfork``: ``@postfork``).
    """
    for connection in _connections.live():
        _drop_inherited(connection)
    _connections.clear()
    for wrapper in _wrappers.live():
        wrapper.connection = None  # Django opens a new one on the next query
    _wrappers.clear()
    for pool in _pools.live():
        pool.abandon_after_fork()
    _pools.clear()
    signals.after_fork_in_child()  # the child announces its own first connections


# -- exit ------------------------------------------------------------------------------
def _quiesce_pools() -> None:
    deadline = time.monotonic() + EXIT_GRACE
    for pool in _pools.live():
        pool.close_at_exit(deadline)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=after_fork_in_child)
atexit.register(_quiesce_pools)

"""Django's psycopg pool, but a refused connection reaches the caller at once.

Every new connection is opened by the attempt pipeline (``pipeline``): the pool's
``connection_class`` is the pipeline's, so the files, the credentials, how TLS starts, the
final parameters, the link check and the retries are the very steps plain connections take.
This module is the one adapter of psycopg_pool's privates (``tests/test_pool.py`` pins them).

psycopg_pool retries failed connections in the background and lets ``getconn()`` wait;
with a certificate problem every request then ends in a bare ``PoolTimeout`` after 30 s,
hiding the reason. Here a *refusal* (``causes.classify``: TLS verification failed, a file libpq
needs is unusable, the post-handshake policy check) is handed to the waiting clients
immediately. While refused and nothing is idle, the next request tries a new connection
itself (one at a time; the others share its outcome), so the first attempt after the fix
heals the pool. A *transient* failure (a restart, a reset, EOF) is retried within
``OPTIONS['connect_retry']`` and otherwise left to psycopg_pool, exactly as stock: requests
wait for the reconnect. Idle connections, verified when they were made, are served
whatever the state of files only new connections need.

Fork and exit (``lifecycle``): at interpreter exit no worker thread is left running Python
code (this backend's check, its log line, ``connection_verified`` receivers) while the
interpreter finalizes; in a forked child the pool is abandoned untouched (its threads and
sessions belong to the parent).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from django.db.backends.postgresql.base import DatabaseWrapper as PostgresWrapper
from psycopg import Connection
from psycopg_pool import ConnectionPool, PoolClosed

from . import lifecycle, pipeline
from .errors import InsecureConnectionError

__all__ = [
    "VerifiedConnectionPool",
]


def _park_forever() -> NoReturn:
    while True:  # blocked in a lock, without the GIL; the process ends around this thread
        threading.Event().wait()


class VerifiedConnectionPool(ConnectionPool[Connection[Any]]):
    def __init__(
        self,
        plan: pipeline.Plan,
        *args: Any,
        explain: Callable[[Exception], InsecureConnectionError | None],
        **kwargs: Any,
    ) -> None:
        self._explain = explain
        self._refusal: InsecureConnectionError | None = None
        self._probe = threading.Condition()
        self._probing = False
        self._probes = 0  # finished probes, so waiters see that one ended
        self._pid = os.getpid()
        # Exit bookkeeping: attempts in progress (network or configure), configures running.
        self._state = threading.Condition()
        self._attempts = self._configuring = 0
        self._exiting = False
        configure = kwargs.get("configure")
        if configure is not None:
            kwargs["configure"] = lambda conn: self._configure_unless_exiting(configure, conn)
        base = kwargs.pop("connection_class", Connection)
        kwargs["connection_class"] = pipeline.connection_class(plan.with_hooks(_Hooks(self)), base)
        super().__init__(*args, **kwargs)
        lifecycle.track_pool(self)

    def _connect(self, timeout: float | None = None) -> Connection[Any]:
        with self._state:
            self._attempts += 1
        try:
            return self._connect_or_explain(timeout)
        finally:
            with self._state:
                self._attempts -= 1

    def _connect_or_explain(self, timeout: float | None) -> Connection[Any]:
        try:
            conn = super()._connect(timeout)  # the connection class runs the pipeline
        except Exception as exc:
            refusal = self._explain(exc)
            if refusal is None:
                self._refusal = None  # whatever it is now, it is not a refusal: wait as stock
                raise
            self._refusal = refusal
            for client in self._take_waiting():
                client.fail(refusal.copy())
            if refusal is exc:
                raise
            raise refusal from exc
        self._refusal = None
        return conn

    def _before_attempt(self) -> None:
        if self._exiting:  # a retry that woke up while the interpreter exits: go no further
            _park_forever()
        if self.closed:  # a retry that woke up after close(): closing must not wait for it
            raise PoolClosed(f"the pool {self.name!r} is closed")

    def getconn(self, timeout: float | None = None) -> Connection[Any]:
        if self._refusal is not None and not self._has_idle():
            self._try_again(self.timeout if timeout is None else timeout)
        return super().getconn(timeout)

    def _try_again(self, timeout: float) -> None:
        """While refused with nothing idle: a new connection now, or the refusal at once.

        One caller at a time makes the attempt; callers arriving meanwhile wait for its
        outcome instead of opening their own. A success is added to the pool (so the
        first attempt after a fix serves requests); a refusal is raised to every one of
        them; anything else leaves them to wait for the pool, as stock.
        """
        with self._probe:
            if self._probing:
                seen = self._probes
                self._probe.wait_for(lambda: self._probes != seen, timeout=timeout)
                refusal = self._refusal
                if refusal is not None:
                    raise refusal.copy()  # one instance per raising thread
                return
            self._probing = True
        conn = None
        try:
            conn = self._connect(timeout)
        except InsecureConnectionError:
            raise
        except Exception:
            pass  # transient: _connect_or_explain cleared the refusal; wait as stock does
        finally:
            with self._probe:
                self._probing = False
                self._probes += 1
                self._probe.notify_all()
        if conn is not None:
            self._adopt(conn)

    # -- psycopg_pool's internals: the only place they are used (tests/test_pool pins them) --
    def _has_idle(self) -> bool:
        with self._lock:
            return bool(self._pool)

    def _take_waiting(self) -> list[Any]:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        return waiting

    def _adopt(self, conn: Connection[Any]) -> None:
        """Count a connection made outside the pool's workers as the pool's own."""
        with self._lock:
            room = self._nconns < self._max_size
            if room:
                self._nconns += 1
        if room:
            self._add_to_pool(conn)  # to a waiting client, or idle
        else:
            conn.close()

    # -- lifecycle ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _running_python(self) -> Iterator[None]:
        """Around Python work on a pool thread after libpq returns (the link check, the log
        line, the receivers, Django's configure), except at exit.

        A handshake that completes once the process is exiting parks its worker thread
        here, blocked without the GIL, until the process is gone: running that Python code
        while the interpreter finalizes is what can abort the process.
        """
        with self._state:
            exiting = self._exiting
            if not exiting:
                self._configuring += 1
        if exiting:
            _park_forever()
        try:
            yield
        finally:
            with self._state:
                self._configuring -= 1
                self._state.notify_all()

    def _configure_unless_exiting(self, configure: Callable[[Any], Any], conn: Any) -> Any:
        with self._running_python():
            return configure(conn)

    def close_at_exit(self, deadline: float) -> None:
        """Called at interpreter exit, before finalization: leave no worker running Python.

        Configures already running finish (until ``deadline``); later ones park. If no
        connection attempt is in progress, the pool closes (its threads stop, idle
        connections end cleanly); otherwise the attempt's thread is blocked in libpq or
        parked, which finalization cannot harm, and closing would wait for it.
        """
        if self.closed or self._pid != os.getpid():
            return
        with self._state:
            self._exiting = True
            self._state.wait_for(
                lambda: self._configuring == 0, timeout=max(0.0, deadline - time.monotonic())
            )
            in_progress = self._attempts
        if not in_progress:
            self.close(timeout=max(0.1, deadline - time.monotonic()))

    def abandon_after_fork(self) -> None:
        """In a forked child: never use or close this pool (its threads are the parent's).

        Its connections were already dropped without a write (``lifecycle.after_fork_in_child``);
        marked closed, it refuses clients and its finalizer does nothing, and the next query in
        the child builds a new pool.
        """
        self._closed = True
        registry = PostgresWrapper._connection_pools  # type: ignore[attr-defined]
        for alias, pool in list(registry.items()):
            if pool is self:
                del registry[alias]


class _Hooks(pipeline.Hooks):
    """The pipeline's hooks for one pool: stop at exit or once closed."""

    __slots__ = ("_pool",)

    def __init__(self, pool: VerifiedConnectionPool) -> None:
        self._pool = pool

    def before_attempt(self) -> None:
        self._pool._before_attempt()

    def verifying(self) -> contextlib.AbstractContextManager[None]:
        return self._pool._running_python()

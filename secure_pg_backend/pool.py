"""Django's psycopg pool, but a refused connection reaches the caller at once.

psycopg_pool retries failed connections in the background and lets
``getconn()`` wait; with a certificate problem every request then ends in a
bare ``PoolTimeout`` after 30 s, hiding the reason. Here a refusal (TLS
verification failed, or the post-handshake policy check) is handed to the
waiting clients immediately, and later requests get it without waiting while
no connection is available. Background retries continue, so fixing the server
heals the pool without a restart.

Lifecycle (see ``lifecycle``): at interpreter exit the pool lets in-flight connection attempts
finish, then closes, so its threads never run during finalization; in a forked child it is
abandoned untouched (its threads and sessions belong to the parent).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db.backends.postgresql.base import DatabaseWrapper as PostgresWrapper
from psycopg import Connection
from psycopg_pool import ConnectionPool

from . import lifecycle
from .errors import InsecureConnectionError


class VerifiedConnectionPool(ConnectionPool[Connection[Any]]):
    def __init__(
        self,
        *args: Any,
        explain: Callable[[Exception], InsecureConnectionError | None],
        **kwargs: Any,
    ) -> None:
        self._explain = explain
        self._refusal: InsecureConnectionError | None = None
        self._pid = os.getpid()
        self._attempts = 0  # connection attempts in progress (on the worker threads)
        self._attempts_done = threading.Condition()
        super().__init__(*args, **kwargs)
        lifecycle.track_pool(self)

    def _connect(self, timeout: float | None = None) -> Connection[Any]:
        with self._attempts_done:
            self._attempts += 1
        try:
            return self._connect_or_explain(timeout)
        finally:
            with self._attempts_done:
                self._attempts -= 1
                self._attempts_done.notify_all()

    def _connect_or_explain(self, timeout: float | None) -> Connection[Any]:
        try:
            conn = super()._connect(timeout)
        except Exception as exc:
            refusal = self._explain(exc)
            if refusal is None:
                raise
            self._refusal = refusal
            with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            for client in waiting:
                client.fail(refusal.copy())
            raise refusal from exc
        self._refusal = None
        return conn

    def getconn(self, timeout: float | None = None) -> Connection[Any]:
        refusal = self._refusal
        if refusal is not None:
            with self._lock:
                idle = bool(self._pool)
                if not idle:
                    self._maybe_grow_pool()  # keep trying, so a fixed server heals us
            if not idle:
                raise refusal.copy()  # one instance per raising thread
        return super().getconn(timeout)

    # -- lifecycle ------------------------------------------------------------------------
    def close_at_exit(self, deadline: float) -> None:
        """Close before the interpreter finalizes, once no connection attempt is running.

        An attempt runs the handshake and then this backend's check, log line and
        ``connection_verified`` receivers on a worker thread; the pool is closed only when
        none is running (waiting until ``deadline``), so ``close()`` finds idle workers and
        returns at once. An attempt stuck past the deadline (a stalled server) is left to
        the interpreter: it is blocked in libpq, which stopping the thread cannot harm.
        """
        if self.closed or self._pid != os.getpid():
            return
        with self._attempts_done:
            idle = self._attempts_done.wait_for(
                lambda: self._attempts == 0, timeout=max(0.0, deadline - time.monotonic())
            )
        if idle:
            self.close(timeout=max(0.1, deadline - time.monotonic()))

    def abandon_after_fork(self) -> None:
        """In a forked child: never use or close this pool (its threads are the parent's).

        Its connections were already dropped without a write (``lifecycle``); marked closed,
        it refuses clients and its finalizer does nothing, and the next query in the child
        builds a new pool.
        """
        self._closed = True
        registry = PostgresWrapper._connection_pools  # type: ignore[attr-defined]
        for alias, pool in list(registry.items()):
            if pool is self:
                del registry[alias]

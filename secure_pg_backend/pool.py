"""Django's psycopg pool, but a refused connection reaches the caller at once.

psycopg_pool retries failed connections in the background and lets
``getconn()`` wait; with a certificate problem every request then ends in a
bare ``PoolTimeout`` after 30 s, hiding the reason. Here a refusal (TLS
verification failed, or the post-handshake policy check) is handed to the
waiting clients immediately, and later requests get it without waiting while
no connection is available. Background retries continue, so fixing the server
heals the pool without a restart.

Lifecycle (see ``lifecycle``): at interpreter exit no worker thread is left running Python
code (this backend's check, its log line, ``connection_verified`` receivers) while the
interpreter finalizes; in a forked child the pool is abandoned untouched (its threads and
sessions belong to the parent).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from django.db.backends.postgresql.base import DatabaseWrapper as PostgresWrapper
from psycopg import Connection
from psycopg_pool import ConnectionPool

from . import lifecycle
from .errors import InsecureConnectionError


def _park_forever() -> NoReturn:
    while True:  # blocked in a lock, without the GIL; the process ends around this thread
        threading.Event().wait()


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
        # Exit bookkeeping: attempts in progress (network or configure), configures running.
        self._state = threading.Condition()
        self._attempts = self._configuring = 0
        self._exiting = False
        configure = kwargs.get("configure")
        if configure is not None:
            kwargs["configure"] = lambda conn: self._configure_unless_exiting(configure, conn)
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
    def _configure_unless_exiting(self, configure: Callable[[Any], Any], conn: Any) -> Any:
        """Run the pool's configure (the check, the log line, the receivers), except at exit.

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
            return configure(conn)
        finally:
            with self._state:
                self._configuring -= 1
                self._state.notify_all()

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

        Its connections were already dropped without a write (``lifecycle``); marked closed,
        it refuses clients and its finalizer does nothing, and the next query in the child
        builds a new pool.
        """
        self._closed = True
        registry = PostgresWrapper._connection_pools  # type: ignore[attr-defined]
        for alias, pool in list(registry.items()):
            if pool is self:
                del registry[alias]

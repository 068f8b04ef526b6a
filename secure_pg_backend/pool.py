"""Django's psycopg pool, but a refused connection reaches the caller at once.

psycopg_pool retries failed connections in the background and lets
``getconn()`` wait; with a certificate problem every request then ends in a
bare ``PoolTimeout`` after 30 s, hiding the reason. Here a refusal (TLS
verification failed, or the post-handshake policy check) is handed to the
waiting clients immediately, and later requests get it without waiting while
no connection is available. Background retries continue, so fixing the server
heals the pool without a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg import Connection
from psycopg_pool import ConnectionPool

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
        super().__init__(*args, **kwargs)

    def _connect(self, timeout: float | None = None) -> Connection[Any]:
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

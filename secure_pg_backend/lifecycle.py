"""What the backend does with its connections when the process forks and when it exits.

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
import os
import socket
import time
import weakref
from typing import Any, Generic, TypeVar

from . import signals

__all__ = [
    "EXIT_GRACE",
    "after_fork_in_child",
    "track_connection",
    "track_pool",
    "track_wrapper",
]

# Longest wait at exit for configure steps already running on pool threads.
EXIT_GRACE = 0.5

T = TypeVar("T")


class _Ref(weakref.ref):  # type: ignore[type-arg]
    """A weak reference that hashes and compares by its own identity, not its referent's: any
    object can be registered (one whose ``__eq__`` makes it unhashable too), and a dead one is
    found again by the set that holds it."""

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__


class _Registry(Generic[T]):
    """Weak references to live objects.

    No lock (a fork could leave one held in the child): a snapshot copies the set with
    ``list()``, which allocates no object while it iterates, so no collection can run a
    callback that changes the set under it. A dead object removes its own reference
    (``set.discard`` is its callback: no Python runs when a connection is freed).
    """

    def __init__(self) -> None:
        self._refs: set[_Ref] = set()
        self._discard = self._refs.discard  # every reference's callback: one bound method

    def add(self, obj: T) -> None:
        """Register ``obj`` (each object once: a connection when it is verified, a wrapper
        when it is created)."""
        self._refs.add(_Ref(obj, self._discard))

    def live(self) -> list[T]:
        return [obj for ref in list(self._refs) if (obj := ref()) is not None]

    def clear(self) -> None:
        self._refs.clear()


_connections: _Registry[Any] = _Registry()  # psycopg connections opened (and verified) here
_wrappers: _Registry[Any] = _Registry()  # DatabaseWrappers that held one of them
_pools: _Registry[Any] = _Registry()  # VerifiedConnectionPool instances
# Called in a forked child after the connections are dropped: state that describes the
# parent's links (the breakers of the attempt pipeline, ...) registers here.
_child_resets: list[Any] = []


# The registries' own methods, without a frame around them: a connection is registered once
# it is verified, a wrapper when it is created.
track_connection = _connections.add
track_wrapper = _wrappers.add


def track_pool(pool: Any) -> None:
    _pools.add(pool)


def reset_in_child(reset: Any) -> None:
    """Run ``reset()`` in a forked child (after its inherited connections are dropped)."""
    _child_resets.append(reset)


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
    for reset in _child_resets:
        reset()
    signals.after_fork_in_child()  # the child announces its own first connections


# -- exit ------------------------------------------------------------------------------
def _quiesce_pools() -> None:
    deadline = time.monotonic() + EXIT_GRACE
    for pool in _pools.live():
        pool.close_at_exit(deadline)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=after_fork_in_child)
atexit.register(_quiesce_pools)

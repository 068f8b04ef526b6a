"""psycopg's ``Connection.connect`` for parameters the pipeline has judged: the one module that
uses psycopg's connect internals.

``Connection.connect("", **kwargs)`` turns its keywords into a connection string and parses it
back into a dict, splits that into attempts (one per host and address), and for each builds a
connection string again and has libpq parse it once more before connecting: three parses and
two escapings of the same values per new connection, more client CPU than all the policy's
steps together. The pipeline has just had libpq read these very parameters (``judge``) and
remembers that verdict, so for a remembered verdict this does what psycopg's ``connect`` does
with the parse-backs left out: psycopg's own split into attempts (``conninfo_attempts``, which
also resolves a host name per connect), each attempt's connection string built by psycopg's
``make_conninfo`` once and then remembered, libpq handed exactly that string through psycopg's
connect generator and wait loop, and psycopg's arguments applied to the connection as
``connect`` applies them. Errors and debug lines are psycopg's, worded as its ``connect`` words
them.

What the judged parameters cover is what libpq is handed: the attempt strings differ from them
only by the host, address and port psycopg splits off, never by a keyword the policy forces.

Anything else goes through ``cls.connect`` unchanged: a class whose ``connect`` is not
psycopg's (a pool's ``connection_class`` of the user's), parameters whose verdict was not
remembered, and a psycopg whose internals have neither of the two shapes this knows (later 3.3
releases moved the connect timeout from 3.3.0's generator to the wait loop).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg import errors as e
from psycopg import waiting
from psycopg.adapt import AdaptersMap
from psycopg.conninfo import make_conninfo, timeout_from_conninfo

from .policy import PSYCOPG_ARGUMENTS

__all__ = ["SHAPE", "connect", "fast"]

# psycopg's own debug lines about each attempt, worded as its connect words them.
_psycopg_logger = logging.getLogger("psycopg")
_INTERVAL = 0.1  # psycopg's wait between checks for an interrupt (connection._WAIT_INTERVAL)
_CONNECT = psycopg.Connection.connect.__func__  # type: ignore[attr-defined]
_PARAMS = psycopg.Connection._get_connection_params.__func__  # type: ignore[attr-defined]
_GEN = psycopg.Connection._connect_gen.__func__  # type: ignore[attr-defined]


def _split() -> Callable[[Mapping[str, Any]], list[dict[str, Any]]] | None:
    """psycopg's split of parameters into attempts; None in a psycopg laid out otherwise."""
    try:
        from psycopg._conninfo_attempts import conninfo_attempts
    except ImportError:  # pragma: no cover - then every connect takes the public path
        return None
    return conninfo_attempts


def _shape() -> str | None:
    """Where this psycopg takes the connect timeout: "wait" (``wait_conn``), "generator"
    (``_connect_gen``, 3.3.0), or None (another layout: the public path)."""
    if SPLIT is None:  # pragma: no cover
        return None
    try:
        wait = inspect.signature(waiting.wait_conn).parameters
        gen = inspect.signature(psycopg.Connection._connect_gen).parameters
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - compiled, say
        return None
    if "timeout" in wait and hasattr(e, "_WaitTimeout"):
        return "wait"
    if "timeout" in gen:  # pragma: no cover - psycopg 3.3.0 (ci/lowest.txt)
        return "generator"
    return None  # pragma: no cover


SPLIT = _split()
SHAPE = _shape()


def fast(cls: Any) -> bool:
    """Whether ``connect`` can stand in for ``cls.connect``: psycopg's own, not overridden."""
    connect_ = getattr(cls.connect, "__func__", None)
    return (
        SHAPE is not None
        and connect_ is _CONNECT
        and getattr(cls._get_connection_params, "__func__", None) is _PARAMS
        and getattr(cls._connect_gen, "__func__", None) is _GEN
    )


def connect(cls: Any, kwargs: Mapping[str, Any], strings: dict[Any, str]) -> Any:
    """``cls.connect("", **kwargs)`` for judged ``kwargs``. ``cls``: a psycopg connection
    class, or ``super()`` of one (a pool's class, whose base connects); ``strings`` remembers
    the connection string of each attempt (the caller's, bounded here)."""
    split = SPLIT
    if split is None or not fast(cls):
        return cls.connect("", **kwargs)
    params = {k: v for k, v in kwargs.items() if v is not None and k not in PSYCOPG_ARGUMENTS}
    timeout = timeout_from_conninfo(params)
    connection = None
    failures: list[tuple[Exception, str]] = []
    debug = _psycopg_logger.isEnabledFor(logging.DEBUG)  # psycopg's lines, when asked for
    for attempt in split(params):
        if debug:
            _psycopg_logger.debug("connection attempt: %s", _described(attempt))
        try:
            connection = _open(cls, _string(attempt, strings), timeout)
        except e.Error as exc:
            failures.append((exc, _described(attempt)))
            if debug:
                _psycopg_logger.debug("connection failed: %s: %s", failures[-1][1], str(exc))
        except KeyboardInterrupt as exc:  # psycopg's: no traceback into its internals
            raise exc.with_traceback(None) from None
        else:
            if debug:
                _psycopg_logger.debug("connection succeeded: %s", _described(attempt))
            break
    if connection is None:
        raise _failure(failures)
    _apply(connection, kwargs)
    return connection


def _string(attempt: Mapping[str, Any], strings: dict[Any, str]) -> str:
    # Keyed by the text of each value, as make_conninfo writes it (True and 1 differ there),
    # and built from those very texts.
    key = tuple(zip(attempt, map(str, attempt.values()), strict=True))
    text = strings.get(key)
    if text is None:
        text = make_conninfo("", **dict(key))  # psycopg's escaping, and libpq's parse of it
        if len(strings) >= 16:  # parameters that keep changing: keep the last few
            strings.clear()
        strings[key] = text
    return text


def _open(cls: Any, conninfo: str, timeout: int) -> Any:
    if SHAPE == "generator":  # pragma: no cover - psycopg 3.3.0 (ci/lowest.txt)
        return waiting.wait_conn(cls._connect_gen(conninfo, timeout=timeout), interval=_INTERVAL)
    try:
        return waiting.wait_conn(cls._connect_gen(conninfo), interval=_INTERVAL, timeout=timeout)
    except e._WaitTimeout:
        raise e.ConnectionTimeout("connection timeout expired") from None


def _described(attempt: Mapping[str, Any]) -> str:
    return "host: {!r}, port: {!r}, hostaddr: {!r}".format(
        attempt.get("host"), attempt.get("port"), attempt.get("hostaddr")
    )


def _failure(failures: list[tuple[Exception, str]]) -> Exception:
    """The error psycopg's ``connect`` raises after every attempt failed."""
    last = failures[-1][0]
    if len(failures) == 1:
        return last.with_traceback(None)
    lines = [str(last), "Multiple connection attempts failed. All failures were:"]
    lines.extend(f"- {descr}: {error}" for error, descr in failures)
    combined: Callable[..., Exception] = type(last)
    return combined("\n".join(lines), pgconn=getattr(last, "pgconn", None)).with_traceback(None)


def _apply(connection: Any, kwargs: Mapping[str, Any]) -> None:
    """psycopg's arguments, as ``connect`` applies them to a new connection."""
    connection._autocommit = bool(kwargs.get("autocommit", False))
    if row_factory := kwargs.get("row_factory"):
        connection.row_factory = row_factory
    if cursor_factory := kwargs.get("cursor_factory"):
        connection.cursor_factory = cursor_factory
    if context := kwargs.get("context"):
        connection._adapters = AdaptersMap(context.adapters)
    connection.prepare_threshold = kwargs.get("prepare_threshold", 5)

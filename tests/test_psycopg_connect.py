"""``psycopg_connect``: psycopg's ``Connection.connect`` for judged parameters, without its
parse-backs, judged against psycopg's own ``connect`` on a real server.

What libpq is handed (its effective settings, read back from the live connection), what the
connection is set up with (psycopg's arguments) and how failures read must be psycopg's; the
connection string of each attempt is the one psycopg's ``make_conninfo`` builds for it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from psycopg.adapt import AdaptersMap
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from secure_pg_backend import libpq, psycopg_connect
from secure_pg_backend.policy import PSYCOPG_ARGUMENTS
from secure_pg_backend.testing import APP_DB, APP_USER, TLSPostgres


def _kwargs(server: TLSPostgres, **extra: Any) -> dict[str, Any]:
    return {
        "dbname": APP_DB,
        "user": APP_USER,
        "password": server.app_password,
        "host": "127.0.0.1",
        "port": server.port,  # an int, as a subclass may hand it
        "sslmode": "verify-full",
        "sslrootcert": server.root_cert,
        "gssencmode": "disable",
        "connect_timeout": 5,
        "application_name": "spaced 'quoted' name",  # escaped and quoted
        **extra,
    }


def _closed_port() -> int:
    # Below the ephemeral range: connecting to it cannot land on a socket of our own.
    for port in range(20000, 21000):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise AssertionError("no closed port below the ephemeral range")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_libpq_gets_what_psycopg_would_hand_it_and_the_connection_is_set_up_alike(
    good_server: TLSPostgres,
) -> None:
    context = SimpleNamespace(adapters=AdaptersMap(psycopg.adapters), connection=None)
    kwargs = _kwargs(
        good_server,
        autocommit=True,
        prepare_threshold=None,
        row_factory=dict_row,
        cursor_factory=psycopg.ClientCursor,
        context=context,  # an AdaptContext: anything with adapters
    )
    strings: dict[Any, str] = {}
    ours = psycopg_connect.connect(psycopg.Connection, kwargs, strings)
    theirs = psycopg.connect(**kwargs)
    try:
        assert type(ours) is psycopg.Connection
        assert libpq.effective_settings(ours.pgconn) == libpq.effective_settings(theirs.pgconn)
        assert ours.info.get_parameters() == theirs.info.get_parameters()
        for name in ("autocommit", "prepare_threshold", "row_factory", "cursor_factory"):
            assert getattr(ours, name) == getattr(theirs, name), name
        assert ours.autocommit is True and ours.prepare_threshold is None
        assert ours.adapters.types is not psycopg.adapters.types  # the context's, copied
        with ours.cursor() as cursor:
            row = cursor.execute("select current_setting('application_name') as a").fetchone()
            assert row == {"a": "spaced 'quoted' name"}
            assert type(cursor) is psycopg.ClientCursor
        # The one attempt's string: psycopg's, for the host psycopg's split gives an address.
        libpq_keywords = {k: v for k, v in kwargs.items() if k not in PSYCOPG_ARGUMENTS}
        assert list(strings.values()) == [make_conninfo("", **libpq_keywords, hostaddr="127.0.0.1")]
    finally:
        ours.close()
        theirs.close()


def test_a_second_connect_reuses_the_string_and_a_changed_value_gets_its_own(
    good_server: TLSPostgres,
) -> None:
    strings: dict[Any, str] = {}
    kwargs = _kwargs(good_server)
    for timeout in (5, 5, 6):
        psycopg_connect.connect(
            psycopg.Connection, {**kwargs, "connect_timeout": timeout}, strings
        ).close()
    assert len(strings) == 2
    assert all("connect_timeout=5" in s or "connect_timeout=6" in s for s in strings.values())


def test_every_attempt_failing_reads_as_psycopg_words_it(good_server: TLSPostgres) -> None:
    closed = [_closed_port(), _closed_port()]
    one = _kwargs(good_server, port=closed[0])
    two = _kwargs(good_server, host="127.0.0.1,127.0.0.1", port=f"{closed[0]},{closed[1]}")
    for kwargs in (one, two):
        with pytest.raises(psycopg.OperationalError) as ours:
            psycopg_connect.connect(psycopg.Connection, kwargs, {})
        with pytest.raises(psycopg.OperationalError) as theirs:
            psycopg.connect(**kwargs)
        assert type(ours.value) is type(theirs.value)
        assert str(ours.value) == str(theirs.value)
    assert "Multiple connection attempts failed" in str(ours.value)


ATTEMPT_LINES = ("connection attempt:", "connection failed:", "connection succeeded:")


def test_psycopg_s_debug_lines_about_each_attempt_are_its_own(
    good_server: TLSPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    closed = _closed_port()
    kwargs = _kwargs(good_server, host="127.0.0.1,127.0.0.1", port=f"{closed},{good_server.port}")
    lines: dict[str, list[str]] = {}
    for name, connect in (
        ("ours", lambda: psycopg_connect.connect(psycopg.Connection, kwargs, {})),
        ("theirs", lambda: psycopg.connect(**kwargs)),
    ):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="psycopg"):
            connect().close()
        lines[name] = [  # the lines of connect, not its generator's (they show addresses)
            r.getMessage() for r in caplog.records if r.getMessage().startswith(ATTEMPT_LINES)
        ]
    assert lines["ours"] == lines["theirs"]
    assert [line.split(":")[0] for line in lines["ours"]] == [
        "connection attempt",
        "connection failed",
        "connection attempt",
        "connection succeeded",
    ]


def test_a_connect_timeout_ends_the_attempt_as_psycopg_ends_it(
    good_server: TLSPostgres, silent_port: int
) -> None:
    kwargs = _kwargs(good_server, port=silent_port, connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(psycopg.errors.ConnectionTimeout) as ours:
        psycopg_connect.connect(psycopg.Connection, kwargs, {})
    took = time.monotonic() - started
    with pytest.raises(psycopg.errors.ConnectionTimeout) as theirs:
        psycopg.connect(**kwargs)
    assert str(ours.value) == str(theirs.value) == "connection timeout expired"
    assert 1.5 < took < 4.5  # the attempt's two seconds, not psycopg's 130 by default


def test_a_class_with_a_connect_of_its_own_keeps_it(good_server: TLSPostgres) -> None:
    class Counting(psycopg.Connection):  # type: ignore[type-arg]
        calls = 0

        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:  # type: ignore[override]
            cls.calls += 1
            return super().connect(conninfo, **kwargs)

    assert psycopg_connect.fast(psycopg.Connection)
    assert not psycopg_connect.fast(Counting)
    connection = psycopg_connect.connect(Counting, _kwargs(good_server), {})
    connection.close()
    assert Counting.calls == 1 and type(connection) is Counting


def test_a_string_is_remembered_by_the_text_of_each_value() -> None:
    strings: dict[Any, str] = {}
    # Equal as values, different as text: True == 1, but libpq would read "True" and "1".
    assert psycopg_connect._string({"port": 1}, strings) == "port=1"
    assert psycopg_connect._string({"port": True}, strings) == "port=True"
    for port in range(40):
        psycopg_connect._string({"port": port}, strings)
    assert len(strings) <= 16  # values that keep changing keep only the last few


def test_this_psycopg_is_laid_out_as_the_adapter_knows() -> None:
    # A psycopg that moved its connect internals still connects (through its own connect), but
    # without what the adapter saves: this names the release to teach it.
    assert psycopg_connect.SHAPE in ("wait", "generator"), (
        f"psycopg {psycopg.__version__} lays out its connect otherwise: teach psycopg_connect"
    )
    assert psycopg_connect.fast(psycopg.Connection)

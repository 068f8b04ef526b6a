"""Issue 16 and 22 on real servers: a transient fault is retried, a refusal is not, and
nothing that depends on a file is cached (the same thread and the pool recover at once).

The side-by-side load measurements (both ENGINEs, failures, lost rows, recovery time) are
in ``tests/test_faults.py``; these are the single-connection facts behind them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg_pool
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import OperationalError

from secure_pg_backend import ConnectionFileError, InsecureConnectionError, signals
from secure_pg_backend.testing import APP_PASSWORD, TestCA, TLSPostgres, free_port
from tests.conftest import assert_no_secret, connect_or_hang
from tests.support.hostile import HostileServer

Wrapper = Callable[..., Any]


@pytest.fixture
def retried() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def receiver(sender: object, **kwargs: Any) -> None:
        with lock:
            seen.append(kwargs)

    signals.connection_retried.connect(receiver, weak=False, dispatch_uid="test_retry")
    yield seen
    signals.connection_retried.disconnect(dispatch_uid="test_retry")


def _later(seconds: float, action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=lambda: (threading.Event().wait(seconds), action()))
    thread.start()
    return thread


# -- transient: retried within the budget -----------------------------------------------------
def test_a_restart_during_connect_costs_no_request(
    ca: TestCA,
    start_server: Callable[..., TLSPostgres],
    make_wrapper: Wrapper,
    retried: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca)
    ours = make_wrapper(server.database_settings(options={"connect_retry": 10}), alias="ours")
    stock = make_wrapper(
        server.database_settings(
            engine="django.db.backends.postgresql",
            options={"sslmode": "verify-full", "sslrootcert": server.root_cert},
        ),
        alias="stock",
    )
    server.kill()
    with pytest.raises(OperationalError, match="Connection refused"):
        stock.ensure_connection()  # what stock does in the outage: the request fails
    back = _later(0.8, server.start_again)
    caplog.set_level(logging.DEBUG, logger="secure_pg_backend")
    try:
        ours.ensure_connection()  # retried through the outage, then verified
    finally:
        back.join(60)
    assert ours.tls_info.transport == "tls"
    with ours.cursor() as cur:
        cur.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert cur.fetchone() == (True,)
    assert retried and {r["cause"] for r in retried} <= {"refused", "starting", "closed"}
    assert [r["attempt"] for r in retried] == list(range(1, len(retried) + 1))
    # One DEBUG record per retry, no WARNING: a blip ridden out is no news; the breakers log
    # their changes of state instead (none here: the budget was not spent).
    records = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(records) == len(retried) and {r.levelno for r in records} == {logging.DEBUG}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all("'ours'" in r.getMessage() for r in records)
    assert_no_secret(*(r.getMessage() for r in records), *(r["message"] for r in retried))


def test_retries_are_counted_in_the_metrics(
    ca: TestCA, make_wrapper: Wrapper, retried: list[dict[str, Any]]
) -> None:
    from prometheus_client import REGISTRY

    from secure_pg_backend import metrics

    assert metrics.install()  # the app's ready() did it already: idempotent
    labels = {"alias": "counted", "cause": "refused"}
    before = REGISTRY.get_sample_value("secure_pg_backend_connection_retries_total", labels) or 0
    entry = _nothing_listening(ca, connect_retry=0.3)
    with pytest.raises(OperationalError):
        make_wrapper(entry, alias="counted").ensure_connection()
    after = REGISTRY.get_sample_value("secure_pg_backend_connection_retries_total", labels)
    assert retried and after == before + len(retried)


def _entry(port: int, ca: TestCA, **options: Any) -> dict[str, Any]:
    return {
        "ENGINE": "secure_pg_backend",
        "NAME": "app",
        "USER": "app",
        "PASSWORD": APP_PASSWORD,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "OPTIONS": {"sslrootcert": str(ca.cert_path), **options},
    }


def _nothing_listening(ca: TestCA, **options: Any) -> dict[str, Any]:
    """An entry for a loopback port nobody listens on: every attempt is 'connection refused'."""
    return _entry(free_port(), ca, **options)


def test_no_retry_outlives_its_budget(
    ca: TestCA, make_wrapper: Wrapper, retried: list[dict[str, Any]]
) -> None:
    budget = 0.6
    with pytest.raises(OperationalError, match="Connection refused") as caught:
        make_wrapper(_nothing_listening(ca, connect_retry=budget)).ensure_connection()
    assert not isinstance(caught.value, InsecureConnectionError)  # what stock raises
    assert retried, "a refused connection is transient"
    assert sum(r["delay"] for r in retried) < budget  # no sleep reaches past the budget


def test_connect_retry_zero_turns_retries_off(
    ca: TestCA, make_wrapper: Wrapper, retried: list[dict[str, Any]]
) -> None:
    with pytest.raises(OperationalError, match="Connection refused"):
        make_wrapper(_nothing_listening(ca, connect_retry=0)).ensure_connection()
    assert retried == []


def test_connect_timeout_defaults_to_ten_seconds(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    assert (
        make_wrapper(good_server.database_settings()).get_connection_params()["connect_timeout"]
        == "10"
    )
    explicit = good_server.database_settings(options={"connect_timeout": 0})  # for ever: asked
    assert make_wrapper(explicit, alias="t0").get_connection_params()["connect_timeout"] == "0"


# -- definite refusals: the first attempt is the last -------------------------------------------
REFUSALS: dict[str, Callable[[dict[str, TLSPostgres]], dict[str, Any]]] = {
    "untrusted certificate": lambda s: s["mitm"].database_settings(),
    "wrong host name": lambda s: s["good"].database_settings(
        host="db.other.test", options={"hostaddr": "127.0.0.1"}
    ),
    "server without TLS": lambda s: s["plain"].database_settings(),
    "wrong password": lambda s: s["good"].database_settings(PASSWORD="not-it"),
    "missing database": lambda s: s["good"].database_settings(NAME="no_such_db"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_definite_refusals_are_never_retried(
    case: str,
    good_server: TLSPostgres,
    mitm_server: TLSPostgres,
    plain_server: TLSPostgres,
    ca: TestCA,
    make_wrapper: Wrapper,
    retried: list[dict[str, Any]],
) -> None:
    entry = REFUSALS[case]({"good": good_server, "mitm": mitm_server, "plain": plain_server})
    entry["OPTIONS"].update(connect_retry=30, sslrootcert=str(ca.cert_path))
    with pytest.raises(OperationalError) as caught:
        make_wrapper(entry).ensure_connection()
    assert retried == [], f"{case} was retried"
    assert_no_secret(str(caught.value))


def test_a_weak_protocol_is_never_retried(
    ca: TestCA, make_wrapper: Wrapper, retried: list[dict[str, Any]]
) -> None:
    leaf = ca.issue("localhost", "127.0.0.1")
    with HostileServer("tls", leaf, max_protocol="TLSv1.1") as server:
        entry = _entry(server.port, ca, connect_retry=30, connect_timeout=5)
        with pytest.raises(InsecureConnectionError, match="TLS handshake failed") as caught:
            make_wrapper(entry).ensure_connection()
    assert caught.value.cause == "protocol"
    assert retried == [] and len(server.recordings) == 1


# -- files: checked at every connection, never cached ----------------------------------------------
@pytest.fixture
def own_ca_file(ca: TestCA, tmp_path: Path) -> Path:
    path = tmp_path / "bundle.pem"
    path.write_bytes(ca.cert_pem)
    return path


def test_the_same_thread_recovers_once_the_ca_bundle_is_back(
    good_server: TLSPostgres, make_wrapper: Wrapper, own_ca_file: Path
) -> None:
    wrapper = make_wrapper(good_server.database_settings(options={"sslrootcert": str(own_ca_file)}))
    aside = own_ca_file.with_suffix(".aside")
    own_ca_file.rename(aside)  # a deploy replacing the bundle, caught at the wrong moment
    with pytest.raises(ConnectionFileError, match="does not exist") as caught:
        wrapper.ensure_connection()
    assert isinstance(caught.value, OperationalError)  # caught by stock-style handlers
    assert [v.code for v in caught.value.violations] == ["E006"]
    assert "OPTIONS['sslrootcert']" in str(caught.value)
    aside.rename(own_ca_file)
    wrapper.ensure_connection()  # the very next attempt: nothing was cached
    assert wrapper.tls_info.root_cert == str(own_ca_file)


def test_a_ca_bundle_being_replaced_is_waited_for(
    good_server: TLSPostgres,
    make_wrapper: Wrapper,
    own_ca_file: Path,
    retried: list[dict[str, Any]],
) -> None:
    wrapper = make_wrapper(good_server.database_settings(options={"sslrootcert": str(own_ca_file)}))
    wrapper.ensure_connection()  # the bundle was there: this process has used it
    wrapper.close()
    aside = own_ca_file.with_suffix(".aside")
    own_ca_file.rename(aside)  # a deploy replacing it: gone for a moment
    back = _later(0.4, lambda: aside.rename(own_ca_file))
    try:
        wrapper.ensure_connection()  # waited for within the budget, not refused
    finally:
        back.join(10)
    assert wrapper.tls_info.root_cert == str(own_ca_file)
    assert retried and {r["cause"] for r in retried} == {"file"}
    assert_no_secret(*(r["message"] for r in retried))


@pytest.mark.parametrize("keyword", ["sslcert", "sslcrl"])
def test_a_fifo_where_libpq_reads_a_file_is_refused_by_name(
    good_server: TLSPostgres, make_wrapper: Wrapper, tmp_path: Path, keyword: str
) -> None:
    fifo = tmp_path / f"{keyword}.fifo"
    os.mkfifo(fifo)
    wrapper = make_wrapper(good_server.database_settings(options={keyword: str(fifo)}))
    error = connect_or_hang(wrapper, 20)  # libpq would block on the FIFO, holding the GIL
    assert isinstance(error, ConnectionFileError)
    assert f"OPTIONS[{keyword!r}]" in str(error) and "FIFO" in str(error)
    assert [v.code for v in error.violations] == ["E016"]


def test_a_fifo_at_libpqs_default_client_certificate_is_refused(
    good_server: TLSPostgres, make_wrapper: Wrapper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".postgresql").mkdir()
    os.mkfifo(tmp_path / ".postgresql" / "postgresql.crt")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConnectionFileError, match=r"postgresql\.crt"):
        make_wrapper(good_server.database_settings()).ensure_connection()


def test_a_fifo_service_file_never_freezes_the_process(
    good_server: TLSPostgres, make_wrapper: Wrapper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "pg_service.conf"
    os.mkfifo(fifo)
    monkeypatch.setenv("PGSERVICEFILE", str(fifo))
    wrapper = make_wrapper(good_server.database_settings(options={"service": "svc"}))
    with pytest.raises(ConnectionFileError, match="PGSERVICEFILE"):
        wrapper.get_connection_params()  # before libpq resolves anything


def _pool_entry(server: TLSPostgres, bundle: Path, **pool: Any) -> dict[str, Any]:
    options = {"sslrootcert": str(bundle), "pool": {"min_size": 1, "max_size": 2, **pool}}
    return server.database_settings(options=options)


def test_the_pool_serves_its_verified_connections_while_a_file_is_missing(
    good_server: TLSPostgres, make_wrapper: Wrapper, own_ca_file: Path
) -> None:
    wrapper = make_wrapper(_pool_entry(good_server, own_ca_file), alias="pool_files")
    wrapper.ensure_connection()
    wrapper.close()  # back to the pool, idle and verified
    aside = own_ca_file.with_suffix(".aside")
    own_ca_file.rename(aside)
    try:
        for _ in range(3):  # what any thread gets: the idle connection, not a refusal
            wrapper.ensure_connection()
            with wrapper.cursor() as cur:
                cur.execute("select 1")
            wrapper.close()
    finally:
        aside.rename(own_ca_file)


def test_the_pool_heals_on_the_first_attempt_after_the_fix(
    good_server: TLSPostgres, make_wrapper: Wrapper, own_ca_file: Path
) -> None:
    aside = own_ca_file.with_suffix(".aside")
    own_ca_file.rename(aside)
    wrapper = make_wrapper(_pool_entry(good_server, own_ca_file, timeout=30), alias="pool_heal")
    for _ in range(3):  # the reason at once, every time, not a PoolTimeout after 30 s
        with pytest.raises(ConnectionFileError, match="does not exist"):
            wrapper.ensure_connection()
    aside.rename(own_ca_file)
    wrapper.ensure_connection()  # the next request, not the pool's backoff, connects
    assert wrapper.tls_info.transport == "tls"


def test_psycopg_pool_internals_the_pool_relies_on() -> None:
    """VerifiedConnectionPool uses these private names of psycopg_pool (pool.py, one section).
    A release that renames them must fail here, loudly, not in production."""
    pool = psycopg_pool.ConnectionPool("", open=False, min_size=0, max_size=1)
    for name in ("_lock", "_pool", "_waiting", "_nconns", "_max_size", "_closed"):
        assert hasattr(pool, name), name
    for name in ("_add_to_pool", "_connect", "_maybe_grow_pool"):
        assert callable(getattr(pool, name)), name
    import inspect

    assert "timeout" in inspect.signature(pool._connect).parameters


def test_django_internals_the_backend_relies_on(good_server: TLSPostgres) -> None:
    """The private names and the one contract of Django's postgresql backend used here.

    ``VerifiedTLSMixin.pool`` registers its pool in Django's class-level registry and lets
    Django's own property return it: Django's property must return what is registered for
    the alias, and still refuse CONN_MAX_AGE with a pool itself. A Django release that changes
    either fails here, not in production.
    """
    from django.db.backends.postgresql import base as postgresql

    from secure_pg_backend.base import standalone_wrapper
    from secure_pg_backend.pool import VerifiedConnectionPool

    assert isinstance(postgresql.DatabaseWrapper._connection_pools, dict)
    assert callable(postgresql.DatabaseWrapper._configure_connection)
    entry = good_server.database_settings(options={"pool": {"min_size": 0, "max_size": 1}})
    stock = standalone_wrapper("pin_stock", {**entry, "ENGINE": "django.db.backends.postgresql"})
    registered = object()
    postgresql.DatabaseWrapper._connection_pools["pin_stock"] = registered
    try:
        assert stock.pool is registered
    finally:
        del postgresql.DatabaseWrapper._connection_pools["pin_stock"]
    ours = standalone_wrapper("pin_ours", entry)
    try:
        assert isinstance(ours.pool, VerifiedConnectionPool)
        assert ours.pool is postgresql.DatabaseWrapper._connection_pools["pin_ours"]
    finally:
        postgresql.DatabaseWrapper._connection_pools.pop("pin_ours", None)
    persistent = standalone_wrapper("pin_age", {**entry, "CONN_MAX_AGE": 60})
    with pytest.raises(ImproperlyConfigured, match="Pooling doesn't support persistent"):
        _ = persistent.pool
    assert "pin_age" not in postgresql.DatabaseWrapper._connection_pools

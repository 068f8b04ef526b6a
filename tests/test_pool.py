"""Django's connection pool (``OPTIONS["pool"]``): every pooled connection is verified,
and a refusal reaches the caller at once with its reason, not as a bare PoolTimeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from psycopg_pool import PoolTimeout

from secure_pg_backend import InsecureConnectionError
from secure_pg_backend.testing import TLSPostgres

Wrapper = Callable[..., Any]


def test_pooled_connections_are_verified(
    make_wrapper: Wrapper, good_server: TLSPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="secure_pg_backend")
    wrapper = make_wrapper(
        good_server.database_settings(options={"pool": {"min_size": 2, "max_size": 2}}),
        alias="pooled",
    )
    info = wrapper.tls_info
    assert info.transport == "tls" and info.protocol == "TLSv1.3"
    with wrapper.cursor() as cur:
        cur.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert cur.fetchone()[0] is True
    wrapper.close()  # back to the pool
    wrapper.pool.wait(timeout=10)  # both physical connections are open and idle
    records = [r for r in caplog.records if "alias 'pooled' connected" in r.getMessage()]
    assert len(records) == 2
    # Two workers connect at once: one line per connection, INFO for the first to be verified
    # (either may finish logging first).
    assert sorted(r.levelname for r in records) == ["DEBUG", "INFO"]


def test_pool_passes_forced_parameters_to_every_connection(
    make_wrapper: Wrapper, good_server: TLSPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLMODE", "disable")  # the server also accepts plaintext
    wrapper = make_wrapper(good_server.database_settings(options={"pool": True}), alias="pooled2")
    kwargs = wrapper.pool.kwargs  # a callable where it may add sslnegotiation=direct (issue 20)
    kwargs = kwargs() if callable(kwargs) else kwargs
    assert kwargs["sslmode"] == "verify-full" and kwargs["gssencmode"] == "disable"
    assert wrapper.tls_info.transport == "tls"


def test_pool_reports_certificate_refusal_promptly(
    make_wrapper: Wrapper, mitm_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(
        mitm_server.database_settings(options={"pool": {"min_size": 1, "timeout": 30}}),
        alias="pooled-mitm",
    )
    started = time.monotonic()
    with pytest.raises(InsecureConnectionError) as excinfo:
        wrapper.ensure_connection()
    elapsed = time.monotonic() - started
    assert not isinstance(excinfo.value, PoolTimeout)
    assert "certificate verify failed" in str(excinfo.value)
    assert "DATABASES['pooled-mitm']" in str(excinfo.value)
    # The pool's own timeout is 30 s; the real reason must arrive long before it.
    assert elapsed < 15, elapsed
    # A second request fails the same way, without waiting for the pool.
    with pytest.raises(InsecureConnectionError, match="certificate verify failed"):
        wrapper.ensure_connection()


def test_pool_reports_policy_refusal_promptly(
    make_wrapper: Wrapper, start_server: Callable[..., TLSPostgres], ca: Any
) -> None:
    # A TLS 1.2 server with a cipher lacking forward secrecy: libpq accepts it,
    # our post-handshake check (run in the pool's configure) refuses it.
    server = start_server(
        ca.issue("localhost", "127.0.0.1", rsa=True),
        trust=ca,
        settings={"ssl_max_protocol_version": "'TLSv1.2'", "ssl_ciphers": "'AES128-SHA'"},
    )
    wrapper = make_wrapper(
        server.database_settings(options={"pool": {"min_size": 1, "timeout": 30}}),
        alias="pooled-legacy",
    )
    started = time.monotonic()
    with pytest.raises(InsecureConnectionError, match="AES128-SHA"):
        wrapper.ensure_connection()
    assert time.monotonic() - started < 15

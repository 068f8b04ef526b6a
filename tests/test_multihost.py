"""Threat: with several hosts, a bad first host (down, or an impostor) must not win.

``HOST = "h1,h2"`` with ``PORT = "p1,p2"``: libpq tries the hosts in order and, under
verify-full, treats a certificate failure on h1 like any other connection failure: it moves on
to h2 (measured with libpq 18 here). Every host gets the full verification; ``tls_info`` and the
log line say which host and port were reached. An impostor on h1 is a real recording TLS server
(``tests/support/hostile.py``), so the tests also show it received nothing but the TLS handshake.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_pg_backend import InsecureConnectionError
from secure_pg_backend.testing import APP_PASSWORD, LeafPair, TestCA, TLSPostgres, free_port
from tests.conftest import assert_no_secret
from tests.support.hostile import HostileServer


def fingerprint(leaf: LeafPair | None) -> str:
    assert leaf is not None
    cert = x509.load_pem_x509_certificates(leaf.cert_chain_pem)[0]
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def multi(server: TLSPostgres, hosts: str, ports: str, **options: Any) -> dict[str, Any]:
    entry = server.database_settings(
        options={"target_session_attrs": "any", "connect_timeout": 3, **options}
    )
    entry.update(HOST=hosts, PORT=ports)
    return entry


@pytest.fixture
def closed_port() -> int:
    return free_port()  # nothing listens there: connection refused


@pytest.fixture
def backend_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="secure_pg_backend")
    yield caplog


def test_first_host_down_second_verified(
    good_server: TLSPostgres,
    closed_port: int,
    make_wrapper: Callable[..., Any],
    backend_log: pytest.LogCaptureFixture,
) -> None:
    wrapper = make_wrapper(
        multi(good_server, "127.0.0.1,localhost", f"{closed_port},{good_server.port}")
    )
    info = wrapper.tls_info
    assert (info.host, info.port, info.transport) == ("localhost", good_server.port, "tls")
    assert info.peer_certificate is not None
    assert info.peer_certificate.sha256_fingerprint == fingerprint(good_server.leaf)
    # This alias's records only: a pool or thread a test before left behind may still log.
    [record] = [
        r
        for r in backend_log.records
        if r.name == "secure_pg_backend" and getattr(r, "db_alias", None) == wrapper.alias
    ]
    assert f"connected to localhost:{good_server.port}" in record.getMessage()


def test_first_host_untrusted_certificate_second_verified(
    good_server: TLSPostgres,
    mitm_server: TLSPostgres,
    make_wrapper: Callable[..., Any],
) -> None:
    wrapper = make_wrapper(
        multi(good_server, "localhost,127.0.0.1", f"{mitm_server.port},{good_server.port}")
    )
    info = wrapper.tls_info
    assert (info.host, info.port) == ("127.0.0.1", good_server.port)
    assert info.peer_certificate is not None
    assert info.peer_certificate.sha256_fingerprint == fingerprint(good_server.leaf)
    assert info.peer_certificate.sha256_fingerprint != fingerprint(mitm_server.leaf)
    with wrapper.cursor() as cur:
        cur.execute("select inet_server_port()")
        assert cur.fetchone() == (good_server.port,)


@pytest.mark.parametrize("behaviour", ["other-ca", "downgrade"])
def test_impostor_first_host_gets_nothing(
    good_server: TLSPostgres, ca: TestCA, make_wrapper: Callable[..., Any], behaviour: str
) -> None:
    leaf = TestCA().issue("localhost", "127.0.0.1") if behaviour == "other-ca" else None
    with HostileServer("tls" if leaf else "downgrade", leaf) as impostor:
        wrapper = make_wrapper(
            multi(good_server, "localhost,127.0.0.1", f"{impostor.port},{good_server.port}")
        )
        info = wrapper.tls_info
        wrapper.close()
        impostor.settle()
    assert (info.host, info.port) == ("127.0.0.1", good_server.port)
    assert impostor.recordings, "libpq did not try the first host"
    assert all(bytes(r.decrypted) == b"" for r in impostor.recordings)
    assert APP_PASSWORD.encode() not in impostor.all_bytes()
    assert b"app\x00" not in impostor.all_bytes()  # no startup packet (user=app, dbname=app)


def test_hostaddr_lists(
    good_server: TLSPostgres, closed_port: int, make_wrapper: Callable[..., Any]
) -> None:
    """Names for verification, addresses for routing: db.test is on the certificate."""
    entry = multi(
        good_server,
        "db.test,db.test",
        f"{closed_port},{good_server.port}",
        hostaddr="127.0.0.1,127.0.0.1",
    )
    info = make_wrapper(entry).tls_info
    assert (info.host, info.hostaddr, info.port) == ("db.test", "127.0.0.1", good_server.port)


def test_target_session_attrs_read_write_skips_a_read_only_host(
    ca: TestCA,
    good_server: TLSPostgres,
    start_server: Callable[..., TLSPostgres],
    make_wrapper: Callable[..., Any],
) -> None:
    replica = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca)
    replica.admin_sql("alter role app set default_transaction_read_only = on")  # like a standby
    entry = multi(
        good_server,
        "localhost,127.0.0.1",
        f"{replica.port},{good_server.port}",
        target_session_attrs="read-write",
    )
    info = make_wrapper(entry).tls_info
    assert (info.host, info.port) == ("127.0.0.1", good_server.port)


def test_every_host_bad_is_refused_naming_each(
    mitm_server: TLSPostgres, closed_port: int, make_wrapper: Callable[..., Any]
) -> None:
    wrapper = make_wrapper(
        multi(mitm_server, "127.0.0.1,localhost", f"{mitm_server.port},{closed_port}")
    )
    with pytest.raises(InsecureConnectionError) as caught:
        wrapper.ensure_connection()
    message = str(caught.value)
    assert "certificate verify failed" in message
    assert f"port: '{mitm_server.port}'" in message and f"port: '{closed_port}'" in message
    assert_no_secret(message)

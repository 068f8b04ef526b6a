"""Threat: a pooler in the path. Which leg is verified, and does it still work?

Real PgBouncer 1.18 (``secure_pg_backend.testing.pgbouncer``) in transaction pooling mode with
TLS on both legs: Django -> PgBouncer (``client_tls_sslmode = require``, verified by the backend
with verify-full) and PgBouncer -> PostgreSQL (``server_tls_sslmode = verify-full``, verified by
PgBouncer). The backend reads the link it owns, the client leg, from libpq; ``pg_stat_ssl`` would
describe PgBouncer's own connection to the server, which these tests also show.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from django.db import connections, transaction
from django.db.utils import OperationalError

from secure_pg_backend import InsecureConnectionError
from secure_pg_backend.testing import LeafPair, TestCA, TLSPostgres
from secure_pg_backend.testing.pgbouncer import PgBouncer
from tests.conftest import assert_no_secret
from tests.testapp.models import Note

pytestmark = pytest.mark.needs_server  # its own PostgreSQL and PgBouncer (module fixtures)


def fingerprint(leaf: LeafPair) -> str:
    cert = x509.load_pem_x509_certificates(leaf.cert_chain_pem)[0]
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@pytest.fixture(scope="module")
def backend(ca: TestCA) -> Iterator[TLSPostgres]:
    with TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca) as server:
        yield server


@pytest.fixture(scope="module")
def bouncer(backend: TLSPostgres, ca: TestCA) -> Iterator[PgBouncer]:
    with PgBouncer(backend, ca.issue("localhost", "127.0.0.1", "pgbouncer.test"), trust=ca) as pgb:
        yield pgb


@pytest.fixture(autouse=True)
def _network_allowed(django_db_blocker: Any) -> Iterator[None]:
    with django_db_blocker.unblock():
        yield


def test_django_orm_and_cursor_through_pgbouncer(
    backend: TLSPostgres, bouncer: PgBouncer, aliases: Callable[..., None]
) -> None:
    aliases(direct=backend.database_settings(), bouncer=bouncer.database_settings())
    with connections["direct"].schema_editor() as editor:  # DDL straight to the server
        editor.create_model(Note)
    try:
        with transaction.atomic(using="bouncer"):  # one server connection for the block
            Note.objects.using("bouncer").bulk_create(Note(text=f"n{i}") for i in range(50))
        assert Note.objects.using("bouncer").count() == 50
        # Transaction pooling: Django's default prepare_threshold=None keeps this working
        # although consecutive statements may run on different server connections.
        texts = [n.text for n in Note.objects.using("bouncer").order_by("id").iterator()]
        assert texts == [f"n{i}" for i in range(50)]
        with connections["bouncer"].cursor() as cur:
            for i in range(20):
                cur.execute("select %s::int + 1", [i])
                assert cur.fetchone() == (i + 1,)
    finally:
        connections["bouncer"].close()
        with connections["direct"].schema_editor() as editor:
            editor.delete_model(Note)


def test_tls_info_describes_the_django_to_pgbouncer_leg(
    backend: TLSPostgres, bouncer: PgBouncer, aliases: Callable[..., None]
) -> None:
    aliases(bouncer=bouncer.database_settings())
    conn = connections["bouncer"]
    info = conn.tls_info
    assert info.port == bouncer.port != backend.port
    assert info.protocol == "TLSv1.3" and info.transport == "tls"
    cert = info.peer_certificate
    assert cert is not None
    assert cert.sha256_fingerprint == fingerprint(bouncer.leaf)  # PgBouncer's certificate...
    assert backend.leaf is not None
    assert cert.sha256_fingerprint != fingerprint(backend.leaf)  # ...not the server's
    assert "DNS:pgbouncer.test" in cert.subject_alt_names

    # pg_stat_ssl, asked through PgBouncer, answers for PgBouncer's own connection.
    with conn.cursor() as cur:
        cur.execute(
            "select s.ssl, a.client_port from pg_stat_ssl s join pg_stat_activity a"
            " using (pid) where pid = pg_backend_pid()"
        )
        ssl_on, server_seen_port = cur.fetchone()
    fd = os.dup(conn.connection.pgconn.socket)
    with socket.socket(fileno=fd) as sock:
        our_port = sock.getsockname()[1]
    assert ssl_on is True  # server_tls_sslmode is on
    assert server_seen_port != our_port
    assert f"(from 127.0.0.1:{server_seen_port})" in bouncer.log_text()  # PgBouncer's socket
    conn.close()


def test_pgbouncer_with_an_untrusted_certificate_is_refused(
    backend: TLSPostgres, ca: TestCA, make_wrapper: Callable[..., Any]
) -> None:
    rogue = TestCA().issue("localhost", "127.0.0.1")
    with PgBouncer(backend, rogue, trust=ca) as pgb:
        wrapper = make_wrapper(pgb.database_settings(), "bouncer")
        with pytest.raises(InsecureConnectionError, match="certificate verify failed") as caught:
            wrapper.ensure_connection()
        assert_no_secret(str(caught.value))
        assert "login attempt" not in pgb.log_text()  # nothing got as far as the startup packet


def test_pgbouncer_refuses_an_untrusted_server(
    mitm_server: TLSPostgres, ca: TestCA, make_wrapper: Callable[..., Any]
) -> None:
    """The server leg is PgBouncer's job: with server_tls_sslmode = verify-full it refuses."""
    leaf = ca.issue("localhost", "127.0.0.1")
    # PgBouncer holds the client while it retries the server; a short wait makes it answer.
    with PgBouncer(mitm_server, leaf, trust=ca, settings={"query_wait_timeout": "2"}) as pgb:
        wrapper = make_wrapper(pgb.database_settings(options={"connect_timeout": 10}), "bouncer")
        began = time.monotonic()
        with pytest.raises(OperationalError) as caught:
            wrapper.ensure_connection()
            with wrapper.cursor() as cur:
                cur.execute("select 1")
        assert time.monotonic() - began < 30  # query_wait_timeout is 10 s
        assert not isinstance(caught.value, InsecureConnectionError)  # our leg was fine
        assert "query_wait_timeout" in str(caught.value)  # PgBouncer never got a server
        assert_no_secret(str(caught.value))
        log = pgb.log_text()
    assert "certificate verify failed" in log
    assert "SSL established" not in log


def test_pool_through_pgbouncer(bouncer: PgBouncer, make_wrapper: Callable[..., Any]) -> None:
    """Django's pool on top of PgBouncer: every pooled connection is verified too."""
    pool = {"min_size": 1, "max_size": 3, "timeout": 10}
    wrapper = make_wrapper(bouncer.database_settings(options={"pool": pool}), "bouncer_pool")
    for _ in range(5):
        with wrapper.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
        info = wrapper.tls_info
        assert info.port == bouncer.port
        assert info.peer_certificate is not None
        assert info.peer_certificate.sha256_fingerprint == fingerprint(bouncer.leaf)
        wrapper.close()

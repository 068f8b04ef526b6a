"""Threat: a machine-in-the-middle (or a rogue server) answering on the database's address.

A real socket server speaking real TLS (``tests/support/hostile.py``) misbehaves in each way an
attacker could, and records every byte the client sends, before and inside TLS. Each scenario
asserts that Django's connection is refused with the real reason, in bounded time, and that the
user name, database name and password never reach the hostile server. The user and database
names are distinctive strings so that a search of the recorded bytes cannot match by accident.
"""

from __future__ import annotations

import datetime as dt
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.db.utils import ConnectionHandler, OperationalError

from secure_pg_backend import InsecureConnectionError
from secure_pg_backend.testing import APP_PASSWORD, TestCA, TLSPostgres
from tests.conftest import assert_no_secret, refused_by_old_libpq
from tests.support.hostile import SSL_REQUEST, HostileServer, RecordingProxy

PROBE_USER = "probe-user-5f2c9e"
PROBE_DB = "probe-db-91ad37"
NEEDLES = (PROBE_USER.encode(), PROBE_DB.encode(), APP_PASSWORD.encode())
CONNECT_TIMEOUT = 3
# Generous: libpq gives up after connect_timeout per host; anything near it is not a hang.
NO_HANG = 20.0


@dataclass
class Tally:
    """Counts for the README's security table (printed at the end of this module)."""

    scenarios: int = 0
    refused: int = 0
    connections: int = 0
    bytes_recorded: int = 0
    secrets_leaked: int = 0


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    t = TALLY
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        reporter.write_line(
            f"\nhostile-server suite: {t.scenarios} scenarios, {t.refused} refused, "
            f"{t.connections} connections recorded, {t.bytes_recorded} bytes received, "
            f"secrets leaked: {t.secrets_leaked}"
        )


@pytest.fixture(autouse=True)
def _network_allowed(django_db_blocker: Any) -> Iterator[None]:
    with django_db_blocker.unblock():
        yield


def _wrapper(
    port: int, ca: TestCA, host: str = "127.0.0.1", alias: str = "default", **options: Any
) -> Any:
    entry = {
        "ENGINE": "secure_pg_backend",
        "NAME": PROBE_DB,
        "USER": PROBE_USER,
        "PASSWORD": APP_PASSWORD,
        "HOST": host,
        "PORT": str(port),
        "OPTIONS": {
            "sslrootcert": str(ca.cert_path),
            "connect_timeout": CONNECT_TIMEOUT,
            **options,
        },
    }
    return ConnectionHandler({"default": entry, alias: entry})[alias]


def _attack(server: HostileServer, wrapper: Any) -> tuple[OperationalError, float]:
    """Connect, expect a refusal; return it and how long it took. Records the tally."""
    error: OperationalError | None = None
    start = time.monotonic()
    try:
        wrapper.ensure_connection()
    except OperationalError as exc:
        error = exc
    finally:
        elapsed = time.monotonic() - start
        wrapper.close()
        if wrapper.pool is not None:  # stop its background retries before we count
            wrapper.close_pool()
    # After a connect_timeout, psycopg's half-open PGconn is kept alive by the frames of the
    # exception's traceback; dropping them and collecting closes the socket now instead of
    # leaving the hostile server waiting for its own deadline.
    link: BaseException | None = error
    for _ in range(10):
        if link is None:
            break
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    gc.collect()
    server.settle()
    TALLY.scenarios += 1
    if error is None:
        pytest.fail("the hostile server was accepted")
    TALLY.refused += 1
    TALLY.connections += len(server.recordings)
    TALLY.bytes_recorded += sum(len(r.raw) + len(r.decrypted) for r in server.recordings)
    assert wrapper.connection is None
    assert elapsed < NO_HANG
    assert_no_secret(str(error), repr(error))
    assert all(r.closed_by_client or r.tls_error for r in server.recordings)  # none left open
    return error, elapsed


def _leaked(server: HostileServer, needles: tuple[bytes, ...] = NEEDLES) -> list[bytes]:
    found = [n for n in needles if n in server.all_bytes()]
    TALLY.secrets_leaked += len(found)
    return found


def _expired(ca: TestCA) -> Any:
    return ca.issue(
        "localhost",
        "127.0.0.1",
        not_before=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc),
    )


# -- downgrade ---------------------------------------------------------------------
def test_downgrade_to_plaintext_is_refused(ca: TestCA) -> None:
    with HostileServer("downgrade") as server:
        error, _ = _attack(server, _wrapper(server.port, ca))
    assert isinstance(error, InsecureConnectionError)
    assert "does not offer TLS" in str(error)
    assert server.recordings, "the client never connected"
    for record in server.recordings:
        # The SSLRequest is all that crossed the wire: no startup packet in plaintext.
        assert bytes(record.raw) == SSL_REQUEST
        assert record.requests == ["ssl"]
    assert _leaked(server) == []


# -- certificates that must not be accepted ----------------------------------------
CERT_SCENARIOS: dict[str, tuple[Callable[[TestCA], Any], dict[str, Any], str]] = {
    "other-ca": (
        lambda ca: TestCA().issue("localhost", "127.0.0.1"),
        {},
        "certificate verify failed",
    ),
    "other-ca-direct-tls": (  # sslnegotiation=direct: TLS from the first byte (libpq 17+)
        lambda ca: TestCA().issue("localhost", "127.0.0.1"),
        {"sslnegotiation": "direct"},
        "certificate verify failed",
    ),
    "self-signed-by-rsa-ca": (
        lambda ca: TestCA(rsa=True).issue("localhost", "127.0.0.1"),
        {},
        "certificate verify failed",
    ),
    "trusted-ca-other-host": (
        lambda ca: ca.issue("evil.test"),
        {},
        "does not match host name",
    ),
    # libpq 18 reports expiry only as "certificate verify failed" (no OpenSSL detail).
    "trusted-ca-expired": (_expired, {}, "certificate verify failed"),
}


@pytest.mark.parametrize("scenario", list(CERT_SCENARIOS))
def test_untrusted_certificate_is_refused_before_anything_is_sent(
    ca: TestCA, scenario: str
) -> None:
    make_leaf, options, reason = CERT_SCENARIOS[scenario]
    if "sslnegotiation" in options and refused_by_old_libpq(
        _wrapper(1, ca, **options), "sslnegotiation"
    ):
        return
    with HostileServer("tls", make_leaf(ca)) as server:
        error, _ = _attack(server, _wrapper(server.port, ca, **options))
    assert isinstance(error, InsecureConnectionError)
    assert reason in str(error)
    assert server.recordings
    for record in server.recordings:
        # libpq checks the host name after the handshake (the chain is checked during it),
        # so only then may the handshake complete; either way no application byte follows.
        if scenario != "trusted-ca-other-host":
            assert not record.handshake_completed, "the client finished a handshake it must abort"
        assert bytes(record.decrypted) == b""
        expected = ["direct-tls"] if options.get("sslnegotiation") == "direct" else ["ssl"]
        assert record.requests == expected
    assert _leaked(server) == []


def test_tls_below_1_2_is_refused(ca: TestCA) -> None:
    leaf = ca.issue("localhost", "127.0.0.1")
    with HostileServer("tls", leaf, max_protocol="TLSv1.1") as server:
        error, _ = _attack(server, _wrapper(server.port, ca))
    assert isinstance(error, InsecureConnectionError)
    assert "TLS handshake failed" in str(error)
    assert all(not r.handshake_completed for r in server.recordings)
    assert _leaked(server) == []


# -- the right certificate, then misbehaviour ---------------------------------------
# A server holding the key for the name IS the server as far as TLS can tell: the startup
# packet (user and database names) goes to it inside the verified session. What must hold is
# that the password is not sent and the client fails cleanly instead of hanging.
@pytest.mark.parametrize("behaviour", ["garbage", "silent"])
def test_right_certificate_then_misbehaviour_fails_cleanly(ca: TestCA, behaviour: str) -> None:
    # A silent server is waited out: libpq's shortest connect_timeout (2 s) keeps that short.
    timeout = {"connect_timeout": 2} if behaviour == "silent" else {}
    with HostileServer(behaviour, ca.issue("localhost", "127.0.0.1")) as server:
        error, _ = _attack(server, _wrapper(server.port, ca, **timeout))
    assert not isinstance(error, InsecureConnectionError)  # not a TLS problem: no false fix
    if behaviour == "silent":
        assert "timeout" in str(error)
    else:
        assert "expected authentication request" in str(error) or "invalid" in str(error)
    assert all(r.handshake_completed for r in server.recordings)
    assert _leaked(server, (APP_PASSWORD.encode(),)) == []
    assert PROBE_USER.encode() in server.all_bytes()  # only ever inside TLS:
    assert all(PROBE_USER.encode() not in bytes(r.raw) for r in server.recordings)


def test_require_auth_stops_a_cleartext_password_phish(ca: TestCA) -> None:
    """Defence in depth, passed through to libpq: a stolen server key cannot phish the password."""
    if refused_by_old_libpq(_wrapper(1, ca, require_auth="scram-sha-256"), "require_auth"):
        return
    with HostileServer("tls", ca.issue("localhost", "127.0.0.1")) as server:
        error, _ = _attack(server, _wrapper(server.port, ca, require_auth="scram-sha-256"))
    assert "password" in str(error)
    assert _leaked(server, (APP_PASSWORD.encode(),)) == []


def test_pool_refuses_a_hostile_server_promptly(ca: TestCA) -> None:
    """Django's pool reports the certificate failure itself, not a PoolTimeout later."""
    with HostileServer("tls", TestCA().issue("localhost", "127.0.0.1")) as server:
        pool = {"min_size": 1, "max_size": 2, "timeout": 30}
        error, _ = _attack(server, _wrapper(server.port, ca, alias="hostile_pool", pool=pool))
    assert isinstance(error, InsecureConnectionError)
    assert "certificate verify failed" in str(error)
    assert _leaked(server) == []


# -- the real server: what crosses the wire before TLS ------------------------------
def test_only_the_ssl_request_precedes_tls_to_the_real_server(
    good_server: TLSPostgres, ca: TestCA
) -> None:
    proxy = RecordingProxy(good_server.port)
    try:
        entry = good_server.database_settings(options={"connect_timeout": CONNECT_TIMEOUT})
        entry["PORT"] = str(proxy.port)
        wrapper = ConnectionHandler({"default": entry})["default"]
        try:
            assert wrapper.tls_info.port == proxy.port
            with wrapper.cursor() as cur:
                cur.execute("select current_user")
                assert cur.fetchone() == ("app",)
        finally:
            wrapper.close()
        proxy.settle()
    finally:
        proxy.close()
    assert len(proxy.before_tls) == 1  # one connection, no retry without TLS
    assert proxy.before_tls[0] == SSL_REQUEST
    assert proxy.server_answers[0] == b"S"
    assert proxy.first_tls_bytes[0] == b"\x16"  # a TLS handshake record, i.e. the ClientHello
    assert APP_PASSWORD.encode() not in bytes(proxy.after_tls[0])


# -- direct negotiation: the server must select ALPN "postgresql" ----------------------
def test_direct_tls_without_alpn_is_refused_before_anything_is_sent(ca: TestCA) -> None:
    # A TLS endpoint that is not PostgreSQL (no ALPN) holding a valid certificate for the
    # name: in direct negotiation nothing else tells the client what it is talking to.
    if refused_by_old_libpq(_wrapper(1, ca, sslnegotiation="direct"), "sslnegotiation"):
        return
    leaf = ca.issue("localhost", "127.0.0.1")
    with HostileServer("tls", leaf, alpn=()) as server:
        error, _ = _attack(server, _wrapper(server.port, ca, sslnegotiation="direct"))
    # libpq 17+ refuses such a link itself, before the policy's own ALPN rule sees it; the
    # refusal names the alias, the reason and the fix like every other.
    assert isinstance(error, InsecureConnectionError)
    assert "DATABASES['default']" in str(error) and "without ALPN" in str(error)
    assert "sslnegotiation" in str(error)
    for record in server.recordings:
        assert record.requests == ["direct-tls"]
        assert bytes(record.decrypted) == b""
    assert _leaked(server) == []

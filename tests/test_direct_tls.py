"""Direct TLS by default (issue 20): ``sslnegotiation=direct`` where the server is known to do it.

With a libpq 17+ client and nothing setting ``sslnegotiation``, the first connection to an
endpoint uses libpq's SSLRequest and its facts decide: PostgreSQL 17+ that selected ALPN
``postgresql`` means direct from the next connection on; anything else (PostgreSQL 15,
PgBouncer in front of PostgreSQL 18, which passes the server's version through but selects no
ALPN) means the SSLRequest, with no failed attempt. A direct attempt refused the way a peer that
cannot do it refuses falls back once, in the same connect, and is remembered; a refusal (an
untrusted certificate) stays a refusal. An explicit setting wins.

Real servers: the machine's PostgreSQL (15 here) and PostgreSQL 18 from ``scripts/pg-binaries``
(cached by ``make test-servers``), PgBouncer from the system; ``FaultProxy`` in front counts
the connection attempts. The pure parts run without servers too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from secure_pg_backend import InsecureConnectionError, diagnose, handshake, libpq
from secure_pg_backend.policy import Decision
from secure_pg_backend.testing import TestCA, TLSPostgres
from secure_pg_backend.testing.pgbouncer import PgBouncer
from tests.support.faultkit import FaultProxy
from tests.test_server_versions import bin_dir
from tests.unit.test_policy import clean_environment, entry, judge, root_cert  # noqa: F401 (fixtures)

Wrapper = Callable[..., Any]
LIBPQ_DIRECT = "sslnegotiation" in libpq.keywords()  # libpq 17+ (the C/Python builds: 15)

# What libpq 18 said, on this machine, to a direct ClientHello (see handshake.NOT_DIRECT_MARKERS).
PG15_HANGS_UP = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
    "SSL error: unexpected eof while reading"
)
PGBOUNCER_ANSWERS_IN_PLAINTEXT = (
    'connection failed: connection to server at "127.0.0.1", port 6432 failed: SSL error: '
    "wrong version number\nThis may indicate that the server does not support any SSL "
    "protocol version between TLSv1.2 and TLSv1.3."
)
UNTRUSTED = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
    "SSL error: certificate verify failed"
)
# A middlebox that resets a direct ClientHello after TCP connected (issue 28): a fallback.
RESET = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
    "SSL SYSCALL error: Connection reset by peer"
)
TIMEOUT = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: timeout expired'
)
SERVER_ANSWER = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
    "FATAL:  the database system is starting up"
)
REFUSED = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
    "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?"
)


@pytest.fixture(autouse=True)
def _fresh_memory() -> Iterator[None]:
    handshake.forget_direct()
    yield
    handshake.forget_direct()


# -- which settings get the default (the gate, no server) --------------------------------
def _key(settings: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
    verdict = judge(settings, environ)
    assert verdict.decision is not None, verdict.violations
    return verdict.decision.direct_key


def test_the_default_applies_when_nothing_sets_it(root_cert: str) -> None:  # noqa: F811
    expected = ("db.example.com", "", "5432") if LIBPQ_DIRECT else None
    assert _key(entry(root_cert)) == expected
    # The parameters libpq gets from the gate stay libpq's default; the connect adds direct.
    params = judge(entry(root_cert)).params
    assert params is not None and "sslnegotiation" not in params


def test_the_endpoint_is_what_libpq_resolved(root_cert: str) -> None:  # noqa: F811
    if not LIBPQ_DIRECT:
        assert _key(entry(root_cert, hostaddr="10.0.0.5")) is None
        return
    assert _key(entry(root_cert, hostaddr="10.0.0.5")) == ("db.example.com", "10.0.0.5", "5432")
    settings = entry(root_cert, host="a.example.com,b.example.com")
    assert _key(settings) == ("a.example.com,b.example.com", "", "5432")


@pytest.mark.parametrize("value", ["postgres", "direct"])
def test_an_explicit_setting_wins(root_cert: str, value: str) -> None:  # noqa: F811
    if not LIBPQ_DIRECT:  # refused by name (E009): this libpq does not know the keyword
        assert judge(entry(root_cert, sslnegotiation=value)).decision is None
        return
    assert _key(entry(root_cert, sslnegotiation=value)) is None
    params = judge(entry(root_cert, sslnegotiation=value)).params
    assert params is not None and params["sslnegotiation"] == value
    assert _key(entry(root_cert), {"PGSSLNEGOTIATION": value}) is None


def test_a_service_may_set_it_so_the_default_stays(root_cert: str, tmp_path: Path) -> None:  # noqa: F811
    services = tmp_path / "pg_service.conf"
    services.write_text("[app]\nhost=db.example.com\nport=5432\n")
    settings = entry(root_cert)
    settings["OPTIONS"]["service"] = "app"
    assert _key(settings, {"PGSERVICEFILE": str(services)}) is None


def test_a_socket_entry_gets_no_default(root_cert: str) -> None:  # noqa: F811
    settings = entry(root_cert, host="/run/postgresql", allow_unix_socket=True)
    assert _key(settings) is None


# -- the fallback, as pure logic over libpq's real words ----------------------------------
KEY = ("127.0.0.1", "", "5432")


PARAMS = {"host": "127.0.0.1", "sslmode": "verify-full"}


def _decision() -> Decision:
    return Decision("default", ("127.0.0.1",), "/ca.pem", "x", direct_key=KEY)


class Attempts:
    """A connect function: fails with ``failures`` in order, then returns 'connection';
    ``calls`` records whether each was handed ``sslnegotiation=direct``."""

    def __init__(self, *failures: str) -> None:
        self.failures = list(failures)
        self.calls: list[bool] = []

    def __call__(self, params: Mapping[str, Any]) -> str:
        self.calls.append(params.get("sslnegotiation") == "direct")
        assert PARAMS.items() <= params.items()  # the rest as given
        if self.failures:
            raise psycopg.OperationalError(self.failures.pop(0))
        return "connection"


def test_unknown_endpoints_use_the_sslrequest() -> None:
    attempts = Attempts()
    assert handshake.negotiate(_decision(), PARAMS, attempts) == "connection"
    assert attempts.calls == [False]
    assert handshake.negotiate(Decision("d", (), "/ca.pem", "x"), PARAMS, attempts) == "connection"
    assert attempts.calls == [False, False]


@pytest.mark.parametrize("words", [PG15_HANGS_UP, PGBOUNCER_ANSWERS_IN_PLAINTEXT, RESET])
def test_a_peer_that_cannot_do_direct_gets_one_fallback(words: str) -> None:
    handshake._DIRECT[KEY] = True
    attempts = Attempts(words)
    assert handshake.negotiate(_decision(), PARAMS, attempts) == "connection"
    assert attempts.calls == [True, False]
    assert handshake._DIRECT[KEY] is False  # remembered: no second failed attempt
    assert handshake.negotiate(_decision(), PARAMS, attempts) == "connection"
    assert attempts.calls == [True, False, False]


@pytest.mark.parametrize("words", [UNTRUSTED, REFUSED, TIMEOUT, SERVER_ANSWER])
def test_a_refusal_or_another_fault_under_direct_is_not_a_fallback(words: str) -> None:
    handshake._DIRECT[KEY] = True
    attempts = Attempts(words)
    with pytest.raises(psycopg.OperationalError) as raised:
        handshake.negotiate(_decision(), PARAMS, attempts)
    assert str(raised.value) == words
    assert attempts.calls == [True]
    assert handshake._DIRECT[KEY] is True


def test_refused_both_ways_forgets_and_raises_the_fallback_error() -> None:
    handshake._DIRECT[KEY] = True
    attempts = Attempts(PG15_HANGS_UP, UNTRUSTED)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        handshake.negotiate(_decision(), PARAMS, attempts)
    assert attempts.calls == [True, False]
    assert KEY not in handshake._DIRECT  # unknown: the next working connection teaches again


# -- real servers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg18(ca: TestCA) -> Iterator[TLSPostgres]:
    leaf = ca.issue("localhost", "127.0.0.1")
    with TLSPostgres(leaf, trust=ca, pg_bin=bin_dir(18)) as server:
        yield server


@pytest.fixture(scope="module")
def bouncer18(pg18: TLSPostgres, ca: TestCA) -> Iterator[PgBouncer]:
    with PgBouncer(pg18, ca.issue("localhost", "127.0.0.1"), trust=ca) as bouncer:
        yield bouncer


@pytest.fixture
def proxy_to() -> Iterator[Callable[[int], FaultProxy]]:
    made: list[FaultProxy] = []

    def make(port: int) -> FaultProxy:
        made.append(FaultProxy(port, lifetime=120.0))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def _negotiations(wrapper: Any, count: int) -> list[str]:
    """``count`` new connections: how each started TLS, by tls_info and by libpq's own state."""
    used = []
    for _ in range(count):
        wrapper.ensure_connection()
        live = libpq.effective_settings(wrapper.connection.pgconn).get("sslnegotiation")
        assert wrapper.tls_info.sslnegotiation == (live or "postgres")
        with wrapper.cursor() as cursor:
            cursor.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            assert cursor.fetchone() == (True,)
        used.append(wrapper.tls_info.sslnegotiation)
        wrapper.close()
    return used


@pytest.mark.needs_server
def test_postgresql_15_stays_on_the_sslrequest_without_a_failed_attempt(
    make_wrapper: Wrapper, good_server: TLSPostgres, proxy_to: Callable[[int], FaultProxy]
) -> None:
    proxy = proxy_to(good_server.port)
    wrapper = make_wrapper(good_server.database_settings(PORT=str(proxy.port)))
    assert _negotiations(wrapper, 3) == ["postgres"] * 3
    assert proxy.accepted == 3  # one attempt per connection, the first one included
    assert wrapper.pg_version < handshake.DIRECT_SINCE


@pytest.mark.needs_server
def test_postgresql_18_goes_direct_from_the_second_connection(
    make_wrapper: Wrapper, pg18: TLSPostgres, proxy_to: Callable[[int], FaultProxy]
) -> None:
    proxy = proxy_to(pg18.port)
    wrapper = make_wrapper(pg18.database_settings(PORT=str(proxy.port)))
    expected = ["postgres", "direct", "direct"] if LIBPQ_DIRECT else ["postgres"] * 3
    assert _negotiations(wrapper, 3) == expected
    assert proxy.accepted == 3
    wrapper.ensure_connection()
    assert wrapper.tls_info.alpn == ("postgresql" if LIBPQ_DIRECT else None)  # libpq < 17: no ALPN


@pytest.mark.needs_server
def test_pgbouncer_in_front_of_postgresql_18_settles_on_the_sslrequest(
    make_wrapper: Wrapper, bouncer18: PgBouncer, proxy_to: Callable[[int], FaultProxy]
) -> None:
    proxy = proxy_to(bouncer18.port)
    wrapper = make_wrapper(bouncer18.database_settings(PORT=str(proxy.port)))
    assert _negotiations(wrapper, 3) == ["postgres"] * 3
    assert proxy.accepted == 3  # PgBouncer selects no ALPN: never tried direct
    assert wrapper.pg_version >= handshake.DIRECT_SINCE  # though it reports the server's version


@pytest.mark.needs_server
@pytest.mark.parametrize("other", ["pgbouncer", "postgresql-15"])
def test_an_endpoint_that_stops_doing_direct_falls_back_once(
    make_wrapper: Wrapper,
    pg18: TLSPostgres,
    bouncer18: PgBouncer,
    good_server: TLSPostgres,
    proxy_to: Callable[[int], FaultProxy],
    other: str,
) -> None:
    """The same host and port, now served by something that cannot do direct TLS (a
    PgBouncer put in front, a server replaced by an older one): one failed direct attempt,
    the connection made through the SSLRequest, and no failed attempt after that."""
    if not LIBPQ_DIRECT:
        return  # no direct default on this libpq (the other tests show it stays off)
    proxy = proxy_to(pg18.port)
    # The app user, database and CA are the same on the three servers (testing's defaults).
    wrapper = make_wrapper(pg18.database_settings(PORT=str(proxy.port)))
    assert _negotiations(wrapper, 2) == ["postgres", "direct"]
    proxy.target = ("127.0.0.1", bouncer18.port if other == "pgbouncer" else good_server.port)
    assert _negotiations(wrapper, 1) == ["postgres"]
    assert proxy.accepted == 4  # the direct attempt that failed, then the SSLRequest
    assert _negotiations(wrapper, 2) == ["postgres"] * 2
    assert proxy.accepted == 6


@pytest.mark.needs_server
def test_a_server_that_hangs_up_once_goes_direct_again_after_a_while(
    make_wrapper: Wrapper,
    pg18: TLSPostgres,
    proxy_to: Callable[[int], FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restart looks like a peer that cannot do direct TLS for one attempt: the endpoint
    takes the SSLRequest for ``REPROBE_AFTER`` seconds, then the next connection's facts (a
    PostgreSQL 17+ server with ALPN) bring the default back."""
    if not LIBPQ_DIRECT:
        return
    proxy = proxy_to(pg18.port)
    wrapper = make_wrapper(pg18.database_settings(PORT=str(proxy.port)))
    assert _negotiations(wrapper, 2) == ["postgres", "direct"]
    proxy.cuts_left = 1  # the next direct attempt is hung up on
    assert _negotiations(wrapper, 2) == ["postgres", "postgres"]
    assert proxy.accepted == 5  # the cut direct attempt, then the SSLRequest twice
    monkeypatch.setattr(handshake, "REPROBE_AFTER", 0.0)  # "a while" has passed
    assert _negotiations(wrapper, 2) == ["postgres", "direct"]
    assert proxy.accepted == 7


@pytest.mark.needs_server
def test_a_middlebox_that_resets_direct_tls_never_strands_the_endpoint(
    make_wrapper: Wrapper,
    pg18: TLSPostgres,
    proxy_to: Callable[[int], FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 28: a firewall that resets a direct ClientHello to an endpoint learned as
    PostgreSQL 18. The connect falls back to the SSLRequest (verified, in the same connect),
    later connects take the SSLRequest without a failed attempt, and once the path stops
    resetting the endpoint goes direct again."""
    if not LIBPQ_DIRECT:
        return
    proxy = proxy_to(pg18.port)
    wrapper = make_wrapper(
        pg18.database_settings(PORT=str(proxy.port), options={"connect_retry": 0})
    )
    assert _negotiations(wrapper, 2) == ["postgres", "direct"]
    proxy.set_mode("reset-direct")
    before = proxy.accepted
    assert _negotiations(wrapper, 3) == ["postgres"] * 3  # connect_retry 0: no retry hides it
    assert proxy.accepted - before == 4  # one reset direct attempt, then three SSLRequests
    proxy.set_mode("pass")
    monkeypatch.setattr(handshake, "REPROBE_AFTER", 0.0)
    assert _negotiations(wrapper, 2) == ["postgres", "direct"]


@pytest.mark.needs_server
def test_a_refusal_under_direct_stays_a_refusal(
    make_wrapper: Wrapper, pg18: TLSPostgres, proxy_to: Callable[[int], FaultProxy]
) -> None:
    proxy = proxy_to(pg18.port)
    _negotiations(make_wrapper(pg18.database_settings(PORT=str(proxy.port))), 1)
    impostor_ca = TestCA()
    settings = pg18.database_settings(
        PORT=str(proxy.port), options={"sslrootcert": str(impostor_ca.cert_path)}
    )
    probes = diagnose.probes_made()
    with pytest.raises(InsecureConnectionError, match="certificate verify failed"):
        make_wrapper(settings).ensure_connection()
    # Refused under direct (or the SSLRequest on libpq 15): no retry. The refusal's diagnostic
    # handshake (which completes no handshake) is the only other connection.
    assert proxy.accepted == 2 + diagnose.probes_made() - probes
    assert handshake._DIRECT.get(("127.0.0.1", "", str(proxy.port))) is (
        True if LIBPQ_DIRECT else None
    )


@pytest.mark.needs_server
@pytest.mark.parametrize("value", ["postgres", "direct"])
def test_an_explicit_setting_wins_on_postgresql_18(
    make_wrapper: Wrapper, pg18: TLSPostgres, value: str
) -> None:
    wrapper = make_wrapper(pg18.database_settings(options={"sslnegotiation": value}))
    if not LIBPQ_DIRECT:
        with pytest.raises(Exception, match="sslnegotiation"):
            wrapper.ensure_connection()
        return
    assert _negotiations(wrapper, 3) == [value] * 3


@pytest.mark.needs_server
def test_the_pool_goes_direct_and_falls_back_too(
    make_wrapper: Wrapper,
    pg18: TLSPostgres,
    good_server: TLSPostgres,
    proxy_to: Callable[[int], FaultProxy],
) -> None:
    proxy = proxy_to(pg18.port)
    wrapper = make_wrapper(
        pg18.database_settings(
            PORT=str(proxy.port), options={"pool": {"min_size": 0, "max_size": 1}}
        )
    )
    direct = LIBPQ_DIRECT  # the pool runs the same attempt pipeline
    first = _negotiations(wrapper, 1)  # a new pool: one new connection
    wrapper.close_pool()
    second = _negotiations(wrapper, 1)
    assert first + second == ["postgres", "direct" if direct else "postgres"]
    wrapper.close_pool()
    proxy.target = ("127.0.0.1", good_server.port)
    assert _negotiations(wrapper, 1) == ["postgres"]
    assert proxy.accepted == (4 if direct else 3)

"""Configuration injection: settings alone must not talk the backend out of verify-full.

Each numbered case of the adversarial review has a test here on real servers, and a
differential fuzz generates keys, values, DATABASE_URL queries, pool options and service
files: every example is refused before any I/O, or connects to a good server with libpq's
effective settings equal to the policy's and is refused by three bad endpoints (another
CA, another host name, a server that answers N to the TLS request and must receive
nothing after the 8-byte request).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote

import dj_database_url
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import ConnectionHandler, OperationalError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_pg_backend import ConnectionFileError, SecurePolicyError, libpq, provider
from secure_pg_backend.errors import CredentialProviderError
from secure_pg_backend.testing import APP_PASSWORD, TestCA, TLSPostgres
from tests.conftest import TCPRecorder, assert_no_secret, connect_or_hang
from tests.support.hostile import SSL_REQUEST, HostileServer

Wrapper = Callable[..., Any]


def _codes(error: SecurePolicyError) -> list[str]:
    return [v.code for v in error.violations]


def _refused_before_io(
    make_wrapper: Wrapper, entry: dict[str, Any], recorder: TCPRecorder
) -> SecurePolicyError:
    entry = {**entry, "HOST": "127.0.0.1", "PORT": str(recorder.port)}
    wrapper = make_wrapper(entry)
    with pytest.raises(SecurePolicyError) as caught:
        wrapper.ensure_connection()
    assert recorder.accepted == 0  # not even a TCP connection
    assert_no_secret(str(caught.value), repr(caught.value))
    return caught.value


# -- 1. key spelling ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        {" sslmode": "require", " sslrootcert": "/nonexistent"},
        {"sslmode ": "require"},
        {"SSLMODE": "require"},
        {"sslm\u043ede": "require"},  # a Cyrillic o
        {" sslkeylogfile": "/tmp/keys.log"},
        {"sslmode\t": "require"},
    ],
)
def test_odd_key_spellings_are_refused_before_io(
    make_wrapper: Wrapper,
    good_server: TLSPostgres,
    tcp_recorder: TCPRecorder,
    extra: dict[str, str],
) -> None:
    entry = good_server.database_settings()
    entry["OPTIONS"].update(extra)
    error = _refused_before_io(make_wrapper, entry, tcp_recorder)
    assert set(_codes(error)) == {"E009"}
    for key in extra:
        assert repr(key) in str(error)  # shown exactly, whitespace visible


def test_misspelled_key_gets_the_nearest_keyword(
    make_wrapper: Wrapper, good_server: TLSPostgres, tcp_recorder: TCPRecorder
) -> None:
    entry = good_server.database_settings(options={"sslrootcertt": good_server.root_cert})
    error = _refused_before_io(make_wrapper, entry, tcp_recorder)
    assert "did you mean 'sslrootcert'" in str(error)


@pytest.mark.parametrize("query", ["sslmode+=require", "%20sslmode=require", "sslmode%09=require"])
def test_database_url_key_with_encoded_space_is_refused(
    make_wrapper: Wrapper, good_server: TLSPostgres, tcp_recorder: TCPRecorder, query: str
) -> None:
    url = (
        f"postgres://app:{quote(APP_PASSWORD)}@127.0.0.1:{tcp_recorder.port}/app"
        f"?sslrootcert={good_server.root_cert}&{query}"
    )
    entry = dj_database_url.parse(url, engine="secure_pg_backend")
    error = _refused_before_io(make_wrapper, entry, tcp_recorder)
    assert _codes(error) == ["E009"]
    assert "DATABASE_URL" in str(error)  # tells how '+' became a space


# -- 2. NUL and other control characters ---------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("PORT", "5432\x00"),
        ("HOST", "127.0.0.1\x00 sslmode=disable"),
        ("NAME", "app\x00"),
        ("USER", "app\n"),
        ("PASSWORD", APP_PASSWORD + "\x00"),
    ],
)
def test_control_characters_in_fields_are_refused(
    make_wrapper: Wrapper,
    good_server: TLSPostgres,
    tcp_recorder: TCPRecorder,
    field: str,
    value: str,
) -> None:
    entry = {**good_server.database_settings(), field: value}
    wrapper = make_wrapper({**entry, "PORT": str(tcp_recorder.port)} if field != "PORT" else entry)
    with pytest.raises(SecurePolicyError) as caught:
        wrapper.ensure_connection()
    assert _codes(caught.value) == ["E011"]
    assert field in str(caught.value)
    assert_no_secret(str(caught.value))
    assert tcp_recorder.accepted == 0


def test_nul_in_options_and_pool_values_is_refused(
    make_wrapper: Wrapper, good_server: TLSPostgres, tcp_recorder: TCPRecorder
) -> None:
    for options in (
        {"sslrootcert": good_server.root_cert + "\x00"},  # was a bare ValueError
        {"application_name": "x\x00sslmode=disable"},
        {"pool": {"name": "p\x00"}},
    ):
        entry = good_server.database_settings()
        entry["OPTIONS"].update(options)
        error = _refused_before_io(make_wrapper, entry, tcp_recorder)
        assert "E011" in _codes(error)


def test_nul_in_port_never_reaches_a_server_that_answers_n(django_db_blocker: Any) -> None:
    # The reviewed attack: a NUL cut off the forced keys, libpq fell back to 'prefer' and
    # sent the startup packet and password in plaintext to a server that said N.
    with HostileServer("downgrade") as server:
        handler = ConnectionHandler(
            {
                "default": {
                    "ENGINE": "secure_pg_backend",
                    "HOST": "127.0.0.1",
                    "PORT": f"{server.port}\x00",
                    "NAME": "app",
                    "USER": "app",
                    "PASSWORD": APP_PASSWORD,
                    "OPTIONS": {"sslrootcert": "system"},
                }
            }
        )
        with django_db_blocker.unblock(), pytest.raises(SecurePolicyError):
            handler["default"].ensure_connection()
        server.settle()
        assert server.recordings == []


def test_repeated_database_url_query_key_is_refused(
    make_wrapper: Wrapper, good_server: TLSPostgres, tcp_recorder: TCPRecorder
) -> None:
    url = (
        f"postgres://app:{quote(APP_PASSWORD)}@127.0.0.1:{tcp_recorder.port}/app"
        f"?sslrootcert={good_server.root_cert}&connect_timeout=5&connect_timeout=9"
    )
    entry = dj_database_url.parse(url, engine="secure_pg_backend")
    error = _refused_before_io(make_wrapper, entry, tcp_recorder)
    assert _codes(error) == ["E011"] and "one value" in str(error)


# -- 3. conninfo -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"conninfo": "sslkeylogfile=/tmp/keys.log"},
        {"pool": {"conninfo": "sslmode=disable"}},
        {"pool": {"kwargs": {"sslmode": "disable"}}},
    ],
)
def test_conninfo_anywhere_is_refused(
    make_wrapper: Wrapper,
    good_server: TLSPostgres,
    tcp_recorder: TCPRecorder,
    options: dict[str, Any],
) -> None:
    entry = good_server.database_settings()
    entry["OPTIONS"].update(options)
    error = _refused_before_io(make_wrapper, entry, tcp_recorder)
    assert _codes(error) == ["E009"]
    assert "conninfo" in str(error) or "kwargs" in str(error)


# -- 4. service files and host lists, by libpq's rules -------------------------------------
def _service_file(tmp_path: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pg_service.conf"
    path.write_text(body)
    monkeypatch.setenv("PGSERVICEFILE", str(path))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # libpq keeps the FIRST value of a repeated key ...
        ("[svc]\nhost=localhost\nhost=/tmp\n", "verified"),
        ("[svc]\nhost=/tmp\nhost=localhost\n", "E004"),
        # ... and reads only the FIRST section of a repeated name.
        ("[svc]\nhost=localhost\n[svc]\nhost=/tmp\n", "verified"),
        ("[svc]\nhost=/tmp\n[svc]\nhost=localhost\n", "E004"),
        # A key with spaces around it is a syntax error in libpq, not a host.
        ("[svc]\nhost = /tmp\n", "E013"),
        ("[svc]\nhost=localhost\nsslkeylogfile=/tmp/spb-keys.log\n", "E007"),
    ],
)
def test_service_files_are_read_by_libpq_itself(
    make_wrapper: Wrapper,
    good_server: TLSPostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    body: str,
    expected: str,
) -> None:
    _service_file(tmp_path, body, monkeypatch)
    if expected == "E007" and "sslkeylogfile" not in libpq.keywords():
        expected = "E013"  # libpq < 18 refuses the unknown key in the service file itself
    wrapper = make_wrapper(
        {**good_server.database_settings(options={"service": "svc"}), "HOST": ""}
    )
    if expected != "verified":
        with pytest.raises(SecurePolicyError) as caught:
            wrapper.ensure_connection()
        assert expected in _codes(caught.value)
        return
    assert wrapper.tls_info.transport == "tls" and wrapper.tls_info.host == "localhost"
    with wrapper.cursor() as cursor:
        cursor.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert cursor.fetchone() == (True,)


@pytest.mark.parametrize(
    ("host", "options", "code"),
    [
        ("localhost,", {}, "E004"),  # empty element: the default socket
        ("localhost,,127.0.0.1", {}, "E004"),
        ("", {"hostaddr": "127.0.0.1"}, "E012"),  # was: raw 'host name must be specified'
        ("localhost,127.0.0.1", {"hostaddr": "127.0.0.1"}, "E012"),
        ("localhost", {"hostaddr": "127.0.0.1,127.0.0.1"}, "E012"),
    ],
)
def test_host_lists_are_refused_before_io(
    make_wrapper: Wrapper,
    good_server: TLSPostgres,
    tcp_recorder: TCPRecorder,
    host: str,
    options: dict[str, str],
    code: str,
) -> None:
    entry = {**good_server.database_settings(options=options), "PORT": str(tcp_recorder.port)}
    wrapper = make_wrapper({**entry, "HOST": host})
    with pytest.raises(SecurePolicyError) as caught:
        wrapper.ensure_connection()
    assert code in _codes(caught.value)
    assert tcp_recorder.accepted == 0


def test_hostaddr_with_the_certificate_name_connects(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(
        {**good_server.database_settings(options={"hostaddr": "127.0.0.1"}), "HOST": "db.test"}
    )
    info = wrapper.tls_info
    assert (info.host, info.hostaddr, info.transport) == ("db.test", "127.0.0.1", "tls")


# -- 6. the no-database path leaves the alias's settings alone -----------------------------
def test_no_database_path_does_not_edit_the_alias_options(
    make_wrapper: Wrapper, good_server: TLSPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _service_file(tmp_path, "[svc]\nhost=localhost\n", monkeypatch)
    wrapper = make_wrapper(good_server.database_settings(options={"service": "svc"}))
    before = dict(wrapper.settings_dict["OPTIONS"])
    with wrapper._nodb_cursor() as cursor:  # what test-database creation uses
        cursor.execute("select 1")
    assert wrapper.settings_dict["OPTIONS"] == before
    assert wrapper.tls_info.transport == "tls"  # and the alias still connects the same way


# -- 7. a FIFO as the root certificate -------------------------------------------------------
def test_fifo_root_certificate_is_refused_without_blocking(
    make_wrapper: Wrapper, good_server: TLSPostgres, tmp_path: Path
) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    wrapper = make_wrapper(good_server.database_settings(options={"sslrootcert": str(fifo)}))
    error = connect_or_hang(wrapper, 10)  # the policy must not block on the FIFO
    # A file's state is checked at connection time: an OperationalError, naming the setting.
    assert isinstance(error, ConnectionFileError) and "FIFO" in str(error)
    assert "OPTIONS['sslrootcert']" in str(error)


# -- 8. the post-handshake check and tls_info read libpq's facts ----------------------------
def test_tls_info_reports_libpqs_effective_settings(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    known = "sslnegotiation" in libpq.keywords()  # libpq 17+
    options = {"sslnegotiation": "postgres"} if known else {}
    wrapper = make_wrapper(good_server.database_settings(options=options))
    info = wrapper.tls_info
    effective = libpq.effective_settings(wrapper.connection.pgconn)
    assert effective == libpq._effective_by_name(wrapper.connection.pgconn)  # fast path = slow
    assert info.sslmode == effective["sslmode"] == "verify-full"
    assert info.root_cert == effective["sslrootcert"] == good_server.root_cert
    assert info.min_protocol == effective["ssl_min_protocol_version"] == "TLSv1.2"
    assert info.gssencmode == effective["gssencmode"] == "disable"
    if "sslkeylogfile" in libpq.keywords():
        assert effective.get("sslkeylogfile", "") == ""


def test_socket_transport_is_read_from_the_socket(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    entry = good_server.database_settings(options={"allow_unix_socket": True})
    wrapper = make_wrapper({**entry, "HOST": str(good_server.socket_dir)})
    assert wrapper.tls_info.transport == "unix-socket"


# -- differential fuzz ---------------------------------------------------------------------
FUZZ_KEYS = ["sslmode", "sslrootcert", "sslkeylogfile", "gssencmode", "host", "hostaddr"]
LOOKALIKES = {"o": "\u043e", "e": "\u0435", "a": "\u0430"}  # Cyrillic look-alikes
key_spellings = st.tuples(
    st.sampled_from(FUZZ_KEYS),
    st.sampled_from(["exact", " lead", "trail ", "upper", "tab", "lookalike"]),
).map(
    lambda drawn: {
        "exact": drawn[0],
        " lead": " " + drawn[0],
        "trail ": drawn[0] + " ",
        "upper": drawn[0].upper(),
        "tab": drawn[0] + "\t",
        "lookalike": "".join(LOOKALIKES.get(c, c) for c in drawn[0]),
    }[drawn[1]]
)
fuzz_values = st.sampled_from(
    [
        "verify-full",
        "require",
        "disable",
        "prefer",
        "localhost",
        "127.0.0.1",
        "/tmp",
        "",
        "x\x00sslmode=disable",
        "a'b",
        "a\\b",
        "a b",
        "\x1b[0m",
        "/tmp/spb-fuzz-keys.log",
        "system",
    ]
)
option_sets = st.dictionaries(key_spellings, fuzz_values, max_size=4)
url_queries = st.lists(
    st.sampled_from(
        [
            "sslmode+=require",
            "%20sslmode=require",
            "sslmode=require",
            "sslrootcert=%00",
            "host=%2Ftmp",
            "sslkeylogfile=%2Ftmp%2Fk",
            "gssencmode=prefer",
            "application_name=a%27b",
            "connect_timeout=5",
        ]
    ),
    max_size=3,
)
service_bodies = st.lists(
    st.sampled_from(
        [
            "host=localhost",
            "host=/tmp",
            "host=",
            "sslmode=disable",
            "gssencmode=prefer",
            "sslkeylogfile=/tmp/spb-fuzz-keys.log",
            "[fuzz]",
            "host = localhost",
        ]
    ),
    max_size=4,
).map(lambda lines: "[fuzz]\n" + "\n".join(lines) + "\n")
# Only pool options the gate refuses: a working pool is a process-wide registry entry
# (tests/test_pool.py covers pools on real servers).
pool_options = st.sampled_from([None, {"conninfo": "sslmode=disable"}, {"name": "p\x00"}])


@pytest.fixture(scope="module")
def endpoints(ca: TestCA) -> Iterator[dict[str, HostileServer]]:
    """The three bad endpoints, each a fake server that records every byte it receives."""
    with (
        HostileServer("tls", TestCA().issue("localhost", "127.0.0.1")) as other_ca,
        HostileServer("tls", ca.issue("elsewhere.test")) as other_name,
        HostileServer("downgrade") as says_n,
    ):
        yield {"other-ca": other_ca, "other-name": other_name, "says-n": says_n}


def _entry(server_port: int, root: str, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "ENGINE": "secure_pg_backend",
        "HOST": "localhost",
        "PORT": str(server_port),
        "NAME": "app",
        "USER": "app",
        "PASSWORD": APP_PASSWORD,
        "OPTIONS": {"sslrootcert": root, **options},
        "CONN_MAX_AGE": 0,
    }


def _attempt(entry: dict[str, Any]) -> tuple[Any, BaseException | None]:
    wrapper = ConnectionHandler({"default": entry})["default"]
    try:
        wrapper.ensure_connection()
    except (ImproperlyConfigured, OperationalError) as exc:
        return wrapper, exc
    return wrapper, None


def _check_example(
    options: dict[str, Any], good: TLSPostgres, endpoints: dict[str, HostileServer]
) -> None:
    wrapper, error = _attempt(_entry(good.port, good.root_cert, options))
    if isinstance(error, SecurePolicyError):  # refused before I/O: the bad endpoints agree
        for server in endpoints.values():
            _, again = _attempt(_entry(server.port, good.root_cert, options))
            assert isinstance(again, SecurePolicyError)
        assert_no_secret(str(error))
        return
    if error is None:  # a live link: libpq's effective settings are the policy's
        try:
            effective = libpq.effective_settings(wrapper.connection.pgconn)
            for key, value in wrapper._decision.forced.items():
                assert effective.get(key, "") == value, key
            assert wrapper.tls_info.transport == "tls"
        finally:
            wrapper.close()
    # else: refused by libpq after the policy passed (e.g. sslrootcert='system' cannot
    # verify the test CA's server): also a refusal, and the endpoints below must agree.
    for name, server in endpoints.items():
        _, refused = _attempt(_entry(server.port, good.root_cert, options))
        assert isinstance(refused, OperationalError), name


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(options=option_sets, queries=url_queries, body=service_bodies, pool=pool_options)
def test_differential_fuzz(
    options: dict[str, Any],
    queries: list[str],
    body: str,
    pool: dict[str, Any] | None,
    good_server: TLSPostgres,
    endpoints: dict[str, HostileServer],
    tmp_path_factory: pytest.TempPathFactory,
    django_db_blocker: Any,
) -> None:
    service = tmp_path_factory.mktemp("svc") / "pg_service.conf"
    service.write_text(body)
    url = "postgres://app@localhost:5432/app?" + "&".join(queries)
    from_url = dj_database_url.parse(url, engine="secure_pg_backend").get("OPTIONS", {})
    merged = {**from_url, **options}
    if pool is not None:
        merged["pool"] = pool
    use_service = "service" not in merged and len(body) % 2 == 0  # about half of them
    environ = {"PGSERVICEFILE": str(service), **({"PGSERVICE": "fuzz"} if use_service else {})}
    before = {s: len(endpoints[s].recordings) for s in endpoints}
    with django_db_blocker.unblock(), mock.patch.dict(os.environ, environ):
        _check_example(merged, good_server, endpoints)
    for server in endpoints.values():
        server.settle()
    says_n = endpoints["says-n"].recordings[before["says-n"] :]
    assert all(bytes(r.raw) == SSL_REQUEST for r in says_n)  # nothing after the request
    for server in endpoints.values():
        assert APP_PASSWORD.encode() not in server.all_bytes()


service_lines = st.lists(
    st.sampled_from(
        [
            "host=localhost",
            "host=127.0.0.1",
            "host=/tmp",
            "host=localhost,",
            "hostaddr=127.0.0.1",
            "host=db.test",
            "[svc]",
            "[other]",
            "host = localhost",
            "sslmode=disable",
            "# host=/tmp",
        ]
    ),
    min_size=1,
    max_size=5,
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=service_lines)
def test_service_file_differential(
    lines: list[str],
    good_server: TLSPostgres,
    tmp_path_factory: pytest.TempPathFactory,
    django_db_blocker: Any,
) -> None:
    """Where the policy says libpq will connect is where libpq connects."""
    service = tmp_path_factory.mktemp("svc") / "pg_service.conf"
    service.write_text("[svc]\n" + "\n".join(lines) + "\n")
    entry = {**good_server.database_settings(options={"service": "svc"}), "HOST": ""}
    wrapper = ConnectionHandler({"default": entry})["default"]
    with django_db_blocker.unblock(), mock.patch.dict(os.environ, {"PGSERVICEFILE": str(service)}):
        verdict = wrapper.policy_verdict()
        if verdict.decision is None:
            assert set(v.code for v in verdict.violations) <= {"E004", "E012", "E013"}
            return
        try:
            info = wrapper.tls_info
        except OperationalError as exc:  # db.test resolves only with a hostaddr beside it
            assert "failed to resolve host 'db.test'" in str(exc)
            return
        try:
            assert (info.transport, info.host) == ("tls", verdict.decision.hosts[0])
        finally:
            wrapper.close()


# -- provider values: screened, and never able to cut the string libpq receives -------------
_MARK = "spbTok"
provider_values = st.one_of(
    st.sampled_from(
        [
            APP_PASSWORD,
            APP_PASSWORD + "\x00",
            f"{_MARK}\x00 host=127.0.0.1 sslmode=disable",
            f"{_MARK}' sslmode='disable",
            f"{_MARK} sslmode=disable",
            f"{_MARK}\\' host=127.0.0.1",
            f"{_MARK}\nsslmode=disable",
            "",
        ]
    ),
    st.text(
        alphabet=st.sampled_from(list("ab= '\\\x00\x01\n\t\x7f\u00e9")), min_size=1, max_size=12
    ).map(lambda s: _MARK + s),
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=provider_values, pgpassword=st.booleans())
def test_provider_values_are_refused_or_reach_the_judged_server_only(
    value: str,
    pgpassword: bool,
    good_server: TLSPostgres,
    endpoints: dict[str, HostileServer],
    django_db_blocker: Any,
) -> None:
    """Issue 17, class 1: with PGPASSWORD set, a provider value with a NUL replaced the
    resolved password in place, cut off the forced TLS keywords, and libpq fell back to
    PGHOST/PGPORT with sslmode=prefer, sending the token in plaintext to a server that
    said N. Every value is now refused by name, or goes, whole and last, to the judged
    server only."""
    says_n = endpoints["says-n"]
    environ = {"PGHOST": "127.0.0.1", "PGPORT": str(says_n.port), "PGSSLMODE": "prefer"}
    if pgpassword:
        environ["PGPASSWORD"] = "env-Pw-" + _MARK
    entry = _entry(good_server.port, good_server.root_cert, {})
    del entry["PASSWORD"]
    entry["OPTIONS"]["password_provider"] = lambda alias, settings_dict: value
    before = len(says_n.recordings)
    with django_db_blocker.unblock(), mock.patch.dict(os.environ, environ):
        wrapper, error = _attempt(entry)
    says_n.settle()
    assert says_n.recordings[before:] == []  # the fallback host never hears of us
    if error is None:  # authenticated: the judged server, verified
        try:
            assert value == APP_PASSWORD
            assert (wrapper.tls_info.port, wrapper.tls_info.transport) == (good_server.port, "tls")
        finally:
            wrapper.close()
        return
    message = str(error)
    if isinstance(error, CredentialProviderError):  # screened: named, never echoed
        assert "OPTIONS['password_provider']" in message and "DATABASES['default']" in message
        assert not value or value not in message
        return
    # Accepted and sent whole to the judged server, which refused the wrong password.
    assert "password authentication failed" in message, message
    assert _MARK not in message


def test_every_attempt_asks_for_a_screened_value() -> None:
    # The attempt pipeline's credentials step, the same for pooled and plain connections.
    entry = {"HOST": "db.test", "OPTIONS": {"password_provider": lambda a, s: "tok\x00x"}}
    with pytest.raises(CredentialProviderError, match=r"DATABASES\['pooled'\]") as caught:
        provider.with_credentials("pooled", entry, {"host": "db.test", "password": "env"})
    assert "tok" not in str(caught.value).replace("token", "")


def test_no_database_path_keeps_the_service_and_verifies(
    good_server: TLSPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_wrapper: Wrapper
) -> None:
    """Issue 17, class 7: test-database creation (Django's _nodb_cursor, NAME None) with a
    service-only configuration. Stock drops the service and falls to the Unix socket; here
    the service's host and port are kept, the database is 'postgres', TLS is verified."""
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[only]\nhost=127.0.0.1\nport={good_server.port}\ndbname=app\nuser=app\n"
        f"sslrootcert={good_server.root_cert}\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service))
    entry = {
        "ENGINE": "secure_pg_backend",
        "NAME": "",
        "PASSWORD": APP_PASSWORD,
        "OPTIONS": {"service": "only"},
    }
    wrapper = make_wrapper(entry, "service_only")
    with wrapper._nodb_cursor() as cursor:
        cursor.execute(
            "select current_database(), ssl from pg_stat_ssl where pid = pg_backend_pid()"
        )
        assert cursor.fetchone() == ("postgres", True)
        info = cursor.db.tls_info
    assert (info.host, info.port, info.sslmode) == ("127.0.0.1", good_server.port, "verify-full")
    assert wrapper.settings_dict["OPTIONS"] == {"service": "only"}  # the alias is untouched
    with wrapper.cursor() as cursor:  # and the alias itself still uses the service's database
        cursor.execute("select current_database()")
        assert cursor.fetchone() == ("app",)

"""The ENGINE against real TLS servers: verified TLS, or a refusal that says why."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.utils import OperationalError

from secure_pg_backend import ConnectionFileError, InsecureConnectionError, TLSInfo, libpq, pipeline
from secure_pg_backend.testing import APP_PASSWORD, TLSPostgres
from tests.conftest import TCPRecorder, assert_no_secret

Wrapper = Callable[..., Any]


def server_ssl_row(wrapper: Any) -> tuple[Any, ...]:
    with wrapper.cursor() as cur:
        cur.execute(
            "select ssl, version, cipher, bits from pg_stat_ssl where pid = pg_backend_pid()"
        )
        row = cur.fetchone()
    assert row is not None
    return tuple(row)


# -- the happy path, cross-checked with the server -------------------------------------------------
def test_default_alias_is_verified_tls_matching_pg_stat_ssl(db: None) -> None:
    info = connection.tls_info
    ssl, version, cipher, bits = server_ssl_row(connection)
    assert ssl is True
    assert info.transport == "tls"
    assert (info.protocol, info.cipher, info.key_bits) == (version, cipher, bits)
    assert info.sslmode == "verify-full"
    assert info.library == "OpenSSL"
    assert info.compression is False


def test_test_database_was_created_through_the_backend(db: None) -> None:
    # pytest-django created this database via Django's creation code on our ENGINE.
    assert connection.settings_dict["NAME"].startswith("test_")
    assert connection.tls_info.database == connection.settings_dict["NAME"]


def test_tls_info_opens_the_connection(make_wrapper: Wrapper, good_server: TLSPostgres) -> None:
    wrapper = make_wrapper(good_server.database_settings())
    assert wrapper.connection is None
    info = wrapper.tls_info
    assert wrapper.connection is not None
    assert info.port == good_server.port
    assert info.host == "127.0.0.1"
    assert info.root_cert == good_server.root_cert
    assert info.root_cert_source == "OPTIONS['sslrootcert']"


def test_tls_info_is_immutable_json_and_secret_free(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    info: TLSInfo = make_wrapper(good_server.database_settings()).tls_info
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.protocol = "TLSv1"  # type: ignore[misc]
    data = json.loads(json.dumps(info.as_dict()))
    assert data["protocol"] == info.protocol
    assert data["peer_certificate"]["sha256_fingerprint"]
    assert "TLSInfo(" in repr(info) and "protocol='TLSv1.3'" in repr(info)
    assert_no_secret(repr(info), json.dumps(data), str(info))


def test_tls_info_is_cached_per_physical_connection(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(good_server.database_settings())
    first = wrapper.tls_info
    assert wrapper.tls_info is first
    wrapper.close()
    assert wrapper.tls_info is not first  # a new connection, inspected anew


def test_hostaddr_with_certificate_name_connects(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(
        good_server.database_settings(host="db.test", options={"hostaddr": "127.0.0.1"})
    )
    info = wrapper.tls_info
    assert (info.host, info.hostaddr) == ("db.test", "127.0.0.1")


def test_tls13_minimum(make_wrapper: Wrapper, good_server: TLSPostgres) -> None:
    wrapper = make_wrapper(
        good_server.database_settings(options={"ssl_min_protocol_version": "TLSv1.3"})
    )
    assert wrapper.tls_info.protocol == "TLSv1.3"
    assert wrapper.tls_info.min_protocol == "TLSv1.3"


def test_tls13_minimum_refuses_a_tls12_only_server(
    make_wrapper: Wrapper, start_server: Callable[..., TLSPostgres], ca: Any
) -> None:
    server = start_server(
        ca.issue("localhost", "127.0.0.1"),
        trust=ca,
        settings={"ssl_max_protocol_version": "'TLSv1.2'"},
    )
    assert make_wrapper(server.database_settings()).tls_info.protocol == "TLSv1.2"
    strict = make_wrapper(server.database_settings(options={"ssl_min_protocol_version": "TLSv1.3"}))
    with pytest.raises(InsecureConnectionError, match="TLS handshake failed"):
        strict.ensure_connection()


# -- refusals before any network I/O ---------------------------------------------------------------
@pytest.mark.parametrize(
    "sslmode", ["disable", "allow", "prefer", "require", "verify-ca", "Verify-Full"]
)
def test_weak_sslmode_is_refused_before_any_tcp_connection(
    make_wrapper: Wrapper, tcp_recorder: TCPRecorder, good_server: TLSPostgres, sslmode: str
) -> None:
    settings = good_server.database_settings(options={"sslmode": sslmode})
    settings["PORT"] = str(tcp_recorder.port)
    wrapper = make_wrapper(settings, alias="weak")
    with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['weak'\].*sslmode"):
        wrapper.ensure_connection()
    assert tcp_recorder.accepted == 0


def test_the_recorder_would_have_seen_a_connection(
    make_wrapper: Wrapper, tcp_recorder: TCPRecorder, good_server: TLSPostgres
) -> None:
    # Control for the test above: with valid settings a TCP connection does happen.
    settings = good_server.database_settings(options={"connect_timeout": 2})
    settings["PORT"] = str(tcp_recorder.port)
    with pytest.raises(OperationalError):
        make_wrapper(settings).ensure_connection()
    assert tcp_recorder.accepted >= 1


def test_gssencmode_prefer_is_refused(make_wrapper: Wrapper, good_server: TLSPostgres) -> None:
    wrapper = make_wrapper(good_server.database_settings(options={"gssencmode": "prefer"}))
    with pytest.raises(ImproperlyConfigured, match="GSSAPI"):
        wrapper.ensure_connection()


def test_missing_root_certificate_is_refused(
    make_wrapper: Wrapper, good_server: TLSPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    settings = good_server.database_settings()
    del settings["OPTIONS"]["sslrootcert"]
    # Found at connection time (a file, not the settings): an OperationalError, like stock's.
    with pytest.raises(ConnectionFileError, match="sslrootcert") as caught:
        make_wrapper(settings).ensure_connection()
    assert isinstance(caught.value, OperationalError)
    assert [v.code for v in caught.value.violations] == ["E005"]


# -- the environment and service files cannot weaken anything --------------------------------------
def test_environment_cannot_weaken_tls(
    make_wrapper: Wrapper, good_server: TLSPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    # good_server also accepts plaintext, so a weakened libpq would show ssl = false here.
    monkeypatch.setenv("PGSSLMODE", "disable")
    monkeypatch.setenv("PGGSSENCMODE", "prefer")
    monkeypatch.setenv("PGSSLMINPROTOCOLVERSION", "TLSv1")
    monkeypatch.setenv("PGREQUIRESSL", "0")
    wrapper = make_wrapper(good_server.database_settings())
    params = wrapper.get_connection_params()
    assert params["sslmode"] == "verify-full"
    assert params["gssencmode"] == "disable"
    assert params["ssl_min_protocol_version"] == "TLSv1.2"
    assert server_ssl_row(wrapper)[0] is True
    # libpq < 16 (C/Python builds on a distribution libpq) cannot say: None, and the
    # effective gssencmode libpq used is what the check relies on instead.
    assert libpq.used_gssapi(wrapper.connection.pgconn) in (False, None)
    assert wrapper.tls_info.gssencmode == "disable"


def test_stock_backend_would_have_been_weakened(
    make_wrapper: Wrapper, good_server: TLSPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Control: the same environment downgrades Django's stock backend to plaintext.
    monkeypatch.setenv("PGSSLMODE", "disable")
    stock = make_wrapper(
        good_server.database_settings(engine="django.db.backends.postgresql"), alias="stock"
    )
    assert server_ssl_row(stock)[0] is False


def test_service_file_cannot_weaken_tls(
    make_wrapper: Wrapper,
    good_server: TLSPostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(
        f"[weak]\nhost=127.0.0.1\nport={good_server.port}\ndbname=app\n"
        "sslmode=disable\ngssencmode=prefer\nssl_min_protocol_version=TLSv1\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    settings = good_server.database_settings(options={"service": "weak"})
    settings.update(HOST="", PORT="", NAME="")
    wrapper = make_wrapper(settings)
    assert server_ssl_row(wrapper)[0] is True
    assert wrapper.tls_info.host == "127.0.0.1"


# -- Unix-domain sockets ---------------------------------------------------------------------------
def test_socket_host_is_refused(make_wrapper: Wrapper, good_server: TLSPostgres) -> None:
    wrapper = make_wrapper(good_server.database_settings(host=str(good_server.socket_dir)))
    with pytest.raises(ImproperlyConfigured, match="allow_unix_socket"):
        wrapper.ensure_connection()


def test_socket_opt_in_connects_and_says_so(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(
        good_server.database_settings(
            host=str(good_server.socket_dir), options={"allow_unix_socket": True}
        )
    )
    info = wrapper.tls_info
    assert info.transport == "unix-socket"
    assert info.tls is False and info.protocol is None
    assert "no TLS" in info.summary()
    with wrapper.cursor() as cur:
        cur.execute("select count(*) from pg_stat_ssl where pid = pg_backend_pid() and ssl")
        assert cur.fetchone()[0] == 0


def test_post_handshake_check_refuses_a_socket_link(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    # If a socket slips past the up-front rules (PGHOST, a service file libpq reads
    # differently), the live check still refuses it: feed it a real socket connection.
    wrapper = make_wrapper(good_server.database_settings(), alias="slipped")
    wrapper.get_connection_params()  # the decision for a TCP-only configuration
    raw = psycopg.connect(
        host=str(good_server.socket_dir),
        port=good_server.port,
        dbname="app",
        user="app",
        password=APP_PASSWORD,
        sslmode="verify-full",  # ignored by libpq on sockets
        gssencmode="disable",
    )
    with pytest.raises(InsecureConnectionError, match=r"DATABASES\['slipped'\].*Unix-domain"):
        pipeline.verify(wrapper._plan(), raw)
    assert raw.closed


# -- libpq refusals become errors that name the alias, the host and the fix ------------------------
def test_untrusted_certificate_is_refused(make_wrapper: Wrapper, mitm_server: TLSPostgres) -> None:
    with pytest.raises(InsecureConnectionError) as excinfo:
        make_wrapper(mitm_server.database_settings(), alias="mitm").ensure_connection()
    message = str(excinfo.value)
    assert "DATABASES['mitm']" in message and "127.0.0.1" in message
    assert "certificate verify failed" in message and "sslrootcert" in message
    assert isinstance(excinfo.value, OperationalError)


def test_host_name_mismatch_is_refused(make_wrapper: Wrapper, good_server: TLSPostgres) -> None:
    wrapper = make_wrapper(
        good_server.database_settings(host="evil.test", options={"hostaddr": "127.0.0.1"})
    )
    with pytest.raises(InsecureConnectionError, match="does not match host name"):
        wrapper.ensure_connection()


def test_server_without_tls_is_refused(make_wrapper: Wrapper, plain_server: TLSPostgres) -> None:
    with pytest.raises(InsecureConnectionError, match="does not offer TLS"):
        make_wrapper(plain_server.database_settings()).ensure_connection()


def test_expired_certificate_is_refused(make_wrapper: Wrapper, expired_server: TLSPostgres) -> None:
    with pytest.raises(InsecureConnectionError, match="certificate verify failed"):
        make_wrapper(expired_server.database_settings()).ensure_connection()


def test_no_secret_in_any_refusal(
    make_wrapper: Wrapper,
    mitm_server: TLSPostgres,
    plain_server: TLSPostgres,
    good_server: TLSPostgres,
) -> None:
    import traceback

    attempts = [
        mitm_server.database_settings(),
        plain_server.database_settings(),
        good_server.database_settings(options={"sslmode": "require"}),
        good_server.database_settings(host="/tmp"),
        {**good_server.database_settings(), "PASSWORD": "wrong-" + APP_PASSWORD[:4]},
    ]
    seen = 0
    for settings in attempts:
        try:
            make_wrapper(settings).ensure_connection()
        except Exception as exc:
            seen += 1
            assert_no_secret(str(exc), repr(exc), "".join(traceback.format_exception(exc)))
    assert seen == len(attempts)


# -- persistent connections and health checks ------------------------------------------------------
def test_persistent_connection_is_reused_and_replacements_are_verified(
    make_wrapper: Wrapper, good_server: TLSPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="secure_pg_backend")
    wrapper = make_wrapper(
        good_server.database_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True), alias="persist"
    )
    first_pid = wrapper.tls_info and wrapper.connection.info.backend_pid
    wrapper.close_if_unusable_or_obsolete()
    assert wrapper.connection.info.backend_pid == first_pid  # reused
    good_server.admin_sql(f"select pg_terminate_backend({first_pid})")
    wrapper.close_at = None
    wrapper.health_check_done = False
    wrapper.close_if_unusable_or_obsolete()  # the health check notices the dead link
    ssl, *_ = server_ssl_row(wrapper)
    assert ssl is True
    assert wrapper.connection.info.backend_pid != first_pid
    connects = [r for r in caplog.records if "alias 'persist' connected" in r.getMessage()]
    assert [r.levelname for r in connects] == ["INFO", "DEBUG"]


def test_only_one_libpq_is_loaded(make_wrapper: Wrapper, good_server: TLSPostgres) -> None:
    make_wrapper(good_server.database_settings()).tls_info  # noqa: B018 - loads ctypes
    if not os.path.exists("/proc/self/maps"):
        pytest.fail("this suite expects Linux")
    with open("/proc/self/maps") as maps:
        libpqs = {line.split()[-1] for line in maps if "/libpq" in line}
    assert len(libpqs) == 1, libpqs
    # binary: the wheel's bundled copy; c and python builds: the system's libpq5.
    bundled = "psycopg_binary" in next(iter(libpqs))
    assert bundled == (psycopg.pq.__impl__ == "binary")


def test_changed_settings_are_evaluated_again(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    # The decision is reused between connections only while its inputs are unchanged.
    wrapper = make_wrapper(good_server.database_settings(), alias="mutable")
    wrapper.ensure_connection()
    wrapper.close()
    wrapper.settings_dict["OPTIONS"]["sslmode"] = "require"
    with pytest.raises(ImproperlyConfigured, match="'require'"):
        wrapper.ensure_connection()


def test_changed_environment_is_evaluated_again(
    make_wrapper: Wrapper,
    good_server: TLSPostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PGSSLROOTCERT", good_server.root_cert)
    settings = good_server.database_settings()
    del settings["OPTIONS"]["sslrootcert"]
    wrapper = make_wrapper(settings, alias="envroot")
    assert wrapper.tls_info.root_cert_source == "PGSSLROOTCERT"
    wrapper.close()
    monkeypatch.delenv("PGSSLROOTCERT")
    with pytest.raises(ConnectionFileError, match="sslrootcert"):
        wrapper.ensure_connection()


@pytest.mark.needs_server
def test_a_new_connection_sends_the_statements_stock_sends(ca: Any, make_wrapper: Any) -> None:
    """The server's own log: a new connection through this ENGINE runs the same statements as
    through the stock ENGINE (Django's session setup, nothing of ours), so no extra round trip
    (bench/wire.py measures the bytes too)."""
    from bench.wire import COUNTING_SETTINGS, statements_by_pid

    server = TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca, settings=COUNTING_SETTINGS)
    with server:
        seen = {}
        for engine in ("secure_pg_backend", "django.db.backends.postgresql"):
            settings = server.database_settings(
                engine=engine,
                TIME_ZONE="Europe/Paris",
                # assume_role: Django composes SET ROLE through the wrapper's own cursor, so
                # it must run after the connection is the wrapper's (it once recursed).
                options={"sslmode": "verify-full", "assume_role": "app"},
            )
            wrapper = make_wrapper(settings, alias=engine.replace(".", "_"))
            wrapper.ensure_connection()
            seen[engine] = wrapper.connection.info.backend_pid
            wrapper.close()
        time.sleep(0.2)  # the server writes its log asynchronously
        by_pid = statements_by_pid(server.log_text())
    secure, stock = (by_pid.get(seen[e], []) for e in seen)
    assert len(stock) == 2, stock  # SET TIME ZONE, SET ROLE
    assert secure == stock


@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.parametrize("time_zone", ["UTC", "Europe/Paris"])
def test_a_new_connection_is_left_as_stock_leaves_it(
    make_wrapper: Wrapper, good_server: TLSPostgres, autocommit: bool, time_zone: str
) -> None:
    """Django's connect() asks set_autocommit and its time zone test right after the
    connection opens; this ENGINE answers both from the session setup it ran inside the
    attempt. Whatever it skips, the session must be the one stock leaves: the same mode in
    Django and in psycopg, the same transaction behaviour, the same time zone, and a later
    switch made by psycopg (a manual BEGIN then set_autocommit raises, as on stock)."""
    from django.db import DatabaseError

    def session(engine: str) -> tuple[Any, ...]:
        settings = good_server.database_settings(
            engine=engine, AUTOCOMMIT=autocommit, TIME_ZONE=time_zone
        )
        wrapper = make_wrapper(settings, alias=engine.replace(".", "_"))
        wrapper.ensure_connection()
        raw = wrapper.connection
        state: list[Any] = [wrapper.get_autocommit(), raw.autocommit]
        with wrapper.cursor() as cursor:
            cursor.execute("select current_setting('TimeZone')")
            state.append(cursor.fetchone())
        state.append(raw.info.transaction_status.name)  # INTRANS unless in autocommit
        if not autocommit:
            wrapper.rollback()
        for mode in (not autocommit, autocommit):  # as transaction.atomic switches
            wrapper.set_autocommit(mode)
            state.append(raw.autocommit)
        if autocommit:
            with wrapper.cursor() as cursor:
                cursor.execute("begin")
            try:
                wrapper.set_autocommit(True)
            except DatabaseError as exc:
                state.append(str(exc))
            else:
                state.append("set_autocommit(True) inside BEGIN passed")
        wrapper.close()
        return tuple(state)

    secure = session("secure_pg_backend")
    stock = session("django.db.backends.postgresql")
    assert secure == stock
    assert secure[:2] == (autocommit, autocommit)
    if autocommit:
        assert "can't change 'autocommit' now" in secure[-1]


def test_the_parameters_follow_use_tz_and_the_time_zone(
    make_wrapper: Callable[..., Any], tmp_path: Path
) -> None:
    """Django's adapters (``context``) depend on USE_TZ (a test's ``override_settings``
    changes it) and the database's TIME_ZONE: the cached verdict must not hand out old ones."""
    from django.db.backends.postgresql.psycopg_any import get_adapters_template
    from django.test.utils import override_settings

    root = tmp_path / "ca.pem"
    root.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = {
        "ENGINE": "secure_pg_backend",
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "pw",
        "HOST": "db.example.com",
        "PORT": "5432",
        "OPTIONS": {"sslrootcert": str(root)},
    }
    wrapper = make_wrapper(settings)
    before = wrapper.get_connection_params()["context"]
    assert before is get_adapters_template(True, wrapper.timezone)

    def forget_time_zone() -> None:  # as Django's setting_changed receiver does for its own
        wrapper.__dict__.pop("timezone", None)
        wrapper.__dict__.pop("timezone_name", None)

    with override_settings(USE_TZ=False):
        forget_time_zone()
        params = wrapper.get_connection_params()
        assert params["context"] is get_adapters_template(False, wrapper.timezone)
        assert params["context"] is not before
    wrapper.settings_dict["TIME_ZONE"] = "Asia/Tokyo"  # the database's own time zone
    forget_time_zone()
    params = wrapper.get_connection_params()
    assert params["context"] is get_adapters_template(True, wrapper.timezone)
    assert params["context"] is not before
    wrapper.settings_dict["TIME_ZONE"] = None
    forget_time_zone()
    assert wrapper.get_connection_params()["context"] is before
    # USE_TZ alone, the wrapper's time zone left as it was (Django clears it only for the
    # connections it manages): the adapters follow the setting as Django's own method does,
    # through the setting_changed signal override_settings sends.
    with override_settings(USE_TZ=False):
        params = wrapper.get_connection_params()
        assert params["context"] is get_adapters_template(False, wrapper.timezone)
    assert wrapper.get_connection_params()["context"] is before

"""The attempt pipeline is the choke point: what libpq is handed is judged, on every path.

Issue 27's findings, each against a hostile server holding a certificate from the trusted CA
for *another* name (``tests/support/hostile.py``: real TLS, every received byte recorded). With
``sslmode=require`` libpq would accept that certificate and send the startup packet and the
password; the stock ENGINE shows it does. Here the weakened parameters are refused before any
connection is opened: the server records nothing at all.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db.backends.postgresql import base as postgresql
from django.db.utils import ConnectionHandler, OperationalError
from django.test import override_settings

from secure_pg_backend import (
    InsecureConnectionError,
    SecurePolicyError,
    checks,
    diagnose,
    pipeline,
)
from secure_pg_backend.base import DatabaseWrapper, VerifiedTLSMixin
from secure_pg_backend.testing import APP_PASSWORD, TestCA, TLSPostgres
from tests.conftest import assert_no_secret
from tests.support.hostile import HostileServer
from tests.weakening_engine.base import DatabaseWrapper as Weakening

CONNECT_TIMEOUT = 3


@pytest.fixture(autouse=True)
def _network_allowed(django_db_blocker: Any) -> Iterator[None]:
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def evil(ca: TestCA) -> Iterator[HostileServer]:
    """A server with a certificate the trusted CA issued for evil.example, not localhost."""
    with HostileServer("tls", ca.issue("evil.example")) as server:
        yield server


def _entry(port: int, ca: TestCA, engine: str = "secure_pg_backend", **options: Any) -> Any:
    return {
        "ENGINE": engine,
        "NAME": "app",
        "USER": "app",
        "PASSWORD": APP_PASSWORD,
        "HOST": "localhost",
        "PORT": str(port),
        "OPTIONS": {
            "hostaddr": "127.0.0.1",
            "sslrootcert": str(ca.cert_path),
            "connect_timeout": CONNECT_TIMEOUT,
            "connect_retry": 0,
            **options,
        },
    }


def _wrapper(cls: type, entry: dict[str, Any], alias: str = "weak") -> Any:
    handler = ConnectionHandler({"default": {"ENGINE": "django.db.backends.dummy"}, alias: entry})
    return cls(handler.settings[alias], alias)


def _refused(wrapper: Any) -> OperationalError | SecurePolicyError:
    try:
        with pytest.raises((OperationalError, SecurePolicyError)) as caught:
            wrapper.ensure_connection()
    finally:
        wrapper.close()
        if wrapper.pool is not None:
            wrapper.close_pool()
    assert_no_secret(str(caught.value), repr(caught.value))
    return caught.value


def test_stock_with_require_hands_the_password_to_the_wrong_name(
    evil: HostileServer, ca: TestCA
) -> None:
    # What the weakening below would cost without the pipeline: the attack works on stock.
    entry = _entry(evil.port, ca, "django.db.backends.postgresql", sslmode="require")
    del entry["OPTIONS"]["connect_retry"]
    entry["OPTIONS"]["connect_timeout"] = 2  # libpq's shortest: the phished client waits it out
    with pytest.raises(OperationalError) as caught:
        _wrapper(postgresql.DatabaseWrapper, entry).ensure_connection()
    # The failed PGconn lives in the traceback's frames; dropped, its socket closes now and
    # the hostile server's handler ends instead of waiting out its own deadline.
    caught.value.__traceback__ = None
    del caught
    gc.collect()
    evil.settle()
    assert APP_PASSWORD.encode() in evil.all_bytes()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"sslmode": "require"}, "sslmode"),
        ({"sslmode": "verify-ca"}, "sslmode"),
        ({"gssencmode": "prefer"}, "gssencmode"),
        ({" sslmode": "require"}, "sslmode"),  # libpq skips the space: a second sslmode
        ({"sslrootcert": "/etc/ssl/certs/ca-certificates.crt"}, "sslrootcert"),
        ({"ssl_min_protocol_version": "TLSv1"}, "ssl_min_protocol_version"),
    ],
)
def test_a_subclass_that_weakens_what_libpq_gets_is_refused_before_anything_is_sent(
    evil: HostileServer, ca: TestCA, change: dict[str, str], key: str
) -> None:
    cls = type("Weakening", (Weakening,), {"weakened": change})
    error = _refused(_wrapper(cls, _entry(evil.port, ca)))
    assert isinstance(error, InsecureConnectionError)
    message = str(error)
    assert f"carry {key}=" in message and "Nothing was sent to the server" in message
    assert "tests.weakening_engine.base.DatabaseWrapper.get_connection_params" in message
    assert "DATABASES['weak']" in message
    evil.settle()
    assert evil.recordings == []  # not even a TCP connection, let alone a startup packet


def test_a_removed_forced_value_is_refused(evil: HostileServer, ca: TestCA) -> None:
    class Removing(DatabaseWrapper):
        def get_connection_params(self) -> dict[str, Any]:
            params = super().get_connection_params()
            del params["sslrootcert"]  # libpq would fall back to ~/.postgresql/root.crt
            return params

    error = _refused(_wrapper(Removing, _entry(evil.port, ca)))
    assert "carry sslrootcert=None" in str(error)
    assert "test_a_removed_forced_value_is_refused.<locals>.Removing" in str(error)
    evil.settle()
    assert evil.recordings == []


def test_a_nul_byte_ahead_of_the_policy_is_refused(evil: HostileServer, ca: TestCA) -> None:
    # libpq reads the connection string as a C string: a NUL in an early value would cut off
    # every forced keyword after it.
    class Cutting(DatabaseWrapper):
        def get_connection_params(self) -> dict[str, Any]:
            return {"application_name": "x\x00", **super().get_connection_params()}

    error = _refused(_wrapper(Cutting, _entry(evil.port, ca)))
    assert isinstance(error, InsecureConnectionError) and "Nothing was sent" in str(error)
    evil.settle()
    assert evil.recordings == []


class _Text(str):
    """A str subclass, as settings loaders and Django's SafeString hand out."""


@pytest.mark.parametrize("text", [str, _Text])
def test_a_remembered_verdict_never_covers_a_nul_byte(ca: TestCA, text: type[str]) -> None:
    # A verdict is remembered by the keys and the forced values; a NUL anywhere (a str subclass
    # too) is judged afresh, since libpq would stop reading at it.
    wrapper = _wrapper(DatabaseWrapper, _entry(5432, ca))
    params = wrapper.get_connection_params()
    plan = wrapper._plan()
    pipeline.judge(plan, params)  # judged and remembered
    pipeline.judge(plan, params)  # remembered: no parse
    cut = {"user": text("app\x00"), **{k: v for k, v in params.items() if k != "user"}}
    with pytest.raises(InsecureConnectionError, match="Nothing was sent"):
        pipeline.judge(plan, cut)


class _Agreeable(str):
    """A str that says it equals anything: only identity means "the same object"."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


class _Shifting:
    """A value whose text changes in place (psycopg writes ``str(value)``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def test_the_identity_memo_trusts_no_equality_and_no_value_that_can_change(ca: TestCA) -> None:
    # judge skips everything for the very objects it judged last time (the usual connection);
    # a value that only claims equality, or one whose text changed in place, is judged again.
    wrapper = _wrapper(DatabaseWrapper, _entry(5432, ca))
    params = wrapper.get_connection_params()
    plan = wrapper._plan()
    key = pipeline.judge(plan, params)
    assert plan.last_judged is not None
    assert pipeline.judge(plan, dict(params)) == key  # the same objects: no key, no parse
    liar = {**params, "sslmode": _Agreeable("require")}
    with pytest.raises(InsecureConnectionError, match="sslmode='require'"):
        pipeline.judge(plan, liar)
    shifting = _Shifting("verify-full")
    changing = {**params, "sslmode": shifting}
    pipeline.judge(plan, changing)  # verify-full now: passes, but not kept by identity
    shifting.text = "require"
    with pytest.raises(InsecureConnectionError, match="sslmode='require'"):
        pipeline.judge(plan, changing)


def test_a_subclass_that_weakens_a_pool_is_refused_too(evil: HostileServer, ca: TestCA) -> None:
    entry = _entry(evil.port, ca, pool={"min_size": 1, "timeout": 5})
    error = _refused(_wrapper(Weakening, entry))
    assert isinstance(error, InsecureConnectionError)
    assert "carry sslmode='require'" in str(error)
    evil.settle()
    assert evil.recordings == []


def test_a_subclass_that_overrides_get_new_connection_is_judged_at_database_connect(
    evil: HostileServer, ca: TestCA
) -> None:
    # Below the mixin, get_new_connection changes the parameters after the pipeline handed
    # them on: the judgment sits in Database.connect, the call Django's method ends in.
    class LateChange(DatabaseWrapper):
        def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
            return super().get_new_connection(conn_params)

    class Inner(postgresql.DatabaseWrapper):
        def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
            return super().get_new_connection({**conn_params, "sslmode": "require"})

    composed = type("Composed", (VerifiedTLSMixin, Inner), {})
    probes = diagnose.probes_made()
    for cls in (LateChange, composed):
        error = _refused(_wrapper(cls, _entry(evil.port, ca)))
        if cls is composed:
            assert isinstance(error, InsecureConnectionError)
            assert "carry sslmode='require'" in str(error)
            assert "Inner.get_new_connection" in str(error)
    evil.settle()
    # LateChange changes nothing: it reached the hostile server, whose name libpq refused (and
    # the refusal's diagnostic handshake, which sends only a ClientHello, read its certificate).
    assert len(evil.recordings) == 1 + diagnose.probes_made() - probes
    assert not any(APP_PASSWORD.encode() in bytes(r.decrypted) for r in evil.recordings)


def test_a_class_that_lists_django_first_never_connects(evil: HostileServer, ca: TestCA) -> None:
    from tests.misordered_engine.base import DatabaseWrapper as Misordered

    assert Misordered.misassembled
    error = _refused(_wrapper(Misordered, _entry(evil.port, ca)))
    assert isinstance(error, SecurePolicyError)
    assert "secure_pg_backend.E020" not in str(error)  # the id is the check's, the words here
    assert "VerifiedTLSMixin first" in str(error)
    assert "tests.misordered_engine.base.DatabaseWrapper" in str(error)
    evil.settle()
    assert evil.recordings == []


def test_check_names_a_misordered_class_and_a_weakening_subclass(
    good_server: TLSPostgres, ca: TestCA
) -> None:
    databases = {
        "default": good_server.database_settings(),
        "misordered": _entry(good_server.port, ca, "tests.misordered_engine"),
        "weak": _entry(good_server.port, ca, "tests.weakening_engine"),
    }
    with override_settings(DATABASES=databases):
        found = {m.obj: m for m in checks.check_databases(None)}
    assert set(found) == {"DATABASES['misordered']", "DATABASES['weak']"}
    misordered, weak = found["DATABASES['misordered']"], found["DATABASES['weak']"]
    assert misordered.id == "secure_pg_backend.E020" and misordered.is_serious()
    assert "VerifiedTLSMixin" in misordered.hint
    assert weak.id == "secure_pg_backend.E009" and weak.is_serious()
    assert "carry sslmode='require'" in weak.msg
    assert_no_secret(misordered.msg, weak.msg)


def test_database_connect_outside_an_attempt_is_refused(good_server: TLSPostgres) -> None:
    params = {k: v for k, v in good_server.database_settings()["OPTIONS"].items()}
    with pytest.raises(InsecureConnectionError, match="outside its attempt pipeline"):
        DatabaseWrapper.Database.connect(host="127.0.0.1", port=good_server.port, **params)
    # Everything else is psycopg's own (Django reads exception classes from it).
    assert DatabaseWrapper.Database.OperationalError is psycopg.OperationalError


def test_adding_parameters_below_the_mixin_stays_allowed(
    good_server: TLSPostgres, make_wrapper: Any
) -> None:
    class Adding(DatabaseWrapper):
        def get_connection_params(self) -> dict[str, Any]:
            return {**super().get_connection_params(), "application_name": "added-below"}

    settings = make_wrapper(good_server.database_settings()).settings_dict
    wrapper = Adding(settings, "adding")
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("select current_setting('application_name')")
            assert cursor.fetchone() == ("added-below",)
        assert wrapper.tls_info.sslmode == "verify-full"
    finally:
        wrapper.close()

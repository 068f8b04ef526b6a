"""A provider that returns the user too, and the second chance after a rotation, on a real
server: roles are created during the test; ``select current_user`` says who connected."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.management import call_command
from django.db import OperationalError, connections

from secure_pg_backend import Credentials, metrics, provider, signals
from secure_pg_backend.client import psql_session
from secure_pg_backend.testing import TLSPostgres
from tests.conftest import assert_no_secret

MODES = ["plain", "persistent", "pool"]


class Role:
    """A login role on the shared server, made for one test."""

    def __init__(self, server: TLSPostgres, login: bool = True) -> None:
        self.server = server
        self.name = f"rot_{uuid.uuid4().hex[:10]}"
        self.password = f"role-Pw-{uuid.uuid4().hex}"
        server.admin_sql(
            f"CREATE ROLE {self.name} {'LOGIN' if login else 'NOLOGIN'} PASSWORD '{self.password}'",
            f"GRANT ALL ON DATABASE app TO {self.name}",
        )

    def rotate(self) -> str:
        self.password = f"role-Pw-{uuid.uuid4().hex}"
        self.server.admin_sql(f"ALTER ROLE {self.name} PASSWORD '{self.password}'")
        return self.password

    def drop(self) -> None:
        self.server.admin_sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{self.name}'",
            f"REVOKE ALL ON DATABASE app FROM {self.name}",
            f"DROP ROLE {self.name}",
        )


@pytest.fixture
def make_role(good_server: TLSPostgres) -> Iterator[Callable[..., Role]]:
    made: list[Role] = []

    def make(login: bool = True) -> Role:
        made.append(Role(good_server, login))
        return made[-1]

    yield make
    for role in made:
        role.drop()


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    provider.forget()
    yield
    provider.forget()


@pytest.fixture
def retries() -> Iterator[list[dict[str, Any]]]:
    """Every connection_retried signal sent during the test."""
    seen: list[dict[str, Any]] = []

    def record(sender: object, **kwargs: Any) -> None:
        seen.append(kwargs)

    signals.connection_retried.connect(record, weak=False, dispatch_uid="test_rotation")
    yield seen
    signals.connection_retried.disconnect(dispatch_uid="test_rotation")


class Scripted:
    """A provider answering from a script (the last answer repeats), counting its calls."""

    def __init__(self, *answers: Callable[[], object]) -> None:
        self.answers = answers
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, alias: str, settings_dict: Mapping[str, Any]) -> object:
        with self.lock:
            self.calls += 1
            index = min(self.calls, len(self.answers)) - 1
        return self.answers[index]()


def entry(server: TLSPostgres, mode: str, fn: object, **extra: Any) -> dict[str, Any]:
    """USER stays the app's: the provider's user must win for the connection."""
    options: dict[str, Any] = {"password_provider": fn}
    if mode == "pool":
        options["pool"] = {"min_size": 1, "max_size": 4, "timeout": 20}
    settings = server.database_settings(PASSWORD="", options=options, **extra)
    if mode == "persistent":
        settings["CONN_MAX_AGE"] = 600
    return settings


def who(wrapper: Any) -> str:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT current_user")
        row = cursor.fetchone()
    return str(row[0])


@pytest.mark.parametrize("mode", MODES)
def test_provider_credentials_connect_as_that_role(
    mode: str,
    good_server: TLSPostgres,
    make_role: Callable[..., Role],
    make_wrapper: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    role = make_role()
    fn = Scripted(lambda: Credentials(role.name, role.password))
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    wrapper = make_wrapper(entry(good_server, mode, fn), alias=f"creds_{mode}")
    assert who(wrapper) == role.name
    info = wrapper.tls_info
    assert info.user == role.name and info.transport == "tls"
    (line,) = [r.getMessage() for r in caplog.records if "connected to" in r.getMessage()]
    assert f"database 'app' as user '{role.name}' with TLS" in line
    record = next(r for r in caplog.records if "connected to" in r.getMessage())
    assert record.db_user == role.name  # type: ignore[attr-defined]
    assert wrapper.settings_dict["USER"] == "app"  # the settings are never changed
    assert_no_secret(caplog.text, repr(info), json.dumps(info.as_dict()))
    assert role.password not in caplog.text + repr(info) + json.dumps(info.as_dict())
    if mode == "persistent":
        wrapper.close_if_unusable_or_obsolete()
        assert who(wrapper) == role.name and fn.calls == 1  # the same connection, kept


@pytest.mark.parametrize("mode", MODES)
def test_a_stale_answer_gets_one_second_chance(
    mode: str,
    good_server: TLSPostgres,
    make_role: Callable[..., Role],
    make_wrapper: Any,
    retries: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    role = make_role()
    stale = role.password
    role.rotate()  # between the provider's fetch and the connect: the answer is stale
    # The stale answer says it is good for an hour: only bypassing the cache gets the new one.
    fn = Scripted(
        lambda: Credentials(role.name, stale, expires_at=time.time() + 3600),
        lambda: Credentials(role.name, role.password, expires_at=time.time() + 3600),
    )
    caplog.set_level(logging.WARNING, logger="secure_pg_backend")
    alias = f"second_{mode}"
    settings = entry(good_server, mode, fn)
    if mode == "pool":
        # One physical connection: a larger pool grows while a client waits, and each of its
        # parallel connects would take its own second chance (served by the same new fetch).
        settings["OPTIONS"]["pool"]["max_size"] = 1
    wrapper = make_wrapper(settings, alias=alias)
    before = _retry_metric(alias)
    assert who(wrapper) == role.name
    assert fn.calls == 2
    assert [(r["alias"], r["cause"], r["attempt"]) for r in retries] == [(alias, "rotated", 1)]
    assert "password authentication failed" in retries[0]["message"]
    if before is not None:  # prometheus_client installed: counted with its own cause
        assert _retry_metric(alias) == before + 1
    assert stale not in caplog.text + retries[0]["message"]
    assert role.password not in caplog.text
    assert "rotated" in caplog.text
    # The new answer is cached: the next physical connection does not ask again.
    wrapper.close()
    if mode == "pool":
        wrapper.pool.drain()
    assert who(wrapper) == role.name
    assert fn.calls == 2 and len(retries) == 1


def _retry_metric(alias: str) -> float | None:
    if not metrics._metrics:
        return None
    import prometheus_client

    value = prometheus_client.REGISTRY.get_sample_value(
        "secure_pg_backend_connection_retries_total", {"alias": alias, "cause": "rotated"}
    )
    return value or 0.0


@pytest.mark.parametrize("mode", ["plain", "pool"])
def test_the_second_chance_is_taken_once(
    mode: str,
    good_server: TLSPostgres,
    make_role: Callable[..., Role],
    make_wrapper: Any,
    retries: list[dict[str, Any]],
) -> None:
    role = make_role()
    fn = Scripted(lambda: Credentials(role.name, "never-the-Pw-1"))
    settings = entry(good_server, mode, fn)
    if mode == "pool":
        settings["OPTIONS"]["pool"]["timeout"] = 3
    wrapper = make_wrapper(settings, alias=f"once_{mode}")
    # A wrong password is not a refusal: with a pool, requests wait as with the stock backend.
    expected = "password authentication failed" if mode == "plain" else "couldn't get a conn"
    with pytest.raises(OperationalError, match=expected):
        wrapper.ensure_connection()
    if mode == "plain":
        assert fn.calls == 2
        assert [r["cause"] for r in retries] == ["rotated"]
    else:  # the pool keeps trying in the background: each of its connects gets one chance
        wrapper.close_pool()  # its workers stop: the counts below are final
        assert fn.calls >= 2 and fn.calls == 2 * len(retries)
        assert {r["cause"] for r in retries} == {"rotated"}


def test_a_static_wrong_password_is_never_retried(
    good_server: TLSPostgres, make_wrapper: Any, retries: list[dict[str, Any]]
) -> None:
    wrapper = make_wrapper(good_server.database_settings(PASSWORD="static-wrong-Pw"), "static")
    with pytest.raises(OperationalError, match="password authentication failed") as e:
        wrapper.ensure_connection()
    assert retries == []
    # What the server really answered is what ``rotated`` recognises, given a provider's value.
    cause = e.value.__cause__
    assert isinstance(cause, psycopg.OperationalError)
    assert provider.rotated(cause, provider.Answer("app", "x", None))
    assert not provider.rotated(cause, None)


def test_other_authorization_failures_get_no_second_chance(
    good_server: TLSPostgres,
    make_role: Callable[..., Role],
    make_wrapper: Any,
    retries: list[dict[str, Any]],
) -> None:
    role = make_role(login=False)  # the password is right; the role may not log in (28000)
    fn = Scripted(lambda: Credentials(role.name, role.password))
    wrapper = make_wrapper(entry(good_server, "plain", fn), alias="nologin")
    with pytest.raises(OperationalError, match="not permitted to log in") as e:
        wrapper.ensure_connection()
    assert fn.calls == 1 and retries == []
    assert role.password not in str(e.value)


def test_dbshell_dbtls_and_check_ask_the_provider_for_the_user(
    good_server: TLSPostgres,
    make_role: Callable[..., Role],
    aliases: Any,
    capfd: pytest.CaptureFixture[str],
) -> None:
    role = make_role()
    script = Scripted(lambda: Credentials(role.name, role.password))

    def fn(alias: str, settings_dict: Mapping[str, Any]) -> object:
        return script(alias, settings_dict)  # a function: the aliases fixture deep-copies

    aliases(rot_user=entry(good_server, "plain", fn))
    with psql_session(connections["rot_user"], []) as (args, env):
        (line,) = Path(env["PGPASSFILE"]).read_text().splitlines()
        # host:port:dbname:user:password, bound to the provider's user
        assert line.split(":")[3] == role.name and line.endswith(f":{role.password}")
        assert f"user={role.name}" in args[1]
    assert role.password not in " ".join(args)

    call_command("dbshell", "--database", "rot_user", "--", "-At", "-c", "select current_user")
    out, err = capfd.readouterr()
    assert out.strip() == role.name, err

    output = StringIO()
    call_command("dbtls", "--database", "rot_user", "--json", stdout=output)
    assert json.loads(output.getvalue())["rot_user"]["user"] == role.name
    text = StringIO()
    call_command("dbtls", "--database", "rot_user", stdout=text)
    assert f"user '{role.name}'" in text.getvalue()

    calls = script.calls
    call_command("check", "--database", "rot_user", stdout=StringIO(), stderr=StringIO())
    assert script.calls == calls + 1  # the online check connects as a connection does
    assert role.password not in output.getvalue() + text.getvalue() + out + err
    assert_no_secret(output.getvalue(), text.getvalue())


def test_parameters_a_class_below_the_mixin_builds_are_asked_for_on_every_connect(
    good_server: TLSPostgres, make_role: Callable[..., Role], make_wrapper: Any
) -> None:
    """A class between the mixin and Django's wrapper that builds the password per call (an
    IAM token, as django-iam-dbauth does) is asked on every connect: a rotated password is
    used, not the one the first verdict was made from."""
    from django.db.backends.postgresql import base as postgresql

    from secure_pg_backend.base import VerifiedTLSMixin

    role = make_role()

    class TokenWrapper(postgresql.DatabaseWrapper):
        def get_connection_params(self) -> dict[str, Any]:
            params: dict[str, Any] = super().get_connection_params()
            params["password"] = role.password  # the token of the moment
            return params

    class Wrapper(VerifiedTLSMixin, TokenWrapper):
        pass

    settings = make_wrapper(good_server.database_settings(USER=role.name)).settings_dict
    wrapper = Wrapper(settings, "token")
    try:
        for _ in range(2):
            with wrapper.cursor() as cursor:
                cursor.execute("select current_user")
                assert cursor.fetchone() == (role.name,)
            wrapper.close()
            role.rotate()
    finally:
        wrapper.close()

"""``OPTIONS['password_provider']`` on a real server: the role's password is rotated
between connections, and every new physical connection uses the fresh value."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import OperationalError, connections

from secure_pg_backend.client import DatabaseClient, psql_session
from secure_pg_backend.errors import CredentialProviderError, SecurePolicyError
from secure_pg_backend.testing import TLSPostgres
from tests.conftest import assert_no_secret

THREADS = 16


@dataclass
class RotatingRole:
    """A login role on the shared server whose password the test rotates."""

    server: TLSPostgres
    name: str = field(default_factory=lambda: f"rot_{uuid.uuid4().hex[:10]}")
    current: str = ""
    handed_out: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def rotate(self) -> str:
        self.current = f"rot-Pw-{uuid.uuid4().hex}"
        self.server.admin_sql(f"ALTER ROLE {self.name} PASSWORD '{self.current}'")
        return self.current

    def settings(self, **options: Any) -> dict[str, Any]:
        # A plain function: settings are deep-copied, and functions are copied by reference.
        def provider(alias: str, settings_dict: Mapping[str, Any]) -> str:
            with self._lock:
                self.handed_out.append(self.current)
            return self.current

        return self.server.database_settings(
            USER=self.name, PASSWORD="", options={"password_provider": provider, **options}
        )


@pytest.fixture
def role(good_server: TLSPostgres) -> Iterator[RotatingRole]:
    role = RotatingRole(good_server)
    good_server.admin_sql(f"CREATE ROLE {role.name} LOGIN")
    role.rotate()
    yield role
    good_server.admin_sql(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role.name}'",
        f"DROP ROLE {role.name}",
    )


def current_user(wrapper: Any) -> tuple[str, int]:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT current_user, pg_backend_pid()")
        row: tuple[str, int] = cursor.fetchone()
    return row


def test_every_connection_gets_the_rotated_password(
    role: RotatingRole, make_wrapper: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrapper = make_wrapper(role.settings(), alias="rotating")  # CONN_MAX_AGE = 0
    used = []
    for _ in range(3):
        used.append(role.rotate())  # the value the previous connection used is now invalid
        assert current_user(wrapper)[0] == role.name
        info = wrapper.tls_info
        wrapper.close()
    assert role.handed_out == used

    stale = role.current
    role.rotate()
    role.current = stale  # a provider handing out an outdated value is really refused
    with pytest.raises(OperationalError, match="password authentication failed") as e:
        wrapper.ensure_connection()
    texts = [str(e.value), caplog.text, repr(info), json.dumps(info.as_dict()), info.summary()]
    for secret in used:
        for text in texts:
            assert secret not in text
    assert "password_provider" not in json.dumps(info.as_dict())


def test_pool_of_16_threads_uses_the_fresh_password_for_new_connections(
    role: RotatingRole, aliases: Any
) -> None:
    pool = {"min_size": 1, "max_size": THREADS, "timeout": 20}
    aliases(rot_pool=role.settings(pool=pool))

    def all_threads_at_once() -> set[int]:
        barrier = threading.Barrier(THREADS, timeout=30)
        pids: set[int] = set()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                name, pid = current_user(connections["rot_pool"])
                assert name == role.name
                pids.add(pid)
                barrier.wait()  # all 16 held together: 16 physical connections
            except BaseException as exc:
                errors.append(exc)
                barrier.abort()
            finally:
                connections.close_all()  # back to the pool

        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        return pids

    first = all_threads_at_once()
    assert len(first) == THREADS
    before = len(role.handed_out)
    fresh = role.rotate()  # every open connection's password is now invalid
    connections["rot_pool"].pool.drain()  # the pool replaces all of them
    second = all_threads_at_once()
    assert len(second) == THREADS and not first & second
    after_rotation = role.handed_out[before:]
    assert len(after_rotation) >= THREADS
    assert set(after_rotation) == {fresh}


def failing(alias: str, settings_dict: Mapping[str, Any]) -> str:
    raise RuntimeError("identity service unavailable")


@pytest.mark.parametrize("pooled", [False, True], ids=["conn_max_age", "pool"])
def test_failing_provider_names_alias_and_provider(
    pooled: bool, good_server: TLSPostgres, make_wrapper: Any, settings: Any
) -> None:
    settings.SECURE_PG_BACKEND_PASSWORD_PROVIDERS = [f"{__name__}.failing"]
    options: dict[str, Any] = {"password_provider": f"{__name__}.failing"}
    if pooled:
        options["pool"] = {"min_size": 1, "timeout": 30}
    wrapper = make_wrapper(
        good_server.database_settings(PASSWORD="", options=options), alias="tokens"
    )
    # Pooled: handed over at once (not a PoolTimeout after the pool's 30 s).
    with pytest.raises(CredentialProviderError) as e:
        wrapper.ensure_connection()
    assert str(e.value).startswith(
        "secure_pg_backend could not get a password for DATABASES['tokens'] (host '127.0.0.1'): "
        f"the password provider '{__name__}.failing' raised RuntimeError: identity service "
        "unavailable"
    )


def test_dbshell_passes_the_provider_value_in_a_private_passfile(
    role: RotatingRole, aliases: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    aliases(rot_shell=role.settings())
    with psql_session(connections["rot_shell"], []) as (args, env):
        assert "PGPASSWORD" not in env
        assert Path(env["PGPASSFILE"]).read_text().rstrip("\n").endswith(f":{role.current}")
    assert role.current not in " ".join(args)
    assert not any("password_provider" in arg for arg in args)

    fresh = role.rotate()
    call_command("dbshell", "--database", "rot_shell", "--", "-At", "-c", "select current_user")
    out, err = capfd.readouterr()
    assert out.strip() == role.name, err
    assert fresh not in out + err

    output = StringIO()
    call_command("dbtls", "--database", "rot_shell", "--json", stdout=output)
    assert json.loads(output.getvalue())["rot_shell"]["transport"] == "tls"
    assert fresh not in output.getvalue()
    assert_no_secret(output.getvalue())


def test_the_provider_value_reaches_libpq_only(role: RotatingRole, make_wrapper: Any) -> None:
    wrapper = make_wrapper(role.settings(), alias="rotating2")
    wrapper.ensure_connection()
    # libpq got it (the server accepted it), but the settings and the parameters did not.
    assert wrapper.connection.info.password == role.current
    assert "password" not in wrapper.get_connection_params()
    assert wrapper.settings_dict["PASSWORD"] == ""


@pytest.mark.parametrize("pooled", [False, True], ids=["conn_max_age", "pool"])
def test_provider_is_not_asked_when_the_policy_refuses(
    pooled: bool, good_server: TLSPostgres, make_wrapper: Any
) -> None:
    calls: list[str] = []

    def provider(alias: str, settings_dict: Mapping[str, Any]) -> str:
        calls.append(alias)
        return "never-used"

    options: dict[str, Any] = {"password_provider": provider, "sslmode": "require"}
    if pooled:
        options["pool"] = {"min_size": 1, "timeout": 30}
    settings = good_server.database_settings(PASSWORD="", options=options)
    wrapper = make_wrapper(settings, alias="weak_tokens")
    with pytest.raises(SecurePolicyError, match=r"DATABASES\['weak_tokens'\].*'require'"):
        wrapper.ensure_connection()
    with pytest.raises(SecurePolicyError):
        DatabaseClient.settings_to_cmd_args_env(settings, [])
    assert calls == []

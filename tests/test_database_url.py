"""DATABASE_URL through dj-database-url: the URL is just another way to write the settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dj_database_url
import pytest

from example_project.settings import databases_from_env
from secure_pg_backend import InsecureConnectionError, SecurePolicyError
from secure_pg_backend.base import standalone_wrapper
from secure_pg_backend.testing import APP_PASSWORD, TLSPostgres
from tests.conftest import assert_no_secret


def _url(server: TLSPostgres, query: str, host: str = "localhost", port: int = 0) -> str:
    return f"postgres://app:{APP_PASSWORD}@{host}:{port or server.port}/app?{query}"


def _parse(url: str) -> dict[str, Any]:
    return dict(dj_database_url.parse(url, engine="secure_pg_backend"))


def test_verify_full_url_connects_end_to_end(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres, django_db_blocker: Any
) -> None:
    query = f"sslmode=verify-full&sslrootcert={good_server.root_cert}"
    wrapper = make_wrapper(_parse(_url(good_server, query)))
    with django_db_blocker.unblock(), wrapper.cursor() as cursor:
        cursor.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert cursor.fetchone() == (True,)
    info = wrapper.tls_info
    assert (info.host, info.port, info.sslmode) == ("localhost", good_server.port, "verify-full")
    assert info.root_cert == good_server.root_cert
    assert info.root_cert_source == "OPTIONS['sslrootcert']"


def test_url_without_sslmode_gets_verify_full(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres, django_db_blocker: Any
) -> None:
    wrapper = make_wrapper(_parse(_url(good_server, f"sslrootcert={good_server.root_cert}")))
    with django_db_blocker.unblock():
        assert wrapper.tls_info.sslmode == "verify-full"


@pytest.mark.parametrize("mode", ["require", "verify-ca", "prefer", "disable"])
def test_weak_sslmode_in_url_is_refused_before_connecting(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    tcp_recorder: Any,
    django_db_blocker: Any,
    mode: str,
) -> None:
    url = _url(good_server, f"sslmode={mode}&sslrootcert={good_server.root_cert}")
    url = url.replace(str(good_server.port), str(tcp_recorder.port))
    wrapper = make_wrapper(_parse(url), alias="from_url")
    with django_db_blocker.unblock(), pytest.raises(SecurePolicyError) as caught:
        wrapper.ensure_connection()
    message = str(caught.value)
    assert f"DATABASES['from_url'] (host 'localhost'): OPTIONS['sslmode'] is {mode!r}" in message
    assert "Fix:" in message
    assert [v.code for v in caught.value.violations] == ["E001"]
    assert tcp_recorder.accepted == 0
    assert_no_secret(message, repr(caught.value))


def test_verified_url_to_an_impostor_is_refused(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    mitm_server: TLSPostgres,
    django_db_blocker: Any,
) -> None:
    query = f"sslmode=verify-full&sslrootcert={good_server.root_cert}"
    wrapper = make_wrapper(_parse(_url(mitm_server, query)))
    with django_db_blocker.unblock(), pytest.raises(InsecureConnectionError) as caught:
        wrapper.ensure_connection()
    assert "certificate verify failed" in str(caught.value)


def test_example_project_reads_database_url_and_extra_aliases(good_server: TLSPostgres) -> None:
    good = _url(good_server, f"sslrootcert={good_server.root_cert}")
    weak = _url(good_server, f"sslmode=require&sslrootcert={good_server.root_cert}")
    databases = databases_from_env({"DATABASE_URL": good, "DATABASE_URL_REPLICA": weak})
    assert list(databases) == ["default", "replica"]
    assert databases["default"]["ENGINE"] == "secure_pg_backend"
    assert databases["default"]["OPTIONS"] == {"sslrootcert": good_server.root_cert}
    assert standalone_wrapper("default", databases["default"]).policy_verdict().violations == ()
    (violation,) = standalone_wrapper("replica", databases["replica"]).policy_verdict().violations
    assert violation.code == "E001"


def test_example_project_falls_back_to_db_variables() -> None:
    env = {"DB_HOST": "db.example.com", "DB_PORT": "6432", "DB_SSLROOTCERT": "system"}
    (entry,) = databases_from_env(env).values()
    assert (entry["HOST"], entry["PORT"], entry["NAME"]) == ("db.example.com", "6432", "app")
    assert entry["OPTIONS"] == {"sslrootcert": "system"}


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_provider_named_in_a_url_is_refused_before_any_import(
    good_server: TLSPostgres, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """A DATABASE_URL alone never makes the process import or call code (E015 in check)."""
    import sys

    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    marker = tmp_path / "imported"
    (tmp_path / "spb_url_provider.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport builtins\nmain = builtins.print\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    query = f"sslrootcert={good_server.root_cert}&password_provider=spb_url_provider.main"
    entry = _parse(_url(good_server, query).replace(f"app:{APP_PASSWORD}@", "app@"))
    assert entry["OPTIONS"]["password_provider"] == "spb_url_provider.main"
    settings.DATABASES = {**settings.DATABASES, "from_url": entry}
    with pytest.raises(SystemCheckError) as caught:
        call_command("check")
    message = str(caught.value)
    assert "secure_pg_backend.E015" in message and "DATABASES['from_url']" in message
    assert "SECURE_PG_BACKEND_PASSWORD_PROVIDERS" in message
    assert not marker.exists() and "spb_url_provider" not in sys.modules

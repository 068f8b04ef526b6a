"""Online checks (``manage.py check --database ALIAS``): W001 expiry soon, E010 no secure link."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from django.core.checks import Error, Warning
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections

from secure_pg_backend.testing import TLSPostgres
from tests.conftest import assert_no_secret, leaf_certificate


def test_certificate_expiring_within_30_days_is_w001(
    aliases: Callable[..., None], expiring_server: TLSPostgres
) -> None:
    aliases(soon=expiring_server.database_settings())
    issues = connections["soon"].validation.check()
    assert [i.id for i in issues] == ["secure_pg_backend.W001"]
    (warning,) = issues
    assert isinstance(warning, Warning)
    cert = leaf_certificate(expiring_server)
    assert warning.msg.startswith("The server certificate of database alias 'soon'")
    assert cert.subject.rfc4514_string() in warning.msg
    assert f"expires {cert.not_valid_after_utc:%Y-%m-%d}, in 10 days" in warning.msg
    assert warning.hint and "Renew" in warning.hint
    assert warning.obj == "DATABASES['soon']"


def test_manage_py_check_database_prints_the_warning(
    aliases: Callable[..., None], expiring_server: TLSPostgres
) -> None:
    aliases(soon=expiring_server.database_settings())
    out, err = io.StringIO(), io.StringIO()
    call_command("check", databases=["soon"], stdout=out, stderr=err)  # warnings do not fail
    assert "secure_pg_backend.W001" in err.getvalue()
    assert "in 10 days" in err.getvalue()


def test_a_good_server_has_no_issue(aliases: Callable[..., None], good_server: TLSPostgres) -> None:
    aliases(fine=good_server.database_settings())
    assert connections["fine"].validation.check() == []


@pytest.mark.parametrize(
    ("server_fixture", "needle"),
    [("mitm_server", "is not in your root certificate file"), ("expired_server", "expired on")],
)
def test_failed_secure_connection_is_e010(
    aliases: Callable[..., None], request: pytest.FixtureRequest, server_fixture: str, needle: str
) -> None:
    server: TLSPostgres = request.getfixturevalue(server_fixture)
    aliases(broken=server.database_settings())
    issues = connections["broken"].validation.check()
    assert [i.id for i in issues] == ["secure_pg_backend.E010"]
    (error,) = issues
    assert isinstance(error, Error)
    # Django prints the object, DATABASES['broken'], before the message: not named again.
    assert error.obj == "DATABASES['broken']" and "broken" not in error.msg
    assert error.msg.startswith("secure_pg_backend refused the connection for host '127.0.0.1': ")
    assert needle in error.msg and "Fix:" in error.msg.splitlines()[0]
    assert "\n  The server presented: subject " in error.msg
    assert_no_secret(error.msg, error.hint or "")


def test_manage_py_check_database_fails_on_e010(
    aliases: Callable[..., None], mitm_server: TLSPostgres
) -> None:
    aliases(broken=mitm_server.database_settings())
    with pytest.raises(SystemCheckError) as caught:
        call_command("check", databases=["broken"], stdout=io.StringIO())
    assert "secure_pg_backend.E010" in str(caught.value)
    assert "certificate verify failed" in str(caught.value)
    assert_no_secret(str(caught.value))


def test_refused_settings_are_reported_once_offline_not_again_online(
    aliases: Callable[..., None], good_server: TLSPostgres
) -> None:
    entry = good_server.database_settings(options={"sslmode": "require"})
    aliases(weak=entry)
    assert connections["weak"].validation.check() == []
    with pytest.raises(SystemCheckError) as caught:
        call_command("check", databases=["weak"], stdout=io.StringIO())
    text = str(caught.value)
    assert text.count("OPTIONS['sslmode'] is 'require'") == 1
    assert "secure_pg_backend.E001" in text and "E010" not in text
    assert "?sslmode= query key" in text  # the same fix for a DATABASE_URL user
    assert_no_secret(text)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"PASSWORD": "wrong-password-1b7e"}, "password authentication failed"),
        ({"NAME": "no_such_database"}, 'database "no_such_database" does not exist'),
        ({"PORT": "1"}, "Connection refused"),
    ],
    ids=["wrong-password", "missing-database", "server-down"],
)
def test_ordinary_failures_are_e014_not_tls(
    aliases: Callable[..., None], good_server: TLSPostgres, change: dict[str, str], needle: str
) -> None:
    aliases(plain=good_server.database_settings(**change))
    (error,) = connections["plain"].validation.check()
    assert error.id == "secure_pg_backend.E014"
    assert error.msg.startswith("Database alias 'plain' could not connect: ")
    assert needle in error.msg
    assert "TLS" not in error.msg and "Not a TLS problem" in (error.hint or "")
    assert "wrong-password-1b7e" not in error.msg


def test_a_setting_conflict_django_refuses_is_configuration_not_the_server(
    aliases: Callable[..., None], good_server: TLSPostgres
) -> None:
    # Django's pool refuses persistent connections before asking any server anything.
    pooled = good_server.database_settings(options={"pool": True}, CONN_MAX_AGE=60)
    aliases(pooled=pooled)
    (error,) = connections["pooled"].validation.check()
    assert error.id == "secure_pg_backend.E014"
    assert error.msg == (
        "Database alias 'pooled': the settings conflict: "
        "Pooling doesn't support persistent connections."
    )
    hint = error.hint or ""
    assert hint.startswith("A configuration problem, found before any server was contacted")
    assert "change DATABASES['pooled'] as the message says" in hint
    for wrong_cause in ("could not connect", "running and reachable", "PASSWORD", "TLS problem"):
        assert wrong_cause not in error.msg + hint
    # As `manage.py check --database` shows it.
    with pytest.raises(SystemCheckError) as caught:
        call_command("check", databases=["pooled"], stdout=io.StringIO())
    assert "(secure_pg_backend.E014) Database alias 'pooled': the settings conflict:" in str(
        caught.value
    )
    # The same entry without the conflict connects: the server and credentials were fine.
    aliases(fixed={**pooled, "CONN_MAX_AGE": 0})
    assert connections["fixed"].validation.check() == []

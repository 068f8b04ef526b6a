"""Offline system checks: each policy rule surfaces as its own ``secure_pg_backend.E00x``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import Error, run_checks
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.test import override_settings

from secure_pg_backend import libpq
from secure_pg_backend.base import standalone_wrapper
from secure_pg_backend.errors import redact, secret_values
from secure_pg_backend.testing import APP_PASSWORD, TLSPostgres
from tests.conftest import assert_no_secret

# Django warns that DATABASES overrides don't rebuild connections; these checks read settings only.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def _ours(messages: list[Any]) -> list[Error]:
    return [m for m in messages if m.id and m.id.startswith("secure_pg_backend.")]


def _check(good: TLSPostgres, alias: str, entry: dict[str, Any]) -> list[Error]:
    databases = {"default": good.database_settings(), alias: entry}
    with override_settings(DATABASES=databases):
        return _ours(run_checks())


def _entry(good: TLSPostgres, **options: Any) -> dict[str, Any]:
    return good.database_settings(options=options)


CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("E001", {}, {"sslmode": "require"}, "'require'"),
    ("E001", {}, {"sslmode": "verify-ca"}, "host name"),
    ("E002", {}, {"gssencmode": "prefer"}, "GSSAPI"),
    ("E003", {}, {"ssl_min_protocol_version": "TLSv1.1"}, "'TLSv1.1'"),
    ("E003", {}, {"ssl_max_protocol_version": "TLSv1"}, "ssl_max_protocol_version"),
    ("E004", {"HOST": "/var/run/postgresql"}, {}, "Unix-domain socket"),
    ("E004", {"HOST": ""}, {}, "default Unix-domain socket"),
    ("E009", {}, {" sslmode": "require"}, "OPTIONS[' sslmode']"),
    ("E011", {"PORT": "5432\x00"}, {}, "control character"),
    ("E012", {"HOST": "a.example,b.example"}, {"hostaddr": "127.0.0.1"}, "host name"),
    ("E013", {"HOST": ""}, {"service": "no-such-service"}, "no-such-service"),
    ("E015", {}, {"password_provider": "no_such_module.token"}, "has not allowed"),
    ("E015", {}, {"password_provider": 42}, "not a callable"),
    ("E006", {}, {"sslrootcert": "/nonexistent/ca.pem"}, "does not exist"),
    ("E007", {}, {"requiressl": "1"}, "'requiressl'"),
    ("E007", {}, {"sslkeylogfile": "/tmp/keys.log"}, "'sslkeylogfile'"),
    ("E008", {}, {"allow_unix_socket": "yes"}, "'allow_unix_socket'"),
    ("E008", {}, {"allow_legacy_ciphers": 1}, "'allow_legacy_ciphers'"),
]


@pytest.mark.parametrize(("code", "top", "options", "needle"), CASES)
def test_each_rule_is_reported_with_its_id(
    good_server: TLSPostgres, code: str, top: dict[str, Any], options: dict[str, Any], needle: str
) -> None:
    entry = {**_entry(good_server, **options), **top}
    errors = _check(good_server, "weak", entry)
    assert [e.id for e in errors] == [f"secure_pg_backend.{code}"]
    error = errors[0]
    assert isinstance(error, Error)
    # Django prints the object (DATABASES['weak']) first: the message names the host instead.
    assert "DATABASES['weak']" not in error.msg
    host = entry.get("HOST")
    if host:  # the default socket (HOST '') and a service name have none to name
        assert error.msg.startswith(f"host {host!r}: ")
    assert needle in error.msg
    assert error.obj == "DATABASES['weak']"
    assert error.hint and error.hint[0].isalpha()
    # The message is exactly the policy's own wording, not a second copy of the rule.
    (violation,) = standalone_wrapper("weak", entry).policy_verdict().now().violations
    assert violation.problem in error.msg
    assert error.hint == violation.fix


def test_missing_root_of_trust_is_e005(
    good_server: TLSPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    entry = good_server.database_settings()
    del entry["OPTIONS"]["sslrootcert"]
    errors = _check(good_server, "notrust", entry)
    assert [e.id for e in errors] == ["secure_pg_backend.E005"]
    assert "no root of trust" in errors[0].msg
    assert "sslrootcert" in (errors[0].hint or "")


def test_every_violation_of_one_alias_is_reported(good_server: TLSPostgres) -> None:
    entry = {
        **_entry(good_server, sslmode="prefer", gssencmode="prefer", sslkeylogfile="/tmp/k"),
        "HOST": "/tmp",
    }
    ids = sorted(e.id or "" for e in _check(good_server, "many", entry))
    assert ids == [f"secure_pg_backend.{c}" for c in ("E001", "E002", "E004", "E007")]


def test_good_settings_and_other_engines_pass(good_server: TLSPostgres) -> None:
    other = {**_entry(good_server, sslmode="disable"), "ENGINE": "django.db.backends.postgresql"}
    assert _check(good_server, "stock", other) == []
    assert _check(good_server, "fine", _entry(good_server, sslrootcert="system")) == []
    # Judged by what the wrapper is (the mixin), not by the ENGINE's name.
    mixed = {**_entry(good_server, sslmode="allow"), "ENGINE": "tests.mixin_backend"}
    assert [e.id for e in _check(good_server, "mod", mixed)] == ["secure_pg_backend.E001"]


def test_manage_py_check_fails_and_never_shows_the_password(good_server: TLSPostgres) -> None:
    # A value that happens to be the password must not be echoed back.
    entry = _entry(good_server, sslmode=APP_PASSWORD)
    databases = {"default": good_server.database_settings(), "leaky": entry}
    with override_settings(DATABASES=databases), pytest.raises(SystemCheckError) as caught:
        call_command("check")
    text = str(caught.value)
    assert "secure_pg_backend.E001" in text
    assert "DATABASES['leaky']" in text
    assert "HINT:" in text and "verify-full" in text
    assert_no_secret(text)


def test_check_runs_without_network(
    good_server: TLSPostgres, tcp_recorder: Any, django_db_blocker: Any
) -> None:
    entry = {**_entry(good_server, sslmode="require"), "PORT": str(tcp_recorder.port)}
    with django_db_blocker.unblock():
        errors = _check(good_server, "offline", entry)
    assert [e.id for e in errors] == ["secure_pg_backend.E001"]
    assert tcp_recorder.accepted == 0


# Every secret keyword this libpq marks ('*' or 'D'), and libpq 18's client secret even
# where this libpq does not know it (refused by name there).
SECRET_KEYS = sorted((libpq.secret_keywords() - {"password"}) | {"oauth_client_secret"})


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_options_never_appear_in_errors_checks_or_dbtls(
    key: str, good_server: TLSPostgres, aliases: Any
) -> None:
    """Issue 17, class 3: OPTIONS['oauth_client_secret'] with a stray control character
    had its value printed in the exception, manage.py check and the health check."""
    value = f"Sec-{key}-7f3a\x01"
    shown = value[:-1]
    entry = _entry(good_server, **{key: value})
    wrapper = standalone_wrapper("leaky", entry)
    verdict = wrapper.policy_verdict()
    assert verdict.violations  # refused: the control character, or a too-new keyword
    with pytest.raises(Exception) as caught:
        wrapper.ensure_connection()
    errors = _check(good_server, "leaky", entry)
    aliases(leaky=entry)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError):
        call_command("dbtls", "--database", "leaky", stdout=out, stderr=err)
    texts = [str(caught.value), repr(caught.value), out.getvalue(), err.getvalue()]
    texts += [f"{e.msg} {e.hint}" for e in errors] + [repr(v) for v in verdict.violations]
    assert errors and all(shown not in text for text in texts), texts


def test_redaction_covers_every_secret_option() -> None:
    entry = {"PASSWORD": "pw-1", "OPTIONS": {"sslpassword": "ssl-pw-2", "sslmode": "verify-full"}}
    assert redact("pw-1 ssl-pw-2 verify-full", secret_values(entry)) == (
        "******** ******** verify-full"
    )
    assert set(secret_values(entry)) == {"pw-1", "ssl-pw-2"}

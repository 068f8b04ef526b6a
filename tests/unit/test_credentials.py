"""``OPTIONS['password_provider']`` without a server: loading, errors, the AWS token."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import OperationalError

from secure_pg_backend import credentials, policy
from secure_pg_backend.errors import CredentialProviderError
from secure_pg_backend.provider import password_for
from secure_pg_backend.provider import with_credentials as with_password

SECRET = "provider-Tok-51c0ffee"
RDS_HOST = "orders.c9akciq32.eu-west-1.rds.amazonaws.com"
FAKE_KEY_ID = "AKIDSPBTESTEXAMPLE"
FAKE_SECRET_KEY = "spb/Fake+Secret/Key/for/offline/signing0"


def fixed(alias: str, settings_dict: Mapping[str, Any]) -> str:
    return SECRET


def failing(alias: str, settings_dict: Mapping[str, Any]) -> str:
    raise RuntimeError("token service unreachable")


def entry(provider: object, **extra: Any) -> dict[str, Any]:
    return {"HOST": "db.test", "USER": "app", "OPTIONS": {"password_provider": provider}, **extra}


def test_without_a_provider_params_are_unchanged() -> None:
    settings = {"HOST": "db.test", "PASSWORD": "static", "OPTIONS": {}}
    assert password_for("default", settings) is None
    assert with_password("default", settings, {"dbname": "app"}) == {"dbname": "app"}


def test_callable_and_allowed_dotted_path_give_the_password(settings: Any) -> None:
    settings.SECURE_PG_BACKEND_PASSWORD_PROVIDERS = [f"{__name__}.fixed"]
    calls: list[tuple[str, str]] = []

    def provider(alias: str, settings_dict: Mapping[str, Any]) -> str:
        calls.append((alias, settings_dict["HOST"]))
        return SECRET

    params = with_password("main", entry(provider), {"dbname": "app", "password_provider": "x"})
    assert params == {"dbname": "app", "password": SECRET}
    assert calls == [("main", "db.test")]
    assert password_for("main", entry(f"{__name__}.fixed")) == SECRET


def test_each_call_asks_again() -> None:
    tokens = iter(["one", "two"])
    settings = entry(lambda alias, settings_dict: next(tokens))
    assert [password_for("a", settings), password_for("a", settings)] == ["one", "two"]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("no_such_module_xyz.provider", r"'no_such_module_xyz\.provider', which cannot be"),
        (f"{__name__}.SECRET", r"a str, not a callable"),
        (42, r"is '?builtins\.int'?, a int, not a callable"),
    ],
)
def test_unusable_provider_is_a_configuration_error(
    value: object, needle: str, settings: Any
) -> None:
    settings.SECURE_PG_BACKEND_PASSWORD_PROVIDERS = [
        "no_such_module_xyz.provider",
        f"{__name__}.SECRET",
    ]
    with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['main'\] \(host 'db.test'\)") as e:
        password_for("main", entry(value))
    assert re.search(needle, str(e.value)), str(e.value)
    assert "OPTIONS['password_provider']" in str(e.value)
    assert "Fix:" in str(e.value)


def test_password_and_provider_together_are_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"both PASSWORD and OPTIONS") as e:
        password_for("main", entry(fixed, PASSWORD="static-Pw-1"))
    assert "static-Pw-1" not in str(e.value)


def test_raising_provider_names_alias_and_provider(settings: Any) -> None:
    settings.SECURE_PG_BACKEND_PASSWORD_PROVIDERS = (f"{__name__}.failing",)
    with pytest.raises(CredentialProviderError) as e:
        password_for("replica", entry(f"{__name__}.failing"))
    message = str(e.value)
    assert "DATABASES['replica'] (host 'db.test')" in message
    assert f"'{__name__}.failing'" in message
    assert "RuntimeError: token service unreachable" in message
    assert e.value.alias == "replica"
    assert isinstance(e.value.copy(), CredentialProviderError)  # the pool re-raises copies


def test_callable_provider_is_named_by_module_and_qualname() -> None:
    with pytest.raises(CredentialProviderError, match=rf"'{__name__}\.failing' raised"):
        password_for("main", entry(failing))
    partial = functools.partial(credentials.aws_rds_iam, region="eu-west-1")
    assert policy.provider_name(partial) == (
        "functools.partial(secure_pg_backend.credentials.aws_rds_iam, ...)"
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("", "an empty string instead"),
        (b"tok", "a bytes instead"),
        ("tok\x00host=evil sslmode=disable", r"the control character '\\x00'"),
        ("tok\nsslmode=disable", r"the control character '\\n'"),
        ("tok\x7f", r"the control character '\\x7f'"),
    ],
)
def test_wrong_return_value_is_refused_without_showing_it(value: object, shown: str) -> None:
    with pytest.raises(CredentialProviderError, match=f"returned .*{shown}") as e:
        with_password("main", entry(lambda alias, settings_dict: value), {"dbname": "app"})
    message = str(e.value)
    assert "tok" not in message.replace("token", "")
    assert "DATABASES['main'] (host 'db.test')" in message
    assert "OPTIONS['password_provider']" in message and "Fix:" in message
    assert isinstance(e.value, OperationalError)  # found at connection time


def test_provider_password_goes_last_even_when_libpq_resolved_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PGPASSWORD in the environment: the gate makes libpq's resolved password explicit,
    # early among the parameters. The provider's value must not take its place there.
    params = {"host": "db.test", "password": "from-env", "sslmode": "verify-full"}
    out = with_password("main", entry(fixed), params)
    assert list(out) == ["host", "sslmode", "password"]
    assert out["password"] == SECRET


def test_dotted_path_not_allowed_by_settings_is_refused_before_any_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "spb_side_effect_provider.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def provide(alias, settings_dict):\n    return 'tok'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    settings_dict = entry("spb_side_effect_provider.provide")
    violation = policy.provider_violation("url", settings_dict)
    assert violation is not None and violation.code == "E015"
    assert "SECURE_PG_BACKEND_PASSWORD_PROVIDERS" in violation.fix
    with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['url'\].*not allowed"):
        password_for("url", settings_dict)
    assert not marker.exists() and "spb_side_effect_provider" not in sys.modules


def test_builtin_provider_is_named_without_an_import() -> None:
    loaded = policy.load_provider("main", entry("secure_pg_backend.credentials.aws_rds_iam"))
    assert loaded is not None and loaded[0] is credentials.aws_rds_iam


# -- the built-in AWS RDS IAM provider, offline ----------------------------------------


@pytest.fixture
def offline_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake static credentials from the environment; no config files, no metadata service."""
    pytest.importorskip("botocore")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/spb-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/spb-aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    credentials._client.cache_clear()
    yield
    credentials._client.cache_clear()


def sigv4_signature(token: str, secret_key: str) -> str:
    """Recompute the SigV4 query signature (AWS's published algorithm) of a token."""
    host_port, query = token.split("/?", 1)
    params = dict(parse_qsl(query))
    params.pop("X-Amz-Signature")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )
    empty_payload = hashlib.sha256(b"").hexdigest()
    request = "\n".join(
        ["GET", "/", canonical_query, f"host:{host_port}", "", "host", empty_payload]
    )
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{secret_key}".encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


@pytest.mark.usefixtures("offline_aws")
def test_aws_token_shape_and_signature(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # botocore's debug log must not carry the token either
    settings = {"HOST": RDS_HOST, "PORT": "6432", "USER": "iam_app", "OPTIONS": {}}
    token = credentials.aws_rds_iam("default", settings)
    host_port, query = token.split("/?", 1)
    assert host_port == f"{RDS_HOST}:6432"
    params = dict(parse_qsl(query))
    assert params["Action"] == "connect"
    assert params["DBUser"] == "iam_app"
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    assert params["X-Amz-Credential"] == f"{FAKE_KEY_ID}/{today}/eu-west-1/rds-db/aws4_request"
    assert params["X-Amz-Expires"] == "900"
    assert params["X-Amz-SignedHeaders"] == "host"
    assert params["X-Amz-Signature"] == sigv4_signature(token, FAKE_SECRET_KEY)
    assert FAKE_SECRET_KEY not in token
    assert token not in caplog.text and params["X-Amz-Signature"] not in caplog.text


@pytest.mark.usefixtures("offline_aws")
def test_aws_region_from_partial_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"HOST": "db.internal.example", "USER": "app", "OPTIONS": {}}
    with pytest.raises(ValueError, match="no AWS region"):
        credentials.aws_rds_iam("default", settings)
    token = functools.partial(credentials.aws_rds_iam, region="ap-southeast-2")("x", settings)
    assert "/ap-southeast-2/rds-db/" in dict(parse_qsl(token.split("/?")[1]))["X-Amz-Credential"]
    assert token.startswith("db.internal.example:5432/?")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    credentials._client.cache_clear()
    assert "%2Fca-central-1%2F" in credentials.aws_rds_iam("default", settings)


@pytest.mark.usefixtures("offline_aws")
def test_aws_token_signed_for_iam_host_behind_a_cname() -> None:
    # HOST is the name on the certificate (a CNAME); the token is signed for the RDS name.
    settings = {"HOST": "orders-db.example.com", "PORT": "5432", "USER": "iam_app"}
    sign = functools.partial(credentials.aws_rds_iam, iam_host=RDS_HOST)
    token = sign("default", {**settings, "OPTIONS": {}})
    assert token.startswith(f"{RDS_HOST}:5432/?")  # and its region: eu-west-1, from that name
    assert "/eu-west-1/rds-db/" in dict(parse_qsl(token.split("/?")[1]))["X-Amz-Credential"]
    with pytest.raises(ValueError, match="iam_host is 'a,b'; an RDS IAM token is signed for one"):
        functools.partial(credentials.aws_rds_iam, iam_host="a,b")("default", settings)


@pytest.mark.usefixtures("offline_aws")
@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"HOST": "a.rds.amazonaws.com,b", "USER": "app"}, "signed for one host name"),
        ({"HOST": "/var/run/postgresql", "USER": "app"}, "signed for one host name"),
        ({"HOST": RDS_HOST, "USER": ""}, "USER is empty"),
    ],
)
def test_aws_provider_errors_name_the_alias_and_provider(
    settings: dict[str, Any], needle: str
) -> None:
    entry_ = {
        **settings,
        "OPTIONS": {"password_provider": "secure_pg_backend.credentials.aws_rds_iam"},
    }
    with pytest.raises(CredentialProviderError) as e:
        password_for("reporting", entry_)
    assert needle in str(e.value)
    assert "DATABASES['reporting']" in str(e.value)
    assert "'secure_pg_backend.credentials.aws_rds_iam'" in str(e.value)

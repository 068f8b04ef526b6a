"""The health check and the metrics over HTTP: django-health-check's real view and
django-prometheus' real ``/metrics``, served by pytest-django's live_server."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from django.db import connections
from health_check.exceptions import ServiceUnavailable
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from secure_pg_backend import metrics, signals
from secure_pg_backend.base import DatabaseWrapper
from secure_pg_backend.contrib.health_check import VerifiedTLS
from secure_pg_backend.errors import InsecureConnectionError
from secure_pg_backend.handshake import LinkFacts
from secure_pg_backend.testing import TLSPostgres
from tests.conftest import assert_no_secret, leaf_certificate

pytestmark = pytest.mark.urls("tests.ops_urls")


@pytest.fixture
def server_url(settings: Any, request: pytest.FixtureRequest) -> str:
    """pytest-django's live_server (a threaded WSGI server in this process)."""
    # Its static-files handler needs STATIC_URL when the session-wide server starts.
    settings.STATIC_URL = "/static/"
    return str(request.getfixturevalue("live_server").url)


@pytest.fixture
def ops_aliases(
    aliases: Any, good_server: TLSPostgres, expiring_server: TLSPostgres, mitm_server: TLSPostgres
) -> None:
    aliases(
        ops_good=good_server.database_settings(host="localhost"),
        ops_expiring=expiring_server.database_settings(host="localhost"),
        ops_refused=mitm_server.database_settings(host="localhost"),
    )


# -- health check ----------------------------------------------------------------
def fetch(url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.usefixtures("ops_aliases")
def test_health_view_reports_good_expiring_and_refused(server_url: str) -> None:
    status, body = fetch(f"{server_url}/health/ops_good/")
    assert (status, body) == (200, {"VerifiedTLS(alias='ops_good', warn_days=30)": "OK"})

    status, body = fetch(f"{server_url}/health/ops_expiring/")
    (result,) = body.values()
    # django-health-check 4.8 answers 500 for warnings too; the text says which it is.
    assert status == 500
    assert result.startswith("Warning: the server certificate of DATABASES['ops_expiring'] ")
    assert "expires " in result and ", in 10 days (warn_days=30); renew it." in result

    status, body = fetch(f"{server_url}/health/relaxed/")
    assert (status, list(body.values())) == (200, ["OK"])

    status, body = fetch(f"{server_url}/health/ops_refused/")
    (result,) = body.values()
    assert status == 500
    assert result.startswith(
        "Unavailable: secure_pg_backend refused the connection for "
        "DATABASES['ops_refused'] (host 'localhost'): the server's certificate is issued by "
    )
    # What the server presented, on the same line (the health check shows one line).
    assert "which is not in your root certificate file" in result
    assert " The server presented: subject " in result
    assert_no_secret(json.dumps(body))


def test_unknown_alias_and_settings_refusal_are_unavailable(
    aliases: Any, good_server: TLSPostgres
) -> None:
    with pytest.raises(ServiceUnavailable, match="DATABASES has no alias 'nope'"):
        VerifiedTLS(alias="nope").run()
    aliases(ops_weak=good_server.database_settings(options={"sslmode": "require"}))
    with pytest.raises(ServiceUnavailable) as e:
        VerifiedTLS(alias="ops_weak").run()
    assert "refused the database settings: DATABASES['ops_weak']" in str(e.value)
    assert "OPTIONS['sslmode'] is 'require'" in str(e.value)
    assert_no_secret(str(e.value))


# -- metrics -------------------------------------------------------------------
def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert_no_secret(text)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("secure_pg_backend_")
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def count(samples: dict[Any, float], alias: str, outcome: str) -> float:
    return samples.get(key("secure_pg_backend_connections_total", alias=alias, outcome=outcome), 0)


@pytest.mark.usefixtures("ops_aliases")
def test_metrics_on_django_prometheus_endpoint(server_url: str, good_server: TLSPostgres) -> None:
    before = scrape(server_url)
    for _ in range(2):
        connections["ops_good"].ensure_connection()
        info = connections["ops_good"].tls_info
        connections["ops_good"].close()
    with pytest.raises(InsecureConnectionError):
        connections["ops_refused"].ensure_connection()
    after = scrape(server_url)

    assert count(after, "ops_good", "verified") - count(before, "ops_good", "verified") == 2
    assert count(after, "ops_refused", "refused") - count(before, "ops_refused", "refused") == 1
    assert count(after, "ops_good", "refused") == count(before, "ops_good", "refused")
    tls = key(
        "secure_pg_backend_tls_info", alias="ops_good", protocol="TLSv1.3", cipher=str(info.cipher)
    )
    assert after[tls] == 1
    expiry = key(
        "secure_pg_backend_server_certificate_expiry_timestamp_seconds",
        alias="ops_good",
        host="localhost",
    )
    not_after = leaf_certificate(good_server).not_valid_after_utc.timestamp()
    assert after[expiry] == not_after


def test_a_new_cipher_replaces_the_old_tls_info_series() -> None:
    built: list[str] = []  # the metrics are fed from the check's facts, never the report
    for protocol, cipher in (("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384"), ("TLSv1.3", "TLS_X")):
        facts = LinkFacts(host="db.test", ssl_in_use=True, protocol=protocol, cipher=cipher)
        signals.connection_verified.send(
            DatabaseWrapper,
            alias="ops_unit",
            tls_info=lambda: built.append("TLSInfo"),
            facts=facts,
            not_after=lambda: None,
        )
    assert built == []

    series = [
        sample.labels
        for family in REGISTRY.collect()
        if family.name == "secure_pg_backend_tls_info"
        for sample in family.samples
        if sample.labels["alias"] == "ops_unit"
    ]
    assert series == [{"alias": "ops_unit", "protocol": "TLSv1.3", "cipher": "TLS_X"}]


def test_install_is_idempotent_and_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    # The app's ready() installed them; again adds nothing (a duplicate would raise).
    assert metrics.install(lambda: ["ops_new"]) is True
    labels = {"alias": "ops_new", "outcome": "refused"}
    assert REGISTRY.get_sample_value("secure_pg_backend_connections_total", labels) == 0
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # not installed
    assert metrics.install() is False

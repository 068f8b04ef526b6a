"""django-prometheus over this backend, in a user-side ENGINE module (tests/prometheus_engine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from prometheus_client import REGISTRY

from secure_pg_backend import InsecureConnectionError
from secure_pg_backend.testing import TLSPostgres

Wrapper = Callable[..., Any]
ENGINE = "tests.prometheus_engine"


def _metric(name: str, alias: str) -> float:
    return REGISTRY.get_sample_value(name, {"alias": alias, "vendor": "postgresql"}) or 0.0


def test_metrics_count_queries_on_a_verified_link(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(good_server.database_settings(engine=ENGINE), alias="metered")
    connects = _metric("django_db_new_connections_total", "metered")
    params = wrapper.get_connection_params()
    assert params["sslmode"] == "verify-full"  # the policy applied after django-prometheus'
    wrapper.ensure_connection()  # Django's session setup may itself run (counted) statements
    executes = _metric("django_db_execute_total", "metered")
    with wrapper.cursor() as cursor:
        for _ in range(3):
            cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert cursor.fetchone() == (True,)
    assert _metric("django_db_new_connections_total", "metered") == connects + 1
    assert _metric("django_db_execute_total", "metered") == executes + 3
    info = wrapper.tls_info
    assert info.sslmode == "verify-full"
    assert info.protocol in ("TLSv1.2", "TLSv1.3")
    assert info.peer_certificate is not None


def test_an_impostor_is_refused_and_counted_as_a_connection_error(
    make_wrapper: Wrapper, mitm_server: TLSPostgres, good_server: TLSPostgres
) -> None:
    # The impostor's certificate comes from another CA; the settings trust good_server's CA.
    settings = mitm_server.database_settings(engine=ENGINE)
    settings["OPTIONS"]["sslrootcert"] = good_server.root_cert
    wrapper = make_wrapper(settings, alias="metered-mitm")
    errors = _metric("django_db_new_connection_errors_total", "metered-mitm")
    with pytest.raises(InsecureConnectionError, match="metered-mitm"):
        wrapper.ensure_connection()
    assert _metric("django_db_new_connection_errors_total", "metered-mitm") == errors + 1


def test_weak_sslmode_is_refused_before_connecting(
    make_wrapper: Wrapper, good_server: TLSPostgres
) -> None:
    settings = good_server.database_settings(engine=ENGINE, options={"sslmode": "prefer"})
    wrapper = make_wrapper(settings, alias="metered-weak")
    connects = _metric("django_db_new_connections_total", "metered-weak")
    with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['metered-weak'\].*'prefer'"):
        wrapper.ensure_connection()
    assert _metric("django_db_new_connections_total", "metered-weak") == connects

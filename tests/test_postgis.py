"""secure_pg_backend.postgis: GeoDjango on a real PostGIS server, with the same guarantees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from secure_pg_backend import signals
from secure_pg_backend.testing import APP_DB, TestCA, TLSPostgres
from tests.conftest import assert_no_secret

Wrapper = Callable[..., Any]
ENGINE = "secure_pg_backend.postgis"
ROOT = Path(__file__).resolve().parent.parent


def _postgis_pg_bin() -> Path:
    """Server binaries of a PostgreSQL that has the PostGIS extension (scripts/system-deps)."""
    for version in range(18, 12, -1):
        control = Path(f"/usr/share/postgresql/{version}/extension/postgis.control")
        if control.exists():
            return Path(f"/usr/lib/postgresql/{version}/bin")
    pytest.fail("PostGIS is not installed: run scripts/system-deps test")


@pytest.fixture(scope="module")
def postgis_server(ca: TestCA) -> Iterator[TLSPostgres]:
    server = TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca, pg_bin=_postgis_pg_bin())
    server.start()
    try:
        server.admin_sql("CREATE EXTENSION postgis", dbname=APP_DB)
        yield server
    finally:
        server.stop()


@pytest.mark.needs_server  # postgis_server
def test_migration_and_spatial_queries_run_over_verified_tls(postgis_server: TLSPostgres) -> None:
    entry = postgis_server.database_settings(engine=ENGINE)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.geoapp.settings",
        "SPB_GEO_DATABASE": json.dumps(entry),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.geoapp.scenario"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout, result.stderr)
    out = json.loads(result.stdout)
    assert out["within"] == ["Berlin", "Paris"]  # Lisbon is outside the box
    assert 870 <= out["paris_berlin_km"] <= 890  # geodesic distance on the spheroid
    assert out["berlin_location"] == [13.4, 52.52]  # geometry read back through the adapters
    assert out["postgis"].startswith("3.")
    assert out["wrapper"] == "secure_pg_backend.postgis.base"
    assert out["display_name"] == "PostgreSQL"  # Django's, which its messages are built from
    assert out["server_ssl"] is True
    tls = out["tls"]
    assert tls["sslmode"] == "verify-full"
    assert tls["protocol"] in ("TLSv1.2", "TLSv1.3")
    assert tls["peer_certificate"]["subject_alt_names"] == ["DNS:localhost", "IP:127.0.0.1"]


@pytest.mark.needs_server  # postgis_server
def test_geometry_lookup_waits_for_the_post_handshake_check(
    make_wrapper: Wrapper, postgis_server: TLSPostgres
) -> None:
    from django.contrib.gis.geos import Point

    wrapper = make_wrapper(postgis_server.database_settings(engine=ENGINE), alias="geo-order")
    seen_at_check: list[bool] = []

    def on_verified(sender: Any, alias: str, **kwargs: Any) -> None:
        # PostGIS fills this registry with a query; it must still be empty when the link is checked.
        if alias == "geo-order":
            seen_at_check.append("geo-order" in wrapper._type_infos["geometry"])

    signals.connection_verified.connect(on_verified)
    try:
        wrapper.ensure_connection()
    finally:
        signals.connection_verified.disconnect(on_verified)
    assert seen_at_check == [False]
    assert "geo-order" in wrapper._type_infos["geometry"]  # and was filled right after
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT ST_AsText(%s)", [wrapper.ops.Adapter(Point(1, 2, srid=4326))])
        assert cursor.fetchone() == ("POINT(1 2)",)
    assert wrapper.tls_info.sslmode == "verify-full"
    assert wrapper.tls_info.peer_certificate is not None


@pytest.mark.needs_server  # postgis_server
@pytest.mark.parametrize("sslmode", ["require", "prefer", "disable"])
def test_weak_sslmode_is_refused_before_connecting(
    make_wrapper: Wrapper, postgis_server: TLSPostgres, sslmode: str
) -> None:
    settings = postgis_server.database_settings(engine=ENGINE, options={"sslmode": sslmode})
    wrapper = make_wrapper(settings, alias="geo-weak")
    with pytest.raises(ImproperlyConfigured, match=rf"DATABASES\['geo-weak'\].*'{sslmode}'"):
        wrapper.ensure_connection()
    assert wrapper.connection is None


def test_the_engine_mirrors_djangos_postgis_package() -> None:
    import importlib

    for name in ("adapter", "const", "features", "introspection", "models", "operations"):
        ours = importlib.import_module(f"{ENGINE}.{name}")
        django_module = importlib.import_module(f"django.contrib.gis.db.backends.postgis.{name}")
        for public in ours.__all__:
            assert getattr(ours, public) is getattr(django_module, public)
    for name in ("pgraster", "schema"):
        importlib.import_module(f"{ENGINE}.{name}")

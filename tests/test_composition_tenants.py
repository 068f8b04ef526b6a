"""django-tenants with ORIGINAL_BACKEND = "secure_pg_backend", in a subprocess with its settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secure_pg_backend.testing import APP_USER, TLSPostgres
from tests.conftest import assert_no_secret

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tenants_database(good_server: TLSPostgres) -> Iterator[dict[str, Any]]:
    """A database of its own on good_server: tenant schemas stay out of everyone else's way."""
    name = f"tenants_{uuid.uuid4().hex[:8]}"
    good_server.admin_sql(f"CREATE DATABASE {name} OWNER {APP_USER}")
    try:
        yield good_server.database_settings(NAME=name)
    finally:
        good_server.admin_sql(f"DROP DATABASE {name} WITH (FORCE)")


def _run_scenario(entry: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.tenants.settings",
        "SPB_TENANTS_DATABASE": json.dumps(entry),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.tenants.scenario"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert_no_secret(result.stdout, result.stderr)
    return result


def test_tenant_schemas_are_created_and_queried_over_verified_tls(
    tenants_database: dict[str, Any],
) -> None:
    result = _run_scenario(tenants_database)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])  # after django-tenants' migration log
    assert out["acme"] == {"notes": ["only in acme"], "schema": "acme", "server_ssl": True}
    assert out["globex"] == {"notes": 0, "schema": "globex", "server_ssl": True}
    # django-tenants' wrapper sits on this backend's, which carries the whole policy.
    mro = out["wrapper_mro"]
    assert mro.index("django_tenants.postgresql_backend.base") < mro.index("secure_pg_backend.base")
    tls = out["tls"]
    assert tls["sslmode"] == "verify-full"
    assert tls["protocol"] in ("TLSv1.2", "TLSv1.3")
    assert tls["peer_certificate"]["subject_alt_names"][0] == "DNS:localhost"


def test_a_weak_sslmode_is_refused_under_django_tenants(
    tenants_database: dict[str, Any],
) -> None:
    tenants_database["OPTIONS"]["sslmode"] = "require"
    result = _run_scenario(tenants_database)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("secure_pg_backend.errors.SecurePolicyError: ")
    assert "DATABASES['default']" in last_line
    assert "'require'" in last_line

"""The pytest plugin in a user's own project (pytester runs a tiny project in a subprocess).

The project's settings point ``default`` at a host that does not exist; its conftest.py opts in
with ``django_db_modify_db_settings`` as docs/testing.md says, and its tests must then run their
queries on the plugin's server over verified TLS. A hook at the end of collection shows that
the plugin has started (and imported) nothing before a fixture asks for the server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SETTINGS = """
DATABASES = {"default": {"ENGINE": "secure_pg_backend", "HOST": "db.invalid", "NAME": "prod"}}
INSTALLED_APPS = ["secure_pg_backend"]
SECRET_KEY = "user-project-tests"
USE_TZ = True
"""

CONFTEST = """
import sys
import pytest

def pytest_collection_finish(session):  # the plugin is loaded; nothing has asked for a server
    loaded = "secure_pg_backend.testing.pytest_plugin" in sys.modules
    started = [name for name in ("secure_pg_backend.testing.devserver",
                                 "secure_pg_backend.testing.servers")
               if name in sys.modules]
    print(f"plugin loaded: {loaded}; server modules after collection: {started}")

@pytest.fixture(scope="session")
def django_db_modify_db_settings(secure_pg_django_db):
    pass
"""

TEST_DB = """
import pytest
from django.db import connection

@pytest.mark.django_db
def test_query_runs_over_verified_tls(secure_pg_server):
    with connection.cursor() as cursor:
        cursor.execute("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()")
        ssl, version = cursor.fetchone()
    info = connection.tls_info
    assert (ssl, version) == (True, info.protocol)
    assert (info.sslmode, info.root_cert) == ("verify-full", secure_pg_server.ca_path)
    assert (info.host, info.port) == ("127.0.0.1", secure_pg_server.port)
    assert connection.settings_dict["NAME"] == f"test_app_{secure_pg_server.port}"
"""


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The project's files; TMPDIR is a fresh directory (reachable by the postgres user)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="spb-test-tmpdir-"))
    tmpdir.chmod(0o755)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    pytester.makeini("[pytest]\nDJANGO_SETTINGS_MODULE = user_settings\n")
    pytester.makepyfile(user_settings=SETTINGS, test_db=TEST_DB)
    pytester.makeconftest(CONFTEST)
    yield tmpdir
    shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.needs_server
def test_user_project_runs_django_queries_over_verified_tls(
    pytester: pytest.Pytester, user_project: Path
) -> None:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["plugin loaded: True; server modules after collection: []"])
    assert os.listdir(user_project) == []

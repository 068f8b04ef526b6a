"""``make test-fast`` (``--no-servers``): what it leaves out, and that nothing starts PostgreSQL.

A small test module runs under this suite's own conftest (pytester, in a subprocess): tests
that use a server through a fixture, the django_db marker or the needs_server marker are
deselected; a test that starts PostgreSQL without saying so fails, in the test process and in
a child process, instead of starting one; without ``--no-servers`` every test is collected.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CONFTEST = """
from tests.conftest import *  # noqa: F403  (the suite's hooks and fixtures)
"""

TESTS = """
import subprocess
import sys

import pytest

from secure_pg_backend.testing import TestCA, TLSPostgres

START = "TLSPostgres(TestCA().issue('localhost', '127.0.0.1')).start()"


def test_pure():
    assert sorted([2, 1]) == [1, 2]


def test_through_a_fixture(good_server):
    raise AssertionError("ran under --no-servers")


@pytest.mark.django_db
def test_through_django_db():
    raise AssertionError("ran under --no-servers")


@pytest.mark.needs_server
def test_marked():
    raise AssertionError("ran under --no-servers")


def test_starts_postgres_unmarked():
    exec(START)


def test_child_starts_postgres_unmarked():
    code = "from secure_pg_backend.testing import TestCA, TLSPostgres; " + START
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mixed=TESTS)
    return pytester


def test_no_servers_runs_only_the_server_free_tests_and_refuses_to_start_one(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--no-servers", "-rf")
    result.assert_outcomes(passed=1, failed=2, deselected=3)
    out = result.stdout.str()
    assert "FAILED test_mixed.py::test_starts_postgres_unmarked - RuntimeError" in out
    assert (
        "RuntimeError: --no-servers (make test-fast): this test starts PostgreSQL; "
        "mark it needs_server" in out
    )
    # The child found the refusing initdb through PG_BIN.
    assert "FAILED test_mixed.py::test_child_starts_postgres_unmarked" in out
    assert "spb-no-servers-" in out


def test_without_no_servers_every_test_is_collected(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    assert "6 tests collected" in result.stdout.str()
    assert "deselected" not in result.stdout.str()

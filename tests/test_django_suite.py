"""scripts/django-suite's own logic (no server): the expectations file and the verdict.

The run itself is ``make test-django`` (Django's test suite on a real TLS server); these check
what decides its exit status. Also the fact the suite found missing: Django builds user-facing
messages from ``display_name``, so both ENGINEs keep Django's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from django.db.backends.postgresql import base as stock

from secure_pg_backend import base

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "django-suite"


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("django_suite_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up while being built
    try:
        loader.exec_module(module)
    finally:
        del sys.modules[loader.name]
    return module


def test_display_name_is_djangos() -> None:
    assert base.DatabaseWrapper.display_name == stock.DatabaseWrapper.display_name == "PostgreSQL"


def test_display_name_of_the_postgis_engine_is_djangos() -> None:
    from django.contrib.gis.db.backends.postgis import base as stock_postgis

    from secure_pg_backend.postgis import base as postgis

    assert postgis.DatabaseWrapper.display_name == stock_postgis.DatabaseWrapper.display_name


def test_the_projects_expectations_file_parses(suite: Any) -> None:
    entries = suite.parse_expectations(suite.EXPECTATIONS.read_text(encoding="utf-8"))
    for entry in entries.values():
        assert "stock" in entry.reason  # each says it was seen on Django's own ENGINE


def test_entries_comments_and_blank_lines(suite: Any) -> None:
    text = "# header\n\n  a.b.C.test_x  # root may write anywhere\nd.E.test_y # libfoo 1.2\n"
    entries = suite.parse_expectations(text)
    assert list(entries) == ["a.b.C.test_x", "d.E.test_y"]
    assert entries["a.b.C.test_x"].reason == "root may write anywhere"
    assert entries["d.E.test_y"].line == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.b.C.test_x\n", "a.b.C.test_x' has no reason"),
        ("a.b.C.test_x  #   \n", "has no reason"),
        ("a.b.C.test_x extra  # why\n", "is not one dotted test id"),
        ("test_x  # why\n", "is not one dotted test id"),
        (
            "a.B.test_x  # one\na.B.test_x  # two\n",
            "x.txt:2: a.B.test_x is already listed on line 1",
        ),
    ],
)
def test_a_bad_line_is_named_with_the_fix(suite: Any, text: str, message: str) -> None:
    with pytest.raises(suite.ExpectationsError) as info:
        suite.parse_expectations(text, "x.txt")
    assert message in str(info.value)
    assert str(info.value).startswith("x.txt:")


def _result(**overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "tests_run": 10,
        "started": [f"app.tests.T.test_{n}" for n in range(10)],
        "problems": [],
        "skipped": 2,
        "expected_failures": 1,
        "unexpected_successes": [],
    }
    result.update(overrides)
    return result


def _problem(test_id: str, kind: str = "failure") -> dict[str, str]:
    return {"id": test_id, "kind": kind, "name": test_id, "detail": "Traceback ..."}


def test_a_clean_run_passes(suite: Any) -> None:
    verdict = suite.judge(_result(), {}, ["app"])
    assert verdict.ok
    assert verdict.passed == 7  # 10 run - 2 skipped - 1 of Django's own expected failures


def test_an_unlisted_failure_fails_the_run(suite: Any) -> None:
    problems = [_problem("app.tests.T.test_1"), _problem("app.tests.T.test_1", "error")]
    verdict = suite.judge(_result(problems=problems), {}, ["app"])
    assert not verdict.ok
    assert verdict.unexpected == ["app.tests.T.test_1"]
    assert len(verdict.failing["app.tests.T.test_1"]) == 2  # two subtests, one test
    assert verdict.passed == 6


def test_a_listed_failure_is_accepted(suite: Any) -> None:
    expectations = suite.parse_expectations("app.tests.T.test_1  # GEOS 3.11; stock too\n")
    verdict = suite.judge(_result(problems=[_problem("app.tests.T.test_1")]), expectations, ["app"])
    assert verdict.ok
    assert verdict.expected == ["app.tests.T.test_1"]


def test_a_listed_failure_that_now_passes_fails_the_run(suite: Any) -> None:
    expectations = suite.parse_expectations("app.tests.T.test_1  # GEOS 3.11; stock too\n")
    verdict = suite.judge(_result(), expectations, ["app"])
    assert not verdict.ok
    assert verdict.now_passing == ["app.tests.T.test_1"]


def test_listed_tests_that_did_not_run_are_only_reported(suite: Any) -> None:
    text = "app.tests.T.test_gone  # removed upstream; stock too\nother.T.test_x  # why; stock\n"
    verdict = suite.judge(_result(), suite.parse_expectations(text), ["app"])
    assert verdict.ok
    assert verdict.not_run == ["app.tests.T.test_gone"]  # other.* is not this run's label


def test_an_unexpected_success_of_djangos_own_expected_failure_fails(suite: Any) -> None:
    verdict = suite.judge(_result(unexpected_successes=["app.tests.T.test_2"]), {}, ["app"])
    assert verdict.unexpected == ["app.tests.T.test_2"]


def test_labels_match_whole_components(suite: Any) -> None:
    assert suite.belongs_to("backends.postgresql.tests.T.test_x", ["backends"])
    assert suite.belongs_to("backends", ["backends"])
    assert not suite.belongs_to("backends_extra.T.test_x", ["backends"])

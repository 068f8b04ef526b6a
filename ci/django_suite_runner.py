"""A DiscoverRunner that writes the run's outcome to SPB_DJANGO_SUITE_RESULT as JSON.

scripts/django-suite compares that file with ci/django-expected-failures.txt. A result object
sees every outcome, including those the parallel runner's workers send back, so nothing is
scraped from the console output (whose format differs between verbosities and versions).
"""

from __future__ import annotations

import json
import os
import unittest
from typing import Any

from django.test.runner import DiscoverRunner


def test_id(test: Any) -> str:
    """The id the expectations file uses: a subtest counts as its test method."""
    case = getattr(test, "test_case", None)  # unittest's _SubTest
    if case is not None:
        return str(case.id())
    describe = getattr(test, "id", None)
    return str(describe()) if callable(describe) else str(test)


class RecordingResult(unittest.TextTestResult):
    """Also remembers which tests started, so the script can tell "passed" from "not run"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[str] = []

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self.started.append(test_id(test))


class RecordingRunner(DiscoverRunner):
    def get_resultclass(self) -> Any:
        # --debug-sql and --pdb bring their own result classes; this script uses neither.
        return super().get_resultclass() or RecordingResult

    def run_suite(self, suite: Any, **kwargs: Any) -> Any:
        result = super().run_suite(suite, **kwargs)
        path = os.environ.get("SPB_DJANGO_SUITE_RESULT")
        if path:
            with open(path, "w", encoding="utf-8") as out:
                json.dump(_as_dict(result), out)
        return result


def _as_dict(result: Any) -> dict[str, Any]:
    problems = [
        {"id": test_id(test), "kind": kind, "name": str(test), "detail": detail}
        for kind, entries in (("failure", result.failures), ("error", result.errors))
        for test, detail in entries
    ]
    return {
        "tests_run": result.testsRun,
        "started": getattr(result, "started", []),
        "problems": problems,
        "skipped": len(result.skipped),
        "expected_failures": len(result.expectedFailures),
        "unexpected_successes": [test_id(test) for test in result.unexpectedSuccesses],
    }

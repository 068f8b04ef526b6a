"""The check id table is the only definition of an id, and docs/checks.md shows it as it is."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from secure_pg_backend import policy
from secure_pg_backend.checkids import CHECKS, markdown_table
from secure_pg_backend.errors import Violation

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "secure_pg_backend"
ID = re.compile(r"\b[EW]0\d\d\b")


def test_docs_checks_page_shows_the_table() -> None:
    page = (ROOT / "docs" / "checks.md").read_text()
    assert markdown_table() in page, (
        "docs/checks.md and the table in secure_pg_backend/errors.py disagree; paste "
        "secure_pg_backend.errors.markdown_table() into the page"
    )


def test_every_id_the_package_mentions_is_in_the_table() -> None:
    for source in PACKAGE.rglob("*.py"):
        for found in ID.findall(source.read_text()):
            assert found in CHECKS, f"{source.relative_to(ROOT)} mentions {found}"


def test_every_rule_named_in_the_table_exists() -> None:
    for entry in CHECKS.values():
        module, _, name = entry.rule.rpartition(".")
        owner = importlib.import_module(f"secure_pg_backend.{module}")
        assert callable(getattr(owner, name)), entry.code


def test_every_settings_rule_is_named_after_an_id_in_the_table() -> None:
    for rule in policy.RULES:
        code = rule.__name__.split("_")[0].upper()
        assert CHECKS[code].rule == f"policy.rules.{rule.__name__}"


def test_an_id_outside_the_table_cannot_be_reported() -> None:
    with pytest.raises(KeyError):
        Violation("E099", "made up")


def test_a_violation_without_its_own_fix_takes_the_tables() -> None:
    assert Violation("E013", "x").fix == CHECKS["E013"].fix
    assert Violation("E013", "x", "specific").fix == "specific"


def test_ids_kinds_and_order() -> None:
    codes = list(CHECKS)
    assert codes == sorted(codes, key=lambda code: (code[0] == "W", code))
    assert {code for code, entry in CHECKS.items() if entry.online} == {
        "E010",
        "E014",
        "W001",
        "W002",
    }
    assert CHECKS["W001"].kind == "Warning (online)"
    assert CHECKS["E001"].id == "secure_pg_backend.E001"

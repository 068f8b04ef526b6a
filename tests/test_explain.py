"""``python -m secure_pg_backend explain`` and ``manage.py dbtls --explain``: every check id and
refusal cause explained by the installed package, from the table the messages come from; and
no message points at a repository path the wheel does not ship."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from secure_pg_backend.__main__ import main
from secure_pg_backend.causes import BY_NAME
from secure_pg_backend.checkids import CHECKS
from secure_pg_backend.refusals import explanation, explanation_index

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "secure_pg_backend"
REFUSALS = list(BY_NAME.values())  # libpq's refusals, then the live link's


def _run(*args: str, settings: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(ROOT)
    if settings:
        env["DJANGO_SETTINGS_MODULE"] = settings
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The module's entry point in this process (one subprocess below shows `-m` runs it)."""
    code = main(["explain", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_python_m_secure_pg_backend_runs_the_entry_point() -> None:
    proc = _run("-m", "secure_pg_backend", "explain", "E010")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == explanation("E010")
    unknown = _run("-m", "secure_pg_backend", "explain", "E099")
    assert (unknown.returncode, unknown.stdout) == (2, "")
    assert "'E099' is neither a check id nor a refusal cause" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_explain_prints_meaning_and_fix_from_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _explain(capsys, "E010")
    assert code == 0, err
    assert out.startswith("secure_pg_backend.E010: Error (online)\n")
    assert "What it means: the link was refused under the policy" in out
    assert f"Fix: {CHECKS['E010'].fix}\n" in out
    # E010's fix is "the one at the end of the message": each refusal cause, with its own.
    for cause in REFUSALS:
        assert f"  {cause.name}: {cause.problem} Fix: {cause.fix}\n" in out
    # Every spelling a user copies from check output or types names the same entry.
    for spelling in ("secure_pg_backend.E010", "e010", "SECURE_PG_BACKEND.e010"):
        assert _explain(capsys, spelling)[:2] == (0, out), spelling


def test_explain_a_refusal_cause_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _explain(capsys, "untrusted")
    assert code == 0, err
    untrusted = next(cause for cause in REFUSALS if cause.name == "untrusted")
    assert f"What it means: {untrusted.problem}\nFix: {untrusted.fix}\n" in out


def test_explain_without_an_id_lists_each_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _explain(capsys)
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()]
    assert names == [entry.id for entry in CHECKS.values()] + [c.name for c in REFUSALS]
    assert out == explanation_index()


def test_an_unknown_id_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _explain(capsys, "E099")
    assert (code, out) == (2, "")
    assert "'E099' is neither a check id nor a refusal cause" in err
    assert "'python -m secure_pg_backend explain' lists them all" in err
    assert "Traceback" not in err
    code, _, err = _explain(capsys, "untrsted")
    assert code == 2 and "did you mean untrusted?" in err


def test_no_django_settings_needed() -> None:
    code = (
        "import secure_pg_backend.__main__\n"
        "from django.conf import settings\n"
        "print(settings.configured)\n"
    )
    proc = _run("-c", code)
    assert (proc.returncode, proc.stdout) == (0, "False\n"), proc.stderr


def test_manage_py_dbtls_explain_prints_the_same_text() -> None:
    # Settings whose database exists nowhere: --explain connects nothing. One process runs the
    # three cases through Django's own command-line entry point.
    code = (
        "import sys\n"
        "from django.core.management import ManagementUtility\n"
        "for args in (['W003'], [], ['W999']):\n"
        "    try:\n"
        "        ManagementUtility(['django-admin', 'dbtls', '--explain', *args]).execute()\n"
        "    except SystemExit as exc:\n"
        "        print(f'exit {exc.code}')\n"
        "    print('----', flush=True)\n"
    )
    proc = _run("-c", code, settings="tests.deploy_settings")
    one, listed, unknown, _ = proc.stdout.split("----\n")
    assert one == explanation("W003")
    assert listed == explanation_index()
    assert unknown == "exit 2\n"
    assert "'W999' is neither a check id nor a refusal cause" in proc.stderr


@pytest.mark.parametrize("code", list(CHECKS))
def test_every_check_id_is_explained(code: str) -> None:
    entry = CHECKS[code]
    text = explanation(code)
    assert text.startswith(f"{entry.id}: {entry.kind}\n")
    assert f"Fix: {entry.fix}\n" in text
    assert "`" not in text  # Markdown code marks are for docs/checks.md, not a terminal
    assert "](" not in entry.meaning  # no link to a page the installed package lacks


def _strings(tree: ast.AST) -> list[str]:
    """Every string literal except docstrings (which address this repository's developers)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_message_points_at_a_repository_path() -> None:
    doc_path = re.compile(r"docs/|\b[\w-]+\.md\b")
    offenders = [
        f"{source.relative_to(ROOT)}: {text!r}"
        for source in sorted(PACKAGE.rglob("*.py"))
        for text in _strings(ast.parse(source.read_text()))
        if doc_path.search(text)
    ]
    assert offenders == []


def test_every_post_handshake_refusal_has_its_own_cause_and_explanation() -> None:
    # The link rules name a cause each (issue 29): explain covers them, and a refused link is
    # no longer labelled "policy".
    import inspect

    from secure_pg_backend import handshake

    source = inspect.getsource(handshake)
    named = set(re.findall(r'_problem\(\s*"(\w+)"', source))
    assert named >= {"gssapi", "socket", "not_tls", "settings", "protocol", "cipher", "alpn"}
    for name in named:
        assert name in BY_NAME
        assert explanation(name).startswith(f"{name} (a refusal")

"""Examples of output in README.md and docs/*.md, found so tests can compare them with reality.

Each kind of output the backend (or a script) prints has a pattern; every line of a fenced
code block that matches is an example the tests check: tests/test_readme.py against a live
connection, tests/test_demo.py against the demo's own output.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

KINDS = {
    "repr": re.compile(r"^TLSInfo\("),
    "log": re.compile(r"^(INFO|WARNING) secure_pg_backend: database alias "),
    "dbtls": re.compile(r"^default: SSL connection \("),
    "datetime": re.compile(r"^datetime\.datetime\("),
    "dbtls-failed": re.compile(r"^\w+: FAILED \("),
    "dbtls-exit": re.compile(r"^CommandError: \d+ of \d+ database aliases failed: "),
    "stage": re.compile(r"^== .*: (ok in \d+ s|FAILED \(exit \d+\) after \d+ s)$"),
    # The demo's output (tests/test_demo.py): its steps, the health check, the metrics.
    "demo": re.compile(r"^(==> |\$ python example_project/manage\.py )"),
    "health": re.compile(r"^\{\"VerifiedTLS\("),
    "metric": re.compile(r"^secure_pg_backend_\w+\{[^}]*\} \S+$"),
}

# Values that belong to the deployment, not to the backend: the example's and the test
# server's differ, and both are replaced by a placeholder before comparing.
TLSINFO_DEPLOYMENT_FIELDS = {"host", "hostaddr", "port", "root_cert"}
_DEPLOYMENT_PARTS = (
    (re.compile(r"(connected to|host) \S+:\d+ \(\S+\)"), r"\1 HOST:PORT (ADDRESS)"),
    (re.compile(r"root certificate \S+ \("), "root certificate PATH ("),
    (re.compile(r"server certificate .+?, expires"), "server certificate SUBJECT, expires"),
    (re.compile(r"expires \d{4}-\d\d-\d\d, in \d+ days"), "expires DATE, in N days"),
    (re.compile(r"http://127\.0\.0\.1:\d+"), "http://127.0.0.1:PORT"),
    (re.compile(r"\(host '[^']*'\)"), "(host 'HOST')"),
    (re.compile(r"for host '[^']*'"), "for host 'HOST'"),
    (re.compile(r"^(secure_pg_backend_\w+\{[^}]*\}) \S+$"), r"\1 VALUE"),
)


def code_lines(path: Path) -> Iterator[str]:
    """Every line inside a fenced code block of a Markdown file."""
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            yield line.strip()


def documented(kind: str) -> list[tuple[str, str]]:
    """(file, line) for every documented example of this kind of output."""
    pattern = KINDS[kind]
    return [
        (path.relative_to(REPO).as_posix(), line)
        for path in DOCUMENTS
        for line in code_lines(path)
        if pattern.search(line)
    ]


def tlsinfo_fields(text: str) -> list[tuple[str, Any]]:
    """The keyword arguments of a ``TLSInfo(...)`` repr, in order, as Python values."""
    call = ast.parse(text, mode="eval").body
    assert isinstance(call, ast.Call), text
    return [(str(kw.arg), ast.literal_eval(kw.value)) for kw in call.keywords]


def deployment_neutral(line: str) -> str:
    for pattern, placeholder in _DEPLOYMENT_PARTS:
        line = pattern.sub(placeholder, line)
    return line


def shown_in(example: str, real: str) -> bool:
    """Whether an example with elisions ("…") shows ``real``: its parts, in order."""
    position = 0
    for part in deployment_neutral(example).split("…"):
        found = deployment_neutral(real).find(part.strip(), position)
        if found < 0:
            return False
        position = found + len(part.strip())
    return True

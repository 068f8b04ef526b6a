"""README.md's promise about the start-up line, checked against the real thing.

The README's ``LOGGING`` snippet is taken from README.md itself and handed to Django in a
fresh process, as a user's settings would be; the line that process prints must be the
README's example line with the example's values (host, port, address, root certificate,
expiry) replaced by this connection's.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from secure_pg_backend.testing import TLSPostgres

from .conftest import assert_no_secret

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

# What the README's example line says, as the parts the test replaces with real values.
EXAMPLE_ENDPOINT = "db.example.com:5432 (10.0.3.7)"
EXAMPLE_ROOT = "root certificate /etc/ssl/certs/my-provider-ca.pem ("
EXAMPLE_EXPIRY = "expires 2027-03-01, in 94 days"

# A fresh process: Django configured with the README's LOGGING, one verified connection.
CHILD = """
import json, sys
import django
from django.conf import settings

given = json.load(sys.stdin)
settings.configure(DATABASES={"default": given["database"]}, LOGGING=given["logging"], USE_TZ=True)
django.setup()
from django.db import connection

connection.ensure_connection()
info = connection.tls_info
cert = info.peer_certificate
print(json.dumps({
    "endpoint": info.endpoint,
    "root_cert": info.root_cert,
    "expiry": f"expires {cert.not_after:%Y-%m-%d}, in {cert.days_left()} days",
}))
"""


def readme_logging() -> dict[str, Any]:
    """The value assigned to ``LOGGING`` in the README's Python blocks (exactly one)."""
    found = []
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        for node in ast.parse(block).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "LOGGING" for t in node.targets
            ):
                found.append(ast.literal_eval(node.value))
    assert len(found) == 1, f"README.md should assign LOGGING once, found {len(found)}"
    value: dict[str, Any] = found[0]
    return value


def readme_log_line() -> str:
    (line,) = [x for x in README.splitlines() if x.startswith("INFO secure_pg_backend: ")]
    return line


def test_readme_shows_its_example_values() -> None:
    line = readme_log_line()
    for part in (EXAMPLE_ENDPOINT, EXAMPLE_ROOT, EXAMPLE_EXPIRY):
        assert part in line


def test_readme_logging_prints_the_readme_line(good_server: TLSPostgres) -> None:
    given = {
        "database": good_server.database_settings(host="localhost"),
        "logging": readme_logging(),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(given),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert_no_secret(done.stdout, done.stderr)
    real = json.loads(done.stdout)
    expected = (
        readme_log_line()
        .replace(EXAMPLE_ENDPOINT, real["endpoint"])
        .replace(EXAMPLE_ROOT, f"root certificate {real['root_cert']} (")
        .replace(EXAMPLE_EXPIRY, real["expiry"])
    )
    assert done.stderr.splitlines() == [expected]

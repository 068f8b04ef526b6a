"""README.md's and the docs' examples of output, checked against the real thing.

The README's ``LOGGING`` snippet is taken from README.md itself and handed to Django in a
fresh process, as a user's settings would be; the line that process prints must be the
README's example line with the example's values (host, port, address, root certificate,
expiry) replaced by this connection's.

Every other example of what the backend prints, in README.md and docs/*.md code blocks (the
``TLSInfo(...)`` repr, the start-up log line, ``dbtls``'s line, a certificate date, the stage
lines of ``make test``), is compared with what a live connection (or the script) produces:
the same fields in the same order, the same fixed values, only the deployment's own values
(host, port, paths, dates, certificate subject) normalised.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from secure_pg_backend.testing import TLSPostgres
from tests.conftest import assert_no_secret
from tests.support.docs_examples import (
    KINDS,
    TLSINFO_DEPLOYMENT_FIELDS,
    deployment_neutral,
    documented,
    shown_in,
    tlsinfo_fields,
)

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


# -- every documented example of output (tests/support/docs_examples.py finds them) ---------
@pytest.fixture
def live(
    good_server: TLSPostgres, make_wrapper: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> dict[str, str]:
    """What one verified connection of alias 'default' shows: repr, log line, dbtls line."""
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    wrapper = make_wrapper(good_server.database_settings(host="localhost"), "default")
    info = wrapper.tls_info
    (record,) = [r for r in caplog.records if r.name == "secure_pg_backend"]
    assert info.peer_certificate is not None
    return {
        "repr": repr(info),
        # As the README's LOGGING formats it: "%(levelname)s %(message)s".
        "log": f"{record.levelname} {record.getMessage()}",
        "dbtls": info.status_line(),
        "datetime": repr(info.peer_certificate.not_after),
    }


def test_the_docs_show_each_kind_of_output() -> None:
    # The comparisons must have something to compare: the README shows the repr and the log
    # line, the docs the rest (the demo's output: tests/test_demo.py).
    for kind in KINDS:
        assert documented(kind), f"no example of {kind} found in README.md or docs/"
    assert any(where == "README.md" for where, _ in documented("repr"))


def test_every_tlsinfo_repr_shown_is_the_real_one(live: dict[str, str]) -> None:
    real = tlsinfo_fields(live["repr"])
    for where, line in documented("repr"):
        shown = tlsinfo_fields(line)
        assert [name for name, _ in shown] == [name for name, _ in real], where
        fixed = [(n, v) for n, v in shown if n not in TLSINFO_DEPLOYMENT_FIELDS]
        assert fixed == [(n, v) for n, v in real if n not in TLSINFO_DEPLOYMENT_FIELDS], where


@pytest.mark.parametrize("kind", ["log", "dbtls"])
def test_every_line_shown_is_the_real_one(live: dict[str, str], kind: str) -> None:
    real = deployment_neutral(live[kind])
    for where, line in documented(kind):
        # A WARNING line is the same line for a certificate expiring within 30 days.
        shown = re.sub(r"^WARNING ", "INFO ", line)
        assert deployment_neutral(shown) == real, f"{where} shows:\n{line}\nreal:\n{live[kind]}"


def _date_form(text: str) -> str:
    # datetime's repr drops zero seconds (and microseconds): 12:00:00 shows as "12, 0".
    return re.sub(r"(, N)+(?=, tzinfo)", ", N...", re.sub(r"\d+", "N", text))


def test_every_certificate_date_shown_is_the_real_form(live: dict[str, str]) -> None:
    real = _date_form(live["datetime"])
    assert real == "datetime.datetime(N, N..., tzinfo=datetime.timezone.utc)"  # aware, UTC
    for where, line in documented("datetime"):
        assert _date_form(line) == real, where


def test_make_test_stage_lines_are_what_scripts_stage_prints() -> None:
    stage = [str(REPO / "scripts" / "stage")]
    ok = subprocess.run(
        [*stage, "lint: mypy", "true"], capture_output=True, text=True, timeout=30, check=False
    )
    failed = subprocess.run(
        [*stage, "lint: mypy", "false"], capture_output=True, text=True, timeout=30, check=False
    )
    assert (ok.returncode, failed.returncode) == (0, 1)
    assert ok.stdout.splitlines() == ["== lint: mypy ...", "== lint: mypy: ok in 0 s"]
    assert failed.stdout.splitlines()[-1] == "== lint: mypy: FAILED (exit 1) after 0 s"
    for where, line in documented("stage"):
        assert re.sub(r"\d+ s", "0 s", re.sub(r"^== .*: ", "== lint: mypy: ", line)) in (
            ok.stdout.splitlines()[-1],
            failed.stdout.splitlines()[-1],
        ), where


def test_every_dbtls_refusal_shown_is_the_real_one(
    aliases: Callable[..., None], mitm_server: TLSPostgres
) -> None:
    # docs/commands.md: a replica behind a machine-in-the-middle, beside a good default.
    aliases(replica=mitm_server.database_settings(host="localhost"))
    err = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("dbtls", stdout=io.StringIO(), stderr=err)
    (refusal,) = [x for x in err.getvalue().splitlines() if x.startswith("replica: FAILED")]
    for where, line in documented("dbtls-failed"):
        assert shown_in(line, refusal), f"{where} shows:\n{line}\nreal:\n{refusal}"
    for where, line in documented("dbtls-exit"):
        assert line == f"CommandError: {caught.value}", where

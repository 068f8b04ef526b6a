"""This process's psycopg and libpq: clear refusals instead of errors from deep inside."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import psycopg
import pytest

from secure_pg_backend import compat, libpq, policy
from secure_pg_backend.compat import NEWER_KEYWORDS, LibpqSupportError
from secure_pg_backend.policy.terms import WEAKENING_KEYWORDS
from secure_pg_backend.testing import TLSPostgres


def test_libpq_12_is_refused_with_the_fix() -> None:
    with pytest.raises(LibpqSupportError) as info:
        compat.require_libpq(120017)
    message = str(info.value)
    assert "needs libpq 13 or newer" in message
    assert "libpq 12.17" in message
    assert f"psycopg's {psycopg.pq.__impl__} build" in message
    assert "Fix: install psycopg[binary]" in message


def test_libpq_13_and_this_process_libpq_are_accepted() -> None:
    compat.require_libpq(130000)
    compat.require_libpq()  # whatever this environment's psycopg build loaded


@pytest.mark.parametrize("keyword", sorted(NEWER_KEYWORDS))
def test_a_keyword_newer_than_the_loaded_libpq_is_named_with_the_fix(keyword: str) -> None:
    # Screened against the real libpq's PQconndefaults, so the table must agree with it.
    found = policy.screen({"OPTIONS": {keyword: "x"}}, libpq.keywords())
    if keyword in libpq.keywords() or keyword in WEAKENING_KEYWORDS:
        assert found == []  # accepted here (a weakening one is refused later, as E007)
        return
    assert psycopg.pq.version() < NEWER_KEYWORDS[keyword]
    [violation] = found
    assert violation.code == "E009"
    assert f"OPTIONS['{keyword}'] needs libpq" in violation.problem
    assert compat.describe_libpq() in violation.problem
    assert "install psycopg[binary]" in violation.fix


def test_every_newer_keyword_is_known_to_a_libpq_that_new() -> None:
    known = libpq.keywords()
    version = psycopg.pq.version()
    for keyword, since in NEWER_KEYWORDS.items():
        if version >= since and not keyword.startswith("oauth_"):  # oauth: a build option
            assert keyword in known, keyword


def test_version_text() -> None:
    # The messages name versions by psycopg's pq.version_pretty.
    assert psycopg.pq.version_pretty(150018) == "15.18"
    assert psycopg.pq.version_pretty(180000) == "18.0"
    assert psycopg.pq.version_pretty(90624) == "9.6.24"


_NO_PSYCOPG = """
import sys
sys.modules["psycopg"] = None  # as if only psycopg2 (or nothing) were installed
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS={apps!r},
    DATABASES={{"default": {{"ENGINE": "secure_pg_backend", "NAME": "app", "HOST": "db.test"}}}},
)
django.setup()
from django.db import connection
connection.ensure_connection()
"""


@pytest.mark.parametrize("apps", [[], ["secure_pg_backend"]], ids=["engine-only", "installed-app"])
def test_without_psycopg3_the_engine_says_so_in_one_clear_error(apps: list[str]) -> None:
    script = textwrap.dedent(_NO_PSYCOPG.format(apps=apps))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("secure_pg_backend.compat.LibpqSupportError: ")
    assert "secure_pg_backend needs psycopg 3" in last_line
    assert "psycopg2 may stay installed" in last_line
    assert "ModuleNotFoundError" not in result.stderr


def test_psycopg_keeps_working_after_this_backend_used_its_libpq(
    make_wrapper: Any, good_server: TLSPostgres
) -> None:
    # With the pure-Python build both share one ctypes library: ours must not retype psycopg's.
    wrapper = make_wrapper(good_server.database_settings())
    assert wrapper.tls_info.sslmode == "verify-full"  # PQconninfo, PQsslAttribute, ... (ours)
    pgconn = wrapper.connection.pgconn
    info = {opt.keyword: opt.val for opt in pgconn.info}  # psycopg's PQconninfo + Free
    assert info[b"sslmode"] == b"verify-full"
    parsed = {o.keyword: o.val for o in psycopg.pq.Conninfo.parse(b"host=db.test")}
    assert parsed[b"host"] == b"db.test"  # psycopg's PQconninfoParse + PQconninfoFree

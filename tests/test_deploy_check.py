"""W003: ``manage.py check --deploy`` names every PostgreSQL alias the policy does not cover.

Judged by the class the ENGINE loads (Django's postgresql wrapper or one derived from it,
without ``VerifiedTLSMixin``), not by the ENGINE's name. Nothing connects: these tests start
no server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from secure_pg_backend.checkids import CHECKS
from tests.conftest import assert_no_secret

from . import deploy_settings

ROOT = Path(__file__).resolve().parent.parent
W003 = CHECKS["W003"].id

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def _w003(databases: dict[str, Any], deploy: bool = True) -> dict[str, Any]:
    with override_settings(DATABASES=databases):
        messages = run_checks(include_deployment_checks=deploy)
    return {m.obj: m for m in messages if m.id == W003}


def test_each_uncovered_postgresql_alias_is_named_with_its_fix() -> None:
    found = _w003(deploy_settings.DATABASES)
    # default (this ENGINE), geo_ok (its PostGIS ENGINE), composed (the mixin) and the SQLite
    # alias are covered or not PostgreSQL.
    assert sorted(found) == ["DATABASES['geo']", "DATABASES['legacy']", "DATABASES['vendor']"]
    legacy = found["DATABASES['legacy']"]
    assert legacy.is_serious() is False  # a warning: check --deploy --fail-level decides
    assert "'django.db.backends.postgresql'" in legacy.msg
    assert "OPTIONS['sslmode'] is 'prefer'" in legacy.msg
    assert legacy.hint == "Set its ENGINE to 'secure_pg_backend'."
    geo = found["DATABASES['geo']"]
    assert "it sets no sslmode" in geo.msg
    assert geo.hint == "Set its ENGINE to 'secure_pg_backend.postgis'."
    vendor = found["DATABASES['vendor']"]
    assert "tests.thirdparty_backend.base.DatabaseWrapper" in vendor.msg
    assert "VerifiedTLSMixin" in vendor.hint
    assert "class DatabaseWrapper(VerifiedTLSMixin, tests.thirdparty_backend" in vendor.hint


def test_only_with_deploy() -> None:
    assert _w003(deploy_settings.DATABASES, deploy=False) == {}


def test_judged_by_the_class_not_the_engine_name() -> None:
    # A wrapper derived from Django's PostGIS one, loaded under a name that says nothing.
    databases = {
        "default": deploy_settings.DATABASES["default"],
        "renamed": {**deploy_settings.DATABASES["geo"], "ENGINE": "tests.thirdparty_backend"},
        "sqlite": deploy_settings.DATABASES["local"],
        "dummy": {"ENGINE": "django.db.backends.dummy"},
    }
    assert list(_w003(databases)) == ["DATABASES['renamed']"]


def test_a_password_as_sslmode_is_not_echoed() -> None:
    secret = "s3cr3t-deploy-password"
    entry = {**deploy_settings.DATABASES["legacy"], "PASSWORD": secret}
    entry["OPTIONS"] = {"sslmode": secret}
    found = _w003({"default": deploy_settings.DATABASES["default"], "legacy": entry})
    text = found["DATABASES['legacy']"].msg
    assert secret not in text and "********" in text
    assert_no_secret(text)


def _manage(*commands: list[str]) -> list[tuple[int, str]]:
    """Run each `django-admin` command line in one process (Django's own entry point): the
    exit code and what it wrote to stderr, per command."""
    code = (
        "import sys\n"
        "from django.core.management import ManagementUtility\n"
        f"for args in {commands!r}:\n"
        "    try:\n"
        "        ManagementUtility(['django-admin', *args]).execute()\n"
        "        status = 0\n"
        "    except SystemExit as exc:\n"
        "        status = exc.code\n"
        "    sys.stderr.write(f'\\n==== exit {status}\\n')\n"
        "    sys.stderr.flush()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), DJANGO_SETTINGS_MODULE="tests.deploy_settings")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # stderr: text, "==== exit N", text, "==== exit N", ... split into (N, text) pairs.
    pieces = re.split(r"\n==== exit (-?\d+)\n", proc.stderr)
    return [(int(status), text) for text, status in zip(pieces[0::2], pieces[1::2], strict=False)]


def test_manage_py_check_deploy_names_them() -> None:
    (status, text), (strict, _), (_, plain) = _manage(
        ["check", "--deploy"], ["check", "--deploy", "--fail-level", "WARNING"], ["check"]
    )
    assert status == 0, text  # warnings only
    for alias in ("legacy", "geo", "vendor"):
        assert f"DATABASES['{alias}']: ({W003}) ENGINE " in text  # the alias once
    for alias in ("default", "geo_ok", "composed", "local"):
        assert f"DATABASES['{alias}']" not in text
    assert "HINT: Set its ENGINE to 'secure_pg_backend.postgis'." in text
    # A deployment pipeline that fails on warnings stops on them.
    assert strict == 1
    assert W003 not in plain

"""docs/deployment.md's recipe, run for real where it can run here.

The page's settings snippet becomes a project's settings module; the CA bundle is laid out as
Kubernetes mounts a ConfigMap (``ca.pem -> ..data/ca.pem``, ``..data -> ..<timestamp>``) at
the manifest's ``mountPath``; the manifest's probe command runs against a real TLS server. Its
exit status is what Kubernetes acts on: 0 when verified, 1 when the mounted CA no longer
matches the server or the server is down.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from secure_pg_backend.testing import APP_DB, APP_PASSWORD, APP_USER, TestCA, TLSPostgres
from tests.conftest import assert_no_secret

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()

MANAGE_PY = """import os, sys
from django.core.management import execute_from_command_line
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
execute_from_command_line(sys.argv)
"""
# What the page says to add to the snippet (INSTALLED_APPS), and what any project has.
REST_OF_SETTINGS = """
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "secure_pg_backend"]
SECRET_KEY = "deployment-test"
USE_TZ = True
"""


def block(language: str, containing: str) -> str:
    (found,) = [
        text for text in re.findall(rf"```{language}\n(.*?)```", PAGE, re.S) if containing in text
    ]
    return found


SETTINGS = block("python", "DATABASES")
MANIFEST = block("yaml", "kind: Deployment")


def default_ca_path() -> str:
    match = re.search(r'"sslrootcert": os\.environ\.get\("DB_SSLROOTCERT", "([^"]+)"\)', SETTINGS)
    assert match, "the settings snippet should read the CA path from DB_SSLROOTCERT"
    return match.group(1)


def probe_commands() -> list[list[str]]:
    return [json.loads(c) for c in re.findall(r"command: (\[.*\])", MANIFEST)]


def test_the_manifest_mounts_the_file_the_settings_read() -> None:
    (mount,) = re.findall(r"mountPath: (\S+)", MANIFEST)
    (key,) = re.findall(r"^  (\S+): \|$", MANIFEST, re.M)  # the ConfigMap's data key
    assert default_ca_path() == f"{mount}/{key}"
    assert "subPath" not in MANIFEST  # a subPath mount would never see a rotated bundle
    # Each probe is dbtls, and its timeout leaves room for the backend's connect_timeout.
    assert probe_commands() == [["python", "manage.py", "dbtls"]] * 2
    timeout_setting = re.search(r'"connect_timeout": (\d+)', SETTINGS)
    assert timeout_setting
    connect_timeout = int(timeout_setting.group(1))
    timeouts = [int(t) for t in re.findall(r"timeoutSeconds: (\d+)", MANIFEST)]
    assert timeouts and all(t > connect_timeout for t in timeouts)
    # The image bakes in neither the CA bundle nor a password.
    dockerfile = block("dockerfile", "FROM ")
    assert not re.search(r"\.pem|PASSWORD", dockerfile.split("# No CA bundle")[0])


def mount_configmap(directory: Path, ca: TestCA, version: str) -> None:
    """The CA as Kubernetes mounts a ConfigMap key, or updates it (a new ..data target)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"..2026_11_28_{version}"
    target.mkdir()
    (target / "ca.pem").write_bytes(ca.cert_pem)
    staged = directory / "..data_tmp"
    staged.symlink_to(target.name)
    staged.replace(directory / "..data")  # atomic, as the kubelet swaps it
    if not (directory / "ca.pem").is_symlink():
        (directory / "ca.pem").symlink_to("..data/ca.pem")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "mysite").mkdir()
    (tmp_path / "mysite" / "__init__.py").write_text("")
    (tmp_path / "mysite" / "settings.py").write_text(SETTINGS + REST_OF_SETTINGS)
    (tmp_path / "manage.py").write_text(MANAGE_PY)
    return tmp_path


def probe(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (command, _) = probe_commands()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_URL"))}
    return subprocess.run(
        [sys.executable, *command[1:]],
        cwd=project,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_probe_passes_fails_on_a_rotated_wrong_ca_and_on_an_outage(
    good_server: TLSPostgres, ca: TestCA, project: Path
) -> None:
    mount = project / default_ca_path().lstrip("/")  # /etc/db-ca/ca.pem, under the project
    mount_configmap(mount.parent, ca, "06_00_00.000000001")
    env = {
        "DB_HOST": "localhost",
        "DB_PORT": str(good_server.port),
        "DB_NAME": APP_DB,
        "DB_USER": APP_USER,
        "DB_PASSWORD": APP_PASSWORD,
        "DB_SSLROOTCERT": str(mount),
    }
    ok = probe(project, env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("default: SSL connection (protocol: TLSv1.3")
    assert f"root certificate {mount} (OPTIONS['sslrootcert'])" in ok.stdout

    # The ConfigMap now holds a CA that did not sign the server's certificate: not ready.
    mount_configmap(mount.parent, TestCA(), "07_00_00.000000002")
    wrong = probe(project, env)
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("default: FAILED (TLS refused): ")
    assert "certificate verify failed" in wrong.stderr

    # Back to the right CA, but the database is unreachable: not ready, and not a TLS problem.
    mount_configmap(mount.parent, ca, "08_00_00.000000003")
    down = probe(project, {**env, "DB_PORT": "1"})
    assert down.returncode == 1
    assert down.stderr.startswith("default: FAILED (could not connect): ")
    assert probe(project, env).returncode == 0
    for done in (ok, wrong, down):
        assert_no_secret(done.stdout, done.stderr)

"""``python -m example_project.demo`` end to end, in a child process, as ``make demo`` runs it."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from secure_pg_backend.testing import free_port
from tests.conftest import assert_no_secret
from tests.support.docs_examples import deployment_neutral, documented

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}


def _db_port(stdout: str) -> int:
    match = re.search(r"PostgreSQL listening on 127\.0\.0\.1:(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.needs_server  # the demo starts PostgreSQL in a child process
def test_non_interactive_part() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "example_project.demo", "--no-serve"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out, err = done.stdout, done.stderr
    assert_no_secret(out, err)
    assert "DATABASE_URL=postgres://app:********@localhost:" in out
    assert "Applying auth.0001_initial... OK" in out
    (line,) = [x for x in out.splitlines() if x.startswith("default: ")]
    assert line.startswith("default: SSL connection (protocol: TLSv1.3, cipher: TLS_")
    port = _db_port(out)
    assert f"host localhost:{port} (127.0.0.1)" in line
    assert "(OPTIONS['sslrootcert'])" in line
    assert re.search(
        r"server certificate .*O=trustme.*, expires \d{4}-\d\d-\d\d, in \d+ days$", line
    )
    # LOGGING shows the backend's start-up line on the console (stderr).
    assert f"INFO secure_pg_backend: database alias 'default' connected to localhost:{port}" in err
    assert out.rstrip().endswith("Stopped; the throwaway database and its certificates are gone.")
    assert not _accepts(port), "the demo left PostgreSQL running"
    # The operations endpoints, fetched over HTTP from the example project's web server.
    assert """HTTP 200 {"VerifiedTLS(alias='default', warn_days=30)": "OK"}""" in out
    metric_lines = [
        r'secure_pg_backend_connections_total\{alias="default",outcome="verified"\} [1-9]',
        r'secure_pg_backend_tls_info\{alias="default",cipher="TLS_\w+",protocol="TLSv1.3"\} 1.0',
        r"secure_pg_backend_server_certificate_expiry_timestamp_seconds"
        r'\{alias="default",host="localhost"\} \d',
    ]
    for pattern in metric_lines:
        assert re.search(f"^{pattern}", out, re.MULTILINE), pattern
    web = re.search(r"Starting the web server on http://127\.0\.0\.1:(\d+)", out)
    assert web and not _accepts(int(web.group(1))), "the demo left the web server running"
    # The docs quote this output (docs/operations.md): the health check's body and every
    # metric sample, the values aside.
    for where, body in documented("health"):
        assert f"HTTP 200 {body}" in out, where
    real_samples = {deployment_neutral(x) for x in out.splitlines() if x.startswith("secure_pg")}
    for where, sample in documented("metric"):
        assert deployment_neutral(sample) in real_samples, f"{where}: {sample}"


@pytest.mark.needs_server  # the demo starts PostgreSQL in a child process
def test_serves_the_page_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    web_port = free_port()
    with (tmp_path / "stderr").open("w+") as stderr:
        demo = subprocess.Popen(
            [sys.executable, "-m", "example_project.demo", "--port", str(web_port)],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        output = demo.stdout
        assert output is not None
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            for line in output:
                lines.put(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        seen: list[str] = []
        try:
            data = None
            deadline = time.monotonic() + 120
            for _ in range(600):
                if time.monotonic() > deadline or demo.poll() is not None:
                    break
                try:
                    url = f"http://127.0.0.1:{web_port}/tls/?format=json"
                    with urllib.request.urlopen(url, timeout=10) as response:
                        data = json.loads(response.read())
                    break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.2)
            assert data is not None, "the demo never served /tls/"
            assert data["default"]["transport"] == "tls"
            assert data["default"]["host"] == "localhost"
            # SIGTERM once it says it is serving (after the health check and the metrics).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any("==> Serving" in x for x in seen):
                with contextlib.suppress(queue.Empty):
                    seen.append(lines.get(timeout=1))
            assert any(x.startswith("==> Serving http://") for x in seen), "".join(seen)
            demo.send_signal(signal.SIGTERM)
            demo.wait(timeout=120)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
        reader.join(timeout=10)
        while not lines.empty():
            seen.append(lines.get_nowait())
        out = "".join(seen)
        stderr.seek(0)
        err = stderr.read()
    assert demo.returncode == 0, err
    assert_no_secret(out, err)
    assert "Stopping PostgreSQL" in out
    # docs/demo.md's excerpt of this output: its steps and commands, ports aside.
    real_lines = {deployment_neutral(line) for line in out.splitlines()}
    for where, line in documented("demo"):
        assert deployment_neutral(line) in real_lines, f"{where}: {line}"
    assert not _accepts(_db_port(out)), "SIGTERM left PostgreSQL running"
    assert not _accepts(web_port), "SIGTERM left the web server running"


def test_a_taken_port_is_reported_before_anything_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "example_project.demo", "--port", str(port)],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr.startswith(f"Error: cannot serve on 127.0.0.1:{port}: ")
    assert "already in use" in done.stderr
    assert f"make demo PORT={port + 1}" in done.stderr
    # Nothing started: no CA, no PostgreSQL, nothing that looks like a health check.
    assert done.stdout == ""


def test_make_demo_passes_port_to_the_demo() -> None:
    done = subprocess.run(
        # -B: as from a fresh clone (the virtualenv's recipe shown even if it is built).
        ["make", "--no-print-directory", "-n", "-B", "demo", "PORT=8123"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (run,) = [line for line in done.stdout.splitlines() if "-m example_project.demo" in line]
    assert run.endswith("/bin/python -m example_project.demo --port 8123")
    # Its own virtualenv with the demo extra only, not the dev toolchain.
    assert run.startswith(".venv-demo/")
    assert "-e '.[demo]'" in done.stdout

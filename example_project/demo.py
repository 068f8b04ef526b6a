"""``make demo``: a throwaway CA and TLS PostgreSQL, ``migrate``, ``dbtls``, then ``/tls/``.

``python -m example_project.demo [--no-serve] [--port 8000]``. Each step runs the
example project's ``manage.py`` in a child process, exactly as a user would; the web
server's ``/health/`` and ``/metrics`` are fetched over HTTP and shown (with
``--no-serve`` the server runs only for that, on a free port). The database is stopped
on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path
from types import FrameType
from urllib.parse import quote

from secure_pg_backend.errors import REDACTED
from secure_pg_backend.testing import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    TestCA,
    TLSPostgres,
    free_port,
)

MANAGE = Path(__file__).resolve().parent / "manage.py"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def manage(env: dict[str, str], *args: str) -> int:
    print(f"$ python example_project/manage.py {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, str(MANAGE), *args], env=env, check=False).returncode


def get(url: str, accept: str = "*/*") -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:  # the health view answers 500 when unhealthy
        return error.code, error.read().decode()


def port_taken(port: int) -> str | None:
    """Why the web server could not listen on 127.0.0.1:``port``, or None if it can."""
    with socket.socket() as sock:
        # As runserver binds it (SO_REUSEADDR), so a port in TIME_WAIT is not reported.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def wait_for(web: subprocess.Popen[bytes], url: str) -> bool:
    """True once *our* web server answers ``url`` with 200.

    Another process on the port (a race after the start-up check) would answer too: a
    response only counts while our server is still running, and only a 200.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and web.poll() is None:
        try:
            status, _ = get(url)
        except OSError:
            time.sleep(0.2)
            continue
        return status == 200 and web.poll() is None
    return False


def show_endpoints(base: str) -> None:
    """What ops see: the health check's verdict, then the backend's metrics."""
    if not (find_spec("health_check") and find_spec("django_prometheus")):
        print("(install django-health-check and django-prometheus to see /health/ and /metrics)")
        return
    say("Health check (django-health-check) and metrics (django-prometheus)")
    print(f"$ curl -H 'Accept: application/json' {base}/health/")
    status, body = get(f"{base}/health/", "application/json")
    print(f"HTTP {status} {body}")
    print(f"$ curl -s {base}/metrics | grep ^secure_pg_backend_")
    _, text = get(f"{base}/metrics")
    print("\n".join(line for line in text.splitlines() if line.startswith("secure_pg_backend_")))
    sys.stdout.flush()


def start_web(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(MANAGE), "runserver", f"127.0.0.1:{port}", "--noreload"], env=env
    )


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--no-serve", action="store_true", help="stop after dbtls")
    parser.add_argument("--port", type=int, default=8000, help="web port (default 8000)")
    args = parser.parse_args(argv)
    if not args.no_serve and (why := port_taken(args.port)):
        # Before the CA and the server: nothing to clean up, nothing printed that looks healthy.
        print(
            f"Error: cannot serve on 127.0.0.1:{args.port}: {why}.\n"
            f"Stop what uses it, or choose another port: make demo PORT={args.port + 1} "
            f"(python -m example_project.demo --port {args.port + 1}).",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)

    say("Creating a throwaway CA and a PostgreSQL server with TLS (certificate for localhost)")
    ca_dir = tempfile.TemporaryDirectory(prefix="spb-demo-ca-")
    ca = TestCA(directory=Path(ca_dir.name))
    now = dt.datetime.now(dt.timezone.utc)
    # A 90-day certificate, like a typical ACME one, so the expiry shown is realistic.
    leaf = ca.issue("localhost", "127.0.0.1", not_before=now, not_after=now + dt.timedelta(90))
    server = TLSPostgres(leaf, trust=ca)
    web: subprocess.Popen[bytes] | None = None
    status = 0
    try:
        server.start()
        print(f"PostgreSQL listening on 127.0.0.1:{server.port}, CA file {ca.cert_path}")
        url = "postgres://{user}:{pw}@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={ca}"
        fields = {"user": APP_USER, "port": server.port, "db": APP_DB, "ca": ca.cert_path}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}
        env["DATABASE_URL"] = url.format(pw=quote(APP_PASSWORD, safe=""), **fields)
        env["DJANGO_SETTINGS_MODULE"] = "example_project.settings"
        print(f"DATABASE_URL={url.format(pw=REDACTED, **fields)}", flush=True)

        say("Creating the tables (the log line shows the TLS the backend negotiated)")
        status = manage(env, "migrate", "--no-input")
        if status == 0:
            say("What each database alias negotiated")
            status = manage(env, "dbtls")
        if status == 0:
            port = free_port() if args.no_serve else args.port
            base = f"http://127.0.0.1:{port}"
            say(f"Starting the web server on {base}")
            web = start_web(env, port)
            if not wait_for(web, f"{base}/tls/"):
                print(f"Error: the web server did not serve {base}/tls/", file=sys.stderr)
                status = 1
            else:
                show_endpoints(base)
            if status == 0 and not args.no_serve:
                say(f"Serving {base}/tls/, /health/ and /metrics (Ctrl-C to stop)")
                status = web.wait()
    except KeyboardInterrupt:
        status = 0  # Ctrl-C and SIGTERM are how the demo is meant to end
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish cleaning up undisturbed
        if web is not None and web.poll() is None:
            web.terminate()
            try:
                web.wait(timeout=10)
            except subprocess.TimeoutExpired:
                web.kill()
                web.wait()
        say("Stopping PostgreSQL")
        server.stop()
        ca_dir.cleanup()
        print("Stopped; the throwaway database and its certificates are gone.", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

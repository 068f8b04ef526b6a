"""``make demo``: a throwaway CA and TLS PostgreSQL, ``migrate``, ``dbtls``, then ``/tls/``.

``python -m example_project.demo [--no-serve] [--port 8000]``. Each step runs the
example project's ``manage.py`` in a child process, exactly as a user would. The
database is stopped on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType
from urllib.parse import quote

from secure_pg_backend.errors import REDACTED
from secure_pg_backend.testing import APP_DB, APP_PASSWORD, APP_USER, TestCA, TLSPostgres

MANAGE = Path(__file__).resolve().parent / "manage.py"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def manage(env: dict[str, str], *args: str) -> int:
    print(f"$ python example_project/manage.py {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, str(MANAGE), *args], env=env, check=False).returncode


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--no-serve", action="store_true", help="stop after dbtls")
    parser.add_argument("--port", type=int, default=8000, help="web port (default 8000)")
    args = parser.parse_args(argv)
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
        if status == 0 and not args.no_serve:
            say(f"Serving http://127.0.0.1:{args.port}/tls/ (Ctrl-C to stop)")
            web = subprocess.Popen(
                [sys.executable, str(MANAGE), "runserver", f"127.0.0.1:{args.port}", "--noreload"],
                env=env,
            )
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

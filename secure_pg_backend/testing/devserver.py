"""A throwaway TLS PostgreSQL for local development: ``python -m secure_pg_backend.testing``.

Prints ``DATABASE_URL=...`` (for dj-database-url with ``engine="secure_pg_backend"``) and the
CA file, runs until Ctrl-C or SIGTERM, then stops the server and removes its files. The pytest
plugin (``secure_pg_backend.testing.pytest_plugin``) starts the same server for a test session.

Unlike the fixed passwords of ``secure_pg_backend.testing`` (made for tests that grep for
leaks), a dev server gets fresh random passwords for the app user and the superuser: it listens
on 127.0.0.1, which every local user can reach. They are set before the server first listens
(``TLSPostgres`` bootstraps in single-user mode), so no known password is ever accepted.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote, urlencode

from .servers import APP_DB, APP_USER, TestCA, TLSPostgres, find_pg_bin

__all__ = ["DevServer", "main"]

HOST = "127.0.0.1"


def _password() -> str:
    # URL-special characters on purpose: every consumer must URL-encode (and the SQL quoting
    # below stays trivial: token_urlsafe never yields a quote).
    return f"dev/{secrets.token_urlsafe(18)}@:"


@dataclass
class DevServer:
    """A TLS PostgreSQL with its own CA and random passwords; ``stop()`` removes everything."""

    ca: TestCA
    server: TLSPostgres
    password: str = field(repr=False)
    version: str

    @classmethod
    def start(cls, *, port: int = 0, pg_bin: Path | None = None) -> DevServer:
        ca = TestCA()
        password = _password()
        server = TLSPostgres(
            ca.issue("localhost", HOST),
            trust=ca,
            port=port,
            pg_bin=pg_bin,
            app_password=password,
            superuser_password=_password(),
        )
        server.start()
        try:
            version = server.admin_sql("SHOW server_version")[0][0]
        except BaseException:
            server.stop()
            raise
        return cls(ca=ca, server=server, password=password, version=version)

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> DevServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def ca_path(self) -> str:
        return str(self.ca.cert_path)

    @property
    def url(self) -> str:
        """``postgres://`` URL for dj-database-url; ``sslrootcert`` is a query key."""
        user, password = quote(APP_USER, safe=""), quote(self.password, safe="")
        query = urlencode({"sslrootcert": self.ca_path})
        return f"postgres://{user}:{password}@{HOST}:{self.port}/{APP_DB}?{query}"

    def database_settings(self, **extra: Any) -> dict[str, Any]:
        """A ``DATABASES`` entry (ENGINE secure_pg_backend, verify-full against the CA)."""
        return self.server.database_settings(**extra)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m secure_pg_backend.testing",
        description=(
            "Run a throwaway PostgreSQL with verified TLS on 127.0.0.1 until Ctrl-C or SIGTERM. "
            "Prints DATABASE_URL=... (use with dj_database_url.parse(url, "
            'engine="secure_pg_backend")) and SSLROOTCERT=... (the CA file); '
            "everything is removed on exit."
        ),
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument(
        "--pg-bin",
        type=Path,
        default=None,
        help="directory with initdb and pg_ctl (default: $PG_BIN, Debian's layout or PATH)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Before starting: a signal during start-up still ends in a clean stop below.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        pg_bin = args.pg_bin or find_pg_bin()
        dev = DevServer.start(port=args.port, pg_bin=pg_bin)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(f"{exc}; install the extra: pip install 'secure-pg-backend[testing]'")
    except subprocess.CalledProcessError as exc:
        return _fail(f"{' '.join(exc.cmd)} failed:\n{exc.stderr}")
    with dev:
        print(f"DATABASE_URL={dev.url}", f"SSLROOTCERT={dev.ca_path}", sep="\n", flush=True)
        print(
            f"PostgreSQL {dev.version} with TLS on {HOST}:{dev.port} (pg_bin {pg_bin}). "
            "Ctrl-C or SIGTERM stops it and removes its files.",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    print("stopped; nothing left behind", file=sys.stderr)
    return 0


def _fail(message: str) -> int:
    print(f"secure_pg_backend.testing: {message}", file=sys.stderr)
    return 1

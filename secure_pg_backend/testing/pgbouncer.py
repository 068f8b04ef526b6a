"""A throwaway PgBouncer in front of a ``TLSPostgres``, with TLS on both legs.

Supported like ``secure_pg_backend.testing``: test your project through the pooler it runs
behind in production::

    from secure_pg_backend.testing import TestCA, TLSPostgres
    from secure_pg_backend.testing.pgbouncer import PgBouncer

    ca = TestCA()
    with TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca) as server, PgBouncer(
        server, ca.issue("localhost", "127.0.0.1"), trust=ca
    ) as bouncer:
        DATABASES = {"default": bouncer.database_settings()}

Client leg (Django to PgBouncer): ``client_tls_sslmode = require`` with ``leaf``; the backend
verifies it (verify-full) against the CA that issued ``leaf``. Server leg (PgBouncer to
PostgreSQL): ``server_tls_sslmode = verify-full`` against ``trust``, which is PgBouncer's job,
not the backend's. Transaction pooling, SCRAM with the app user's secret copied from the server.
PgBouncer refuses to run as root, so as root it runs as the ``postgres`` user on files it owns.
Loopback only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .servers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    SUPERUSER,
    LeafPair,
    TestCA,
    TLSPostgres,
    _forget,
    _remove_at_exit,
    _track,
    _untrack,
    free_port,
)

__all__ = ["PgBouncer", "find_pgbouncer"]


def find_pgbouncer() -> str:
    """``$PGBOUNCER``, else ``pgbouncer`` on PATH or in /usr/sbin (Debian's package)."""
    candidates = [os.environ.get("PGBOUNCER"), shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "pgbouncer not found; install it (Debian: apt-get install pgbouncer) or set PGBOUNCER"
    )


def _owner() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam(SUPERUSER)
    return entry.pw_uid, entry.pw_gid


@dataclass
class PgBouncer:
    """PgBouncer on 127.0.0.1 in front of ``server``, presenting ``leaf`` to clients."""

    server: TLSPostgres
    leaf: LeafPair
    trust: TestCA
    pool_mode: str = "transaction"
    server_tls_sslmode: str = "verify-full"
    settings: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    binary: str | None = None
    client_ca: TestCA | None = None  # the CA clients should trust; default: ``trust``

    def __post_init__(self) -> None:
        self.binary = self.binary or find_pgbouncer()
        self.port = self.port or free_port()
        self.base = _remove_at_exit(Path(tempfile.mkdtemp(prefix="spb-pgbouncer-")))
        self.ini = self.base / "pgbouncer.ini"
        self.log_file = self.base / "pgbouncer.log"
        self.pid_file = self.base / "pgbouncer.pid"
        self.running = False

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> PgBouncer:
        self._write_files()
        self.running = True
        _track(self)  # stopped at exit (or SIGTERM) if the caller never stops it
        self._run([str(self.binary), "-d", "-q", str(self.ini)])
        try:
            self._wait_listening(timeout)
        except BaseException:
            self.stop()  # a daemon outlives us otherwise
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.running:
            self._terminate(timeout)
            self.running = False
            _untrack(self)
        shutil.rmtree(self.base, ignore_errors=True)
        _forget(self.base)

    def restart(self, down: float = 0.0, timeout: float = 30.0) -> None:
        """Stop (client connections cut), stay down ``down`` seconds, start again on the same
        port with the same files: a deploy or a crash-restart, as the clients see it."""
        self._terminate(10.0)
        time.sleep(down)
        self._run([str(self.binary), "-d", "-q", str(self.ini)])
        self._wait_listening(timeout)

    def _terminate(self, timeout: float) -> None:
        pid = self._pid()
        if pid is None:
            return
        self._signal(pid, signal.SIGTERM)  # immediate shutdown
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if not _alive(pid) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if _alive(pid):
            self._signal(pid, signal.SIGKILL)

    def reload(self) -> None:
        """Re-read the configuration and TLS files (SIGHUP), as after a certificate rotation."""
        pid = self._pid()
        if pid is None:
            raise RuntimeError("pgbouncer is not running")
        self._signal(pid, signal.SIGHUP)

    def rotate_certificate(self, leaf: LeafPair) -> None:
        self.leaf = leaf
        self._write_tls()
        self._chown()
        self.reload()

    # -- configuration ---------------------------------------------------------
    def _write_files(self) -> None:
        self._write_tls()
        (self.base / "server-ca.pem").write_bytes(self.trust.cert_pem)
        # SCRAM secret (not the password) of the app user, straight from the server.
        rows = self.server.admin_sql(
            f"select rolpassword from pg_authid where rolname = '{APP_USER}'"
        )
        (self.base / "userlist.txt").write_text(f'"{APP_USER}" "{rows[0][0]}"\n')
        lines: dict[str, str] = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": str(self.base / "userlist.txt"),
            "pool_mode": self.pool_mode,
            "max_client_conn": "200",
            "default_pool_size": "10",
            "client_tls_sslmode": "require",
            "client_tls_key_file": str(self.base / "client-leg.key"),
            "client_tls_cert_file": str(self.base / "client-leg.crt"),
            "client_tls_protocols": "secure",
            "server_tls_sslmode": self.server_tls_sslmode,
            "server_tls_ca_file": str(self.base / "server-ca.pem"),
            "server_tls_protocols": "secure",
            "logfile": str(self.log_file),
            "pidfile": str(self.pid_file),
            "server_login_retry": "1",
            "query_wait_timeout": "10",
        }
        lines.update(self.settings)
        text = "[databases]\n"
        text += f"{APP_DB} = host=127.0.0.1 port={self.server.port} dbname={APP_DB}\n"
        text += "\n[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())
        self.ini.write_text(text)
        self._chown()

    def _write_tls(self) -> None:
        (self.base / "client-leg.crt").write_bytes(self.leaf.cert_chain_pem)
        key = self.base / "client-leg.key"
        key.write_bytes(self.leaf.key_pem)
        key.chmod(0o600)

    def _chown(self) -> None:
        owner = _owner()
        if owner is None:
            return
        for path in [self.base, *self.base.iterdir()]:
            os.chown(path, *owner)

    # -- process ---------------------------------------------------------------
    def _run(self, args: list[str]) -> None:
        if _owner() is not None:
            args = ["runuser", "-u", SUPERUSER, "--", *args]
        try:
            subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"pgbouncer failed to start: {exc.stderr}{self.log_text()}") from exc

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not start listening:\n{self.log_text()}")

    # -- access ----------------------------------------------------------------
    def database_settings(
        self,
        *,
        host: str = "127.0.0.1",
        options: Mapping[str, Any] | None = None,
        engine: str = "secure_pg_backend",
        **extra: Any,
    ) -> dict[str, Any]:
        """A ``DATABASES`` entry through PgBouncer (transaction pooling ready)."""
        ca = self.client_ca or self.trust
        opts: dict[str, Any] = {"sslrootcert": str(ca.cert_path)}
        opts.update(options or {})
        entry: dict[str, Any] = {
            "ENGINE": engine,
            "NAME": APP_DB,
            "USER": APP_USER,
            "PASSWORD": APP_PASSWORD,
            "HOST": host,
            "PORT": str(self.port),
            "OPTIONS": opts,
            # Transaction pooling: no server-side cursors (they outlive a transaction).
            "DISABLE_SERVER_SIDE_CURSORS": True,
        }
        entry.update(extra)
        return entry

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except (FileNotFoundError, PermissionError):
            return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""A real HA cluster for the long fault scenarios: etcd, three PostgreSQL 15 nodes run by
Patroni, and HAProxy in front of them, all on loopback with verified TLS.

- **etcd** (Debian ``etcd-server``) on 127.0.0.1, one member, the DCS Patroni keeps its leader
  key in (the v3 API: Patroni's ``etcd3`` client).
- **Three nodes**, ``127.0.0.11``, ``.12`` and ``.13``, each its own PostgreSQL 15 data
  directory and Patroni process, and its own certificate from the test CA, naming the node's
  address, ``localhost``, ``127.0.0.1`` and HAProxy's address (a client that reaches a node
  through HAProxy verifies the name it dialled). TLS only: ``hostssl`` lines in pg_hba, the
  replication connections verify the primary's certificate too (``verify-full``).
  ``synchronous_mode``: a commit is acknowledged once a standby has it, so a failover loses no
  acknowledged row, whatever the client.
- **HAProxy** (Debian ``haproxy``) on ``127.0.0.10`` in TCP mode, each node checked with
  Patroni's ``GET /primary`` every 0.5 s, sessions to a node marked down cut at once: a
  client that knows a single host follows the leader.

PostgreSQL refuses to run as root, and so does Patroni's postmaster; as root, Patroni runs as
the ``postgres`` user. The interpreter running the tests may live where that user cannot
read (a pyenv under ``/root``), so Patroni gets one capability on top, ``CAP_DAC_READ_SEARCH``
(read any file, never write), inherited by what it starts. Every port is below 32768, outside
the ephemeral range: a client retrying a closed port in that range can connect to itself
(TCP simultaneous open) during a long outage. Everything is stopped and removed by ``stop()``,
and at exit by ``secure_pg_backend.testing``'s cleanup if a test never gets that far.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_pg_backend.testing import APP_DB, APP_PASSWORD, APP_USER, SUPERUSER, TestCA
from secure_pg_backend.testing.servers import (
    _chown_tree,
    _forget,
    _literal,
    _pg_owner,
    _remove_at_exit,
    _track,
    _untrack,
    find_pg_bin,
)

HAPROXY_HOST = "127.0.0.10"
NODE_HOSTS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
ETCD_HOST = "127.0.0.1"
SCOPE = "spb"
REPLICATOR = "replicator"
# Patroni's floor is ttl 20 s: a leader that died without a word is replaced after its key
# expires, so a killed leader costs up to ttl + loop_wait.
TTL, LOOP_WAIT, RETRY_TIMEOUT = 20, 1, 5


def have_tools() -> str | None:
    """Why the cluster cannot run here, or None (etcd, HAProxy and Patroni are installed)."""
    missing = [name for name in ("etcd", "haproxy") if shutil.which(name, path=_PATH) is None]
    try:
        import patroni  # noqa: F401
    except ImportError:
        missing.append("patroni (PyPI patroni[etcd])")
    return f"missing: {', '.join(missing)}" if missing else None


_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin"


def low_port(host: str = "127.0.0.1", start: int = 20000, end: int = 32000) -> int:
    """A free TCP port on ``host`` below the ephemeral range (see the module docstring)."""
    for _ in range(200):
        port = random.randrange(start, end)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in [{start}, {end}) on {host}")


def _as_postgres(args: list[str]) -> list[str]:
    """Run as the ``postgres`` user when we are root (see the module docstring)."""
    if _pg_owner() is None:
        return args
    return [
        "setpriv",
        f"--reuid={SUPERUSER}",
        f"--regid={SUPERUSER}",
        "--init-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        *args,
    ]


def _wait(condition: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        with contextlib.suppress(Exception):
            value = condition()
            if value:
                return value
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop_process(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(10)


@dataclass
class Node:
    name: str
    host: str
    port: int
    rest_port: int
    base: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def config(self) -> Path:
        return self.base / "patroni.yml"

    @property
    def log(self) -> Path:
        return self.base / "patroni.log"  # Patroni's own (log.dir); its stdout: patroni.out

    def rest(self, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        url = f"http://{self.host}:{self.rest_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            body = error.read()
            return error.code, json.loads(body) if body else None

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError, PermissionError):
            return None


class PatroniCluster:
    """etcd + three Patroni nodes + HAProxy; ``start()``, then ``stop()`` (idempotent)."""

    def __init__(self, ca: TestCA, *, settings: dict[str, str] | None = None) -> None:
        self.ca = ca
        self.settings = settings or {}
        self.pg_bin = find_pg_bin()
        self.base = _remove_at_exit(Path(tempfile.mkdtemp(prefix="spb-patroni-")))
        self.superuser_password = secrets.token_urlsafe(18)  # never printed
        self.replication_password = secrets.token_urlsafe(18)
        self.etcd_port, self.etcd_peer_port = low_port(ETCD_HOST), low_port(ETCD_HOST)
        self.haproxy_port = low_port(HAPROXY_HOST)
        self.nodes = [
            Node(f"node{i + 1}", host, low_port(host), low_port(host), self.base / f"node{i + 1}")
            for i, host in enumerate(NODE_HOSTS)
        ]
        self.etcd: subprocess.Popen[bytes] | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.running = False

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> PatroniCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> PatroniCluster:
        self.running = True
        _track(self)  # stopped at exit even if the caller never gets to stop()
        try:
            self._start_etcd()
            for node in self.nodes:
                self._write_node(node)
            _chown_tree(self.base, _pg_owner())
            self.nodes[0].process = self._spawn(self.nodes[0])  # bootstraps the cluster
            _wait(lambda: self.nodes[0].rest("/primary")[0] == 200, timeout, "the first leader")
            for node in self.nodes[1:]:
                node.process = self._spawn(node)
            _wait(lambda: self._streaming() == 2, timeout, "two streaming standbys")
            _wait(self._has_sync, timeout, "a synchronous standby")
            self._bootstrap_app()
            self._start_haproxy()
            _wait(self._haproxy_ready, 30, "HAProxy to reach the leader")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.running:
            _stop_process(self.haproxy, signal.SIGTERM, 5)
            for node in self.nodes:  # Patroni stops its postgres on SIGTERM: all at once
                if node.process is not None and node.process.poll() is None:
                    node.process.terminate()
            for node in self.nodes:
                _stop_process(node.process, signal.SIGTERM, 30)
            for node in self.nodes:  # a postmaster whose Patroni died without stopping it
                pid = node.postmaster_pid()
                if pid is not None and node.data.exists():
                    with contextlib.suppress(subprocess.CalledProcessError, OSError):
                        subprocess.run(
                            _as_postgres(
                                [
                                    *(str(self.pg_bin / "pg_ctl"), "-D", str(node.data)),
                                    *("stop", "-m", "immediate", "-w", "-t", "10"),
                                ]
                            ),
                            capture_output=True,
                            timeout=20,
                            check=True,
                        )
            _stop_process(self.etcd, signal.SIGTERM, 10)
            self.running = False
            _untrack(self)
        shutil.rmtree(self.base, ignore_errors=True)
        _forget(self.base)

    # -- etcd ------------------------------------------------------------------
    def _start_etcd(self) -> None:
        data = self.base / "etcd"
        client = f"http://{ETCD_HOST}:{self.etcd_port}"
        peer = f"http://{ETCD_HOST}:{self.etcd_peer_port}"
        with (self.base / "etcd.log").open("wb") as log:
            self.etcd = subprocess.Popen(
                [
                    shutil.which("etcd", path=_PATH) or "etcd",
                    *("--name", "etcd0", "--data-dir", str(data)),
                    *("--listen-client-urls", client, "--advertise-client-urls", client),
                    *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
                    *("--initial-cluster", f"etcd0={peer}", "--initial-cluster-state", "new"),
                    # fsync off the critical path: a test DCS on a shared machine
                    "--unsafe-no-fsync",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        _wait(self._etcd_healthy, 30, "etcd")

    def _etcd_healthy(self) -> bool:
        url = f"http://{ETCD_HOST}:{self.etcd_port}/health"
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(json.loads(response.read()).get("health") == "true")

    # -- nodes -----------------------------------------------------------------
    def _write_node(self, node: Node) -> None:
        node.base.mkdir()
        node.socket_dir.mkdir()
        leaf = self.ca.issue("localhost", "127.0.0.1", node.host, HAPROXY_HOST)
        (node.base / "server.crt").write_bytes(leaf.cert_chain_pem)
        key = node.base / "server.key"
        key.write_bytes(leaf.key_pem)
        key.chmod(0o600)
        (node.base / "ca.crt").write_bytes(self.ca.cert_pem)
        parameters = {
            "ssl": "on",
            "ssl_cert_file": str(node.base / "server.crt"),
            "ssl_key_file": str(node.base / "server.key"),
            "ssl_min_protocol_version": "TLSv1.2",
            "unix_socket_directories": str(node.socket_dir),
            "fsync": "off",
            "full_page_writes": "on",  # pg_rewind needs it
            "shared_buffers": "32MB",
            "log_connections": "on",
            **self.settings,
        }
        replication = {
            "username": REPLICATOR,
            "password": self.replication_password,
            "sslmode": "verify-full",
            "sslrootcert": str(node.base / "ca.crt"),
        }
        config = {
            "scope": SCOPE,
            "name": node.name,
            "log": {"level": "INFO", "dir": str(node.base)},
            "restapi": {
                "listen": f"{node.host}:{node.rest_port}",
                "connect_address": f"{node.host}:{node.rest_port}",
            },
            "etcd3": {"hosts": [f"{ETCD_HOST}:{self.etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "max_connections": "100",
                            "wal_log_hints": "on",
                            "wal_keep_size": "128MB",
                        },
                    },
                },
                "initdb": [
                    {"encoding": "UTF8"},
                    {"locale": "C"},
                    {"auth": "scram-sha-256"},
                    "no-sync",
                ],
            },
            "postgresql": {
                "listen": f"{node.host}:{node.port}",
                "connect_address": f"{node.host}:{node.port}",
                "data_dir": str(node.data),
                "bin_dir": str(self.pg_bin),
                "pgpass": str(node.base / "pgpass"),
                "use_unix_socket": True,
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": self.superuser_password},
                    "replication": replication,
                    "rewind": {
                        "username": SUPERUSER,
                        "password": self.superuser_password,
                    },
                },
                "parameters": parameters,
                # TLS only: no plain "host" line anywhere
                "pg_hba": [
                    "local all all scram-sha-256",
                    f"hostssl replication {REPLICATOR} 127.0.0.0/8 scram-sha-256",
                    "hostssl all all 127.0.0.0/8 scram-sha-256",
                ],
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }
        # JSON is YAML: Patroni reads it as is, and no YAML writer is needed here.
        node.config.write_text(json.dumps(config, indent=1))
        node.config.chmod(0o600)  # it holds the passwords

    def _spawn(self, node: Node) -> subprocess.Popen[bytes]:
        with (node.base / "patroni.out").open("ab") as log:
            return subprocess.Popen(
                _as_postgres([sys.executable, "-m", "patroni", str(node.config)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(node.base),
                start_new_session=True,
            )

    def _streaming(self) -> int:
        status, body = self.nodes[0].rest("/cluster")
        members = body["members"] if status == 200 else []
        return sum(1 for m in members if m.get("state") == "streaming")

    def _has_sync(self) -> bool:
        status, body = self.nodes[0].rest("/cluster")
        return status == 200 and any(m["role"] == "sync_standby" for m in body["members"])

    # -- HAProxy ---------------------------------------------------------------
    def _start_haproxy(self) -> None:
        servers = "".join(
            f"    server {n.name} {n.host}:{n.port} check port {n.rest_port}\n" for n in self.nodes
        )
        (self.base / "haproxy.cfg").write_text(
            "global\n    maxconn 400\n"
            "defaults\n    mode tcp\n    timeout connect 2s\n"
            "    timeout client 60s\n    timeout server 60s\n"
            f"listen primary\n    bind {HAPROXY_HOST}:{self.haproxy_port}\n"
            "    option httpchk GET /primary\n    http-check expect status 200\n"
            # A node that stops being the primary is marked down within a second and its
            # sessions are cut, so no client keeps writing to a demoted node.
            "    default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n"
            + servers
        )
        with (self.base / "haproxy.log").open("wb") as log:
            self.haproxy = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.base / "haproxy.cfg")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _haproxy_ready(self) -> bool:
        # The SSLRequest through HAProxy is answered "S" by the leader behind it.
        with socket.create_connection((HAPROXY_HOST, self.haproxy_port), timeout=2) as sock:
            sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
            return sock.recv(1) == b"S"

    # -- the cluster's state -----------------------------------------------------
    def members(self) -> list[dict[str, Any]]:
        for node in self.nodes:
            with contextlib.suppress(OSError, ValueError):
                status, body = node.rest("/cluster")
                if status == 200:
                    return list(body["members"])
        return []

    def leader(self) -> Node | None:
        for member in self.members():
            if member.get("role") == "leader" and member.get("state") == "running":
                return self.node(member["name"])
        return None

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def wait_leader(self, timeout: float = 60.0, not_: Node | None = None) -> Node:
        def found() -> Node | None:
            leader = self.leader()
            return leader if leader is not None and leader is not not_ else None

        leader: Node = _wait(found, timeout, "a leader")
        return leader

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """A leader, two streaming standbys (one synchronous), HAProxy on the leader."""
        self.wait_leader(timeout)
        _wait(lambda: self._members_streaming() == 2, timeout, "two streaming standbys")
        _wait(self._cluster_has_sync, timeout, "a synchronous standby")
        _wait(self._haproxy_ready, 30, "HAProxy to reach the leader")

    def _members_streaming(self) -> int:
        return sum(1 for m in self.members() if m.get("state") == "streaming")

    def _cluster_has_sync(self) -> bool:
        return any(m.get("role") == "sync_standby" for m in self.members())

    # -- faults ----------------------------------------------------------------
    def switchover(self) -> Node:
        """``patronictl switchover`` away from the current leader; returns the old leader."""
        leader = self.wait_leader()
        patronictl = Path(sys.executable).parent / "patronictl"
        result = subprocess.run(
            [
                str(patronictl),
                *("-c", str(leader.config), "switchover", SCOPE),
                *("--leader", leader.name, "--force"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:  # the output names members and timings, never a password
            raise RuntimeError(f"patronictl switchover failed: {result.stdout}{result.stderr}")
        return leader

    def kill(self, node: Node) -> None:
        """The node dies: SIGKILL to Patroni and to its postmaster (the backends follow)."""
        pid = node.postmaster_pid()
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                node.process.kill()
            node.process.wait(10)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def revive(self, node: Node) -> None:
        """Patroni again on a killed node: it rejoins as a standby (pg_rewind if needed)."""
        node.process = self._spawn(node)

    # -- access ----------------------------------------------------------------
    def admin_sql(self, *statements: str, dbname: str = "postgres") -> list[Any]:
        """Statements as the superuser on the current leader, over its Unix socket."""
        import psycopg

        leader = self.wait_leader()
        rows: list[Any] = []
        with psycopg.connect(
            host=str(leader.socket_dir),
            port=leader.port,
            user=SUPERUSER,
            password=self.superuser_password,
            dbname=dbname,
            autocommit=True,
            gssencmode="disable",
            connect_timeout=5,
        ) as conn:
            for statement in statements:
                cur = conn.execute(statement)
                rows = cur.fetchall() if cur.description else []
        return rows

    def _bootstrap_app(self) -> None:
        self.admin_sql(
            f"CREATE ROLE {APP_USER} LOGIN PASSWORD {_literal(APP_PASSWORD)}",
            f"CREATE DATABASE {APP_DB} OWNER {APP_USER}",
        )

    def database_settings(
        self,
        *,
        engine: str = "secure_pg_backend",
        options: dict[str, Any] | None = None,
        via_haproxy: bool = False,
        **extra: Any,
    ) -> dict[str, Any]:
        """All three nodes in HOST with ``target_session_attrs=read-write``, or HAProxy."""
        opts: dict[str, Any] = {"sslrootcert": str(self.ca.cert_path)}
        if not via_haproxy:
            opts["target_session_attrs"] = "read-write"
        opts.update(options or {})
        if via_haproxy:
            host, port = HAPROXY_HOST, str(self.haproxy_port)
        else:
            host = ",".join(n.host for n in self.nodes)
            port = ",".join(str(n.port) for n in self.nodes)
        entry: dict[str, Any] = {
            "ENGINE": engine,
            "NAME": APP_DB,
            "USER": APP_USER,
            "PASSWORD": APP_PASSWORD,
            "HOST": host,
            "PORT": port,
            "OPTIONS": opts,
        }
        entry.update(extra)
        return entry

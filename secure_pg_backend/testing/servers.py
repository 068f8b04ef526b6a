"""Throwaway PostgreSQL servers with real TLS, for tests and demos.

This is a supported module: point your own project's tests at a real TLS
PostgreSQL instead of a mock. It needs the PostgreSQL server binaries
(``initdb``, ``pg_ctl``) and, for certificates, ``trustme``
(``pip install secure-pg-backend[testing]``)::

    from secure_pg_backend.testing import TestCA, TLSPostgres

    ca = TestCA()
    with TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca) as server:
        DATABASES = {"default": server.database_settings()}

``postgres`` refuses to run as root, so when the current user is root every
server command runs as the unprivileged ``postgres`` user (``runuser``) on
files it owns. Servers listen on loopback only.

Passwords: by default the app user and the superuser get the fixed, distinctive
``APP_PASSWORD`` and ``SUPERUSER_PASSWORD`` (so tests can grep output for leaks); any
local user who reads this file can log in to such a server. Pass ``app_password`` and
``superuser_password`` for a server others must not enter (the dev server and the pytest
plugin use random ones). Either way the roles and passwords are set in single-user mode
before the server first listens on TCP, so no client ever sees the template's password.

Server certificates from ``TestCA.issue`` are valid for ``LEAF_VALIDITY`` (90 days) from
a day ago, like a real short-lived certificate, so expiry lines and warnings mean something.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["LeafPair", "TLSPostgres", "TestCA", "cleanup", "find_pg_bin", "free_port"]

LEAF_VALIDITY = dt.timedelta(days=90)

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "superuser-Pw-9f3e1c"  # distinctive, so tests can grep for leaks
APP_USER = "app"
APP_PASSWORD = "app-Pw-7c41d2e8-secret"
APP_DB = "app"

_PG_BIN_CANDIDATES = (
    "/usr/lib/postgresql/{v}/bin",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/opt/postgresql@{v}/bin",
)


def find_pg_bin() -> Path:
    """Directory holding ``initdb``/``pg_ctl``: ``$PG_BIN``, Debian's layout, or PATH."""
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    for version in range(18, 12, -1):
        for pattern in _PG_BIN_CANDIDATES:
            path = Path(pattern.format(v=version))
            if (path / "initdb").exists():
                return path
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise FileNotFoundError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them "
        "(Debian: apt-get install postgresql) or set PG_BIN"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LeafPair:
    """A server certificate chain and its key, as PEM bytes."""

    cert_chain_pem: bytes
    key_pem: bytes = field(repr=False)  # a private key: not in tracebacks or test reports


class TestCA:
    """A throwaway certificate authority (trustme), with a file clients can trust."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, rsa: bool = False, directory: Path | None = None) -> None:
        import trustme

        self._trustme = trustme
        self.key_type = trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA
        self.ca = trustme.CA(key_type=self.key_type)
        self._dir = directory or Path(tempfile.mkdtemp(prefix="spb-ca-"))
        if directory is None:  # ours: remove it with the CA, or at exit (see cleanup)
            weakref.finalize(self, shutil.rmtree, _remove_at_exit(self._dir), True)
        self.cert_path = self._dir / f"ca-{id(self):x}.pem"
        self.ca.cert_pem.write_to_path(str(self.cert_path))

    @property
    def cert_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def issue(
        self,
        *hostnames: str,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        rsa: bool | None = None,
        common_name: str | None = None,
    ) -> LeafPair:
        """A leaf for ``hostnames``; a client certificate is ``issue(common_name=USER)``
        (PostgreSQL's ``clientcert=verify-full`` matches the common name to the user)."""
        key_type = self.key_type
        if rsa is not None:
            key_type = self._trustme.KeyType.RSA if rsa else self._trustme.KeyType.ECDSA
        now = dt.datetime.now(dt.timezone.utc)
        not_before = not_before or now - dt.timedelta(days=1)  # clock skew
        not_after = not_after or not_before + LEAF_VALIDITY
        if not hostnames:
            if not common_name:
                raise ValueError("issue() needs host names, or common_name= for a client")
            rsa_key = key_type == self._trustme.KeyType.RSA
            return self._issue_client(common_name, not_before, not_after, rsa=rsa_key)
        leaf = self.ca.issue_cert(
            *hostnames,
            common_name=common_name,
            not_before=not_before,
            not_after=not_after,
            key_type=key_type,
        )
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return LeafPair(cert_chain_pem=chain, key_pem=leaf.private_key_pem.bytes())

    @staticmethod
    def _leaf_name(ca_cert: Any, common_name: str) -> Any:
        """A subject laid out as trustme lays out its leaves: O, OU, then CN."""
        import secrets

        from cryptography import x509
        from cryptography.x509.oid import NameOID

        organization = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return x509.Name(
            [
                *organization[:1],
                x509.NameAttribute(
                    NameOID.ORGANIZATIONAL_UNIT_NAME, "Testing cert #" + secrets.token_hex(8)
                ),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    def _issue_client(
        self, common_name: str, not_before: dt.datetime, not_after: dt.datetime, *, rsa: bool
    ) -> LeafPair:
        """A client certificate: the common name only, no SubjectAlternativeName.

        trustme gives every leaf a SAN of its host names, and cryptography 51 refuses an empty
        one, so a name-less client leaf is signed here with cryptography's public API by the
        same CA key (the CA's PEM, as trustme exports it).
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
        from cryptography.x509.oid import ExtendedKeyUsageOID

        ca_cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
        key: ec.EllipticCurvePrivateKey | rsa_keys.RSAPrivateKey
        if rsa:
            key = rsa_keys.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(self._leaf_name(ca_cert, common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=rsa,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return LeafPair(
            cert_chain_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=key_pem
        )


def _as_root() -> bool:
    return os.geteuid() == 0


def _pg_owner() -> tuple[int, int] | None:
    if not _as_root():
        return None
    entry = pwd.getpwnam(SUPERUSER)
    return entry.pw_uid, entry.pw_gid


def _chown_tree(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    os.chown(path, *owner)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            # A running server creates and removes temporary files (pg_internal.init.PID)
            # while we walk its data directory (rotate_certificate): gone is fine.
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(root, name), *owner)


def _run_as_owner(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    if _as_root():
        args = ["runuser", "-u", SUPERUSER, "--", *args]
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


# -- cleanup at process end ---------------------------------------------------------
# Everything this module creates (template clusters, server directories, running servers)
# is registered here and removed when the process ends: at normal exit (atexit), and on
# SIGTERM/SIGHUP when the program has not set its own handler (see _install_signal_cleanup).
# SIGINT needs nothing: Python turns it into KeyboardInterrupt, and atexit runs after it.
# Only SIGKILL (or a crash of the interpreter) can leave a server and its directory behind.
# A forked child inherits these lists but not the ownership: only the creating pid cleans up.
_OWNER_PID = os.getpid()
_running: dict[int, _Stoppable] = {}
_paths: list[Path] = []


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def _track(process: _Stoppable) -> None:
    """Stop ``process`` at exit unless it is stopped before (``_untrack``)."""
    _install_signal_cleanup()
    _running[id(process)] = process


def _untrack(process: _Stoppable) -> None:
    _running.pop(id(process), None)


def _remove_at_exit(path: Path) -> Path:
    _paths.append(path)
    return path


def _forget(path: Path) -> None:
    if path in _paths and not path.exists():
        _paths.remove(path)


def cleanup() -> None:
    """Stop every server this process started and remove every directory it created.

    Runs by itself at exit; safe to call more than once. Takes no locks, so it may run from
    a signal handler that interrupted this module.
    """
    if os.getpid() != _OWNER_PID:
        return
    for process in list(_running.values()):
        # keep going on failure: the other servers and directories still need it
        with contextlib.suppress(Exception):
            process.stop()
    for path in list(_paths):
        shutil.rmtree(path, ignore_errors=True)
        _forget(path)


atexit.register(cleanup)

_signals_installed = False


def _install_signal_cleanup() -> None:
    """On SIGTERM/SIGHUP, clean up, then die of the same signal as before (exit status kept).

    Only where the disposition is still the default (so a program's own handler, for example
    ``python -m secure_pg_backend.testing``, wins), and only from the main thread (the only
    place Python allows it).
    """
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    _signals_installed = True
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _die_cleanly)


def _die_cleanly(signum: int, frame: object) -> None:
    cleanup()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_template_lock = threading.Lock()
_templates: dict[Path, Path] = {}


def _template_cluster(pg_bin: Path) -> Path:
    """initdb once per process and server version; every server copies the result (faster)."""
    key = pg_bin.resolve()
    with _template_lock:
        known = _templates.get(key)
        if known is not None and known.exists():
            return known
        base = _remove_at_exit(Path(tempfile.mkdtemp(prefix="spb-pgtemplate-")))
        owner = _pg_owner()
        pwfile = base / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        data = base / "data"
        _chown_tree(base, owner)
        _run_as_owner(
            [
                str(pg_bin / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        _templates[key] = data
        return data


@dataclass
class TLSPostgres:
    """A PostgreSQL server on 127.0.0.1 with TLS from ``leaf`` (or ``ssl=False``).

    ``allow_plaintext`` adds ``host`` lines to pg_hba.conf so that non-TLS TCP
    clients are also accepted (to show what the backend refuses, and to measure
    what TLS costs). ``settings`` are extra postgresql.conf lines. ``client_ca`` makes the
    server demand a client certificate from that CA whose common name is the user
    (``ssl_ca_file`` and ``clientcert=verify-full`` on its ``hostssl`` lines).
    """

    leaf: LeafPair | None
    trust: TestCA | None = None
    ssl: bool = True
    allow_plaintext: bool = False
    settings: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    pg_bin: Path | None = None
    app_password: str = field(default=APP_PASSWORD, repr=False)
    superuser_password: str = field(default=SUPERUSER_PASSWORD, repr=False)
    client_ca: TestCA | None = None

    def __post_init__(self) -> None:
        self.pg_bin = self.pg_bin or find_pg_bin()
        self.port = self.port or free_port()
        self.base = _remove_at_exit(Path(tempfile.mkdtemp(prefix="spb-pg-")))
        self.data = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.log_file = self.base / "postgresql.log"
        self.running = False

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> TLSPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> TLSPostgres:
        assert self.pg_bin is not None
        shutil.copytree(_template_cluster(self.pg_bin), self.data, symlinks=True)
        self.socket_dir.mkdir()
        self.data.chmod(0o700)
        self._write_tls_files()
        self._write_conf()
        _chown_tree(self.base, _pg_owner())
        self._bootstrap()  # before the server first listens: no window with a known password
        self._started()
        return self

    def stop(self) -> None:
        if self.running:
            try:
                self._pg_ctl("stop", "-m", "immediate", "-w")
            finally:
                self._stopped()
        shutil.rmtree(self.base, ignore_errors=True)
        _forget(self.base)

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast", "-w", "-l", str(self.log_file))

    def kill(self) -> None:
        """Stop the server abruptly (outage simulation); ``start_again`` brings it back."""
        self._pg_ctl("stop", "-m", "immediate", "-w")
        self._stopped()

    def start_again(self) -> None:
        self._started()

    def _started(self) -> None:
        # Registered before pg_ctl returns: a signal during the wait still stops the server.
        self.running = True
        _track(self)
        try:
            self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file))
        except BaseException:
            with contextlib.suppress(Exception):  # it may be up although the wait failed
                self._pg_ctl("stop", "-m", "immediate", "-w")
            self._stopped()
            raise

    def _stopped(self) -> None:
        self.running = False
        _untrack(self)

    def rotate_certificate(self, leaf: LeafPair) -> None:
        """Replace the server certificate and reload the configuration (no restart)."""
        self.leaf = leaf
        self._write_tls_files()
        _chown_tree(self.data, _pg_owner())
        self._pg_ctl("reload")

    def _pg_ctl(self, *args: str) -> None:
        assert self.pg_bin is not None
        _run_as_owner([str(self.pg_bin / "pg_ctl"), "-D", str(self.data), *args])

    # -- configuration ---------------------------------------------------
    def _write_tls_files(self) -> None:
        if self.leaf is None:
            return
        (self.data / "server.crt").write_bytes(self.leaf.cert_chain_pem)
        key = self.data / "server.key"
        key.write_bytes(self.leaf.key_pem)
        key.chmod(0o600)
        if self.client_ca is not None:
            (self.data / "client_ca.crt").write_bytes(self.client_ca.cert_pem)

    def _write_conf(self) -> None:
        lines = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "ssl": "on" if self.ssl and self.leaf else "off",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "120",
            "log_connections": "off",
        }
        if self.ssl and self.leaf:
            lines["ssl_cert_file"] = "'server.crt'"
            lines["ssl_key_file"] = "'server.key'"
            if self.client_ca is not None:
                lines["ssl_ca_file"] = "'client_ca.crt'"
        lines.update(self.settings)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# secure_pg_backend.testing\n")
            for key, value in lines.items():
                conf.write(f"{key} = {value}\n")
        hba = ["local all all scram-sha-256"]
        clientcert = " clientcert=verify-full" if self.client_ca is not None else ""
        for net in ("127.0.0.1/32", "::1/128"):
            hba.append(f"hostssl all all {net} scram-sha-256{clientcert}")
            if self.allow_plaintext or not (self.ssl and self.leaf):
                hba.append(f"host all all {net} scram-sha-256")
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def _bootstrap(self) -> None:
        """Roles, passwords and the app database, in single-user mode (no listener at all)."""
        assert self.pg_bin is not None
        statements = [
            f"CREATE ROLE {APP_USER} LOGIN CREATEDB PASSWORD {_literal(self.app_password)}",
            f"CREATE DATABASE {APP_DB} OWNER {APP_USER}",
        ]
        if self.superuser_password != SUPERUSER_PASSWORD:  # the template's
            statements.append(
                f"ALTER ROLE {SUPERUSER} PASSWORD {_literal(self.superuser_password)}"
            )
        result = _run_as_owner(
            [str(self.pg_bin / "postgres"), "--single", "-D", str(self.data), "-F", "postgres"],
            input="".join(f"{statement}\n" for statement in statements),
        )
        # Single-user mode reports a failed statement and carries on, exit status 0.
        if "ERROR:" in result.stdout + result.stderr:
            problem = " ".join(result.stderr.split()) or "a bootstrap statement failed"
            from ..errors import redact  # Django, imported only to word this failure

            problem = redact(problem, (self.app_password, self.superuser_password))
            raise RuntimeError(f"bootstrapping the server failed: {problem}")

    # -- access ------------------------------------------------------------
    def admin_sql(self, *statements: str, dbname: str = "postgres") -> list[Any]:
        """Run statements as the superuser over the Unix socket; return the last rows."""
        import psycopg

        rows: list[Any] = []
        with psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            password=self.superuser_password,
            dbname=dbname,
            autocommit=True,
            gssencmode="disable",
        ) as conn:
            for statement in statements:
                cur = conn.execute(statement)
                rows = cur.fetchall() if cur.description else []
        return rows

    @property
    def root_cert(self) -> str:
        if self.trust is None:
            raise ValueError("this server was started without a trusted CA")
        return str(self.trust.cert_path)

    def database_settings(
        self,
        *,
        host: str = "127.0.0.1",
        options: Mapping[str, Any] | None = None,
        engine: str = "secure_pg_backend",
        **extra: Any,
    ) -> dict[str, Any]:
        """A ``DATABASES`` entry for this server (app user, app database)."""
        opts: dict[str, Any] = {}
        if self.trust is not None:
            opts["sslrootcert"] = self.root_cert
        opts.update(options or {})
        entry: dict[str, Any] = {
            "ENGINE": engine,
            "NAME": APP_DB,
            "USER": APP_USER,
            "PASSWORD": self.app_password,
            "HOST": host,
            "PORT": str(self.port),
            "OPTIONS": opts,
            "TEST": {"NAME": f"test_{APP_DB}_{self.port}"},
        }
        entry.update(extra)
        return entry

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings is on from PostgreSQL 9.1)."""
    return "'" + text.replace("'", "''") + "'"

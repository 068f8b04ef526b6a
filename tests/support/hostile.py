"""A hostile PostgreSQL server and a recording TCP proxy, for the hostile-server suite.

Both listen on 127.0.0.1 only, use one thread per connection, and record every byte a client
sends: the raw bytes off the socket (before and during TLS) and, once a TLS session exists, the
decrypted application bytes. TLS is real (Python's ``ssl`` over memory BIOs, so the raw
ciphertext is recorded as well as the plaintext). Every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secure_pg_backend.testing import LeafPair

if TYPE_CHECKING:
    from typing import Self

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST_CODE = 80877104
SSL_REQUEST_CODE = 80877103
PROTOCOL_3 = 196608
TLS_HANDSHAKE_RECORD = 0x16

# Per-connection limits: a misbehaving client cannot keep a handler thread alive for long.
CONNECTION_DEADLINE = 15.0
MAX_READS = 2000


@dataclass
class Recording:
    """What one client connection sent us."""

    raw: bytearray = field(default_factory=bytearray)  # off the wire, incl. TLS records
    decrypted: bytearray = field(default_factory=bytearray)  # inside the TLS session
    requests: list[str] = field(default_factory=list)  # "ssl", "gssenc", "startup", "direct-tls"
    handshake_completed: bool = False
    tls_error: str | None = None
    closed_by_client: bool = False

    def contains(self, needle: bytes) -> bool:
        return needle in self.raw or needle in self.decrypted


class _Conn:
    """A client socket with a receive buffer; every received byte lands in ``record.raw``."""

    def __init__(self, sock: socket.socket, record: Recording, deadline: float) -> None:
        self.sock = sock
        self.record = record
        self.deadline = deadline
        self.buffer = bytearray()
        sock.settimeout(0.25)

    def fill(self) -> bool:
        """Read one chunk; False on EOF or deadline."""
        for _ in range(MAX_READS):
            if time.monotonic() > self.deadline:
                return False
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return False
            if not data:
                self.record.closed_by_client = True
                return False
            self.record.raw += data
            self.buffer += data
            return True
        return False

    def take(self, n: int) -> bytes | None:
        for _ in range(MAX_READS):
            if len(self.buffer) >= n:
                out = bytes(self.buffer[:n])
                del self.buffer[:n]
                return out
            if not self.fill():
                return None
        return None

    def take_all(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


class _LoopbackServer:
    """A listener on 127.0.0.1 with one handler thread per connection, bounded in time.

    Subclasses set their own state, then call ``super().__init__()`` (which starts
    accepting), and implement ``_register`` (per-connection bookkeeping, in the
    acceptor) and ``_handle`` (the conversation, in its own thread).
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.02)  # how soon close() is noticed
        self.port = int(self.sock.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)
        self.sock.close()

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            state = self._register()
            thread = threading.Thread(target=self._handle, args=(client, state), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _register(self) -> Any:
        raise NotImplementedError

    def _handle(self, client: socket.socket, state: Any) -> None:
        raise NotImplementedError


class HostileServer(_LoopbackServer):
    """A fake PostgreSQL server that misbehaves in one chosen way.

    ``behaviour``:
      - ``"downgrade"``: answer ``N`` to the SSLRequest (no TLS), then record whatever follows;
      - ``"tls"``: complete TLS with ``leaf`` (any CA, any name) then ask for the password in
        cleartext (``AuthenticationCleartextPassword``), the phishing a MITM would do, and
        answer it with "password authentication failed";
      - ``"garbage"``: complete TLS, then answer the startup packet with random bytes;
      - ``"silent"``: complete TLS, then say nothing (the client must time out).
    A client that opens TLS directly (``sslnegotiation=direct``) is served the same way.
    ``alpn``: the protocols the server may select (``()``: no ALPN, as no PostgreSQL server does).
    """

    def __init__(
        self,
        behaviour: str,
        leaf: LeafPair | None = None,
        *,
        max_protocol: str | None = None,
        alpn: tuple[str, ...] = ("postgresql",),
    ) -> None:
        if behaviour not in {"downgrade", "tls", "garbage", "silent"}:
            raise ValueError(behaviour)
        if behaviour != "downgrade" and leaf is None:
            raise ValueError("a TLS behaviour needs a leaf certificate")
        self.behaviour = behaviour
        self.context = self._context(leaf, max_protocol, alpn) if leaf else None
        self.recordings: list[Recording] = []
        self._lock = threading.Lock()
        super().__init__()

    @staticmethod
    def _context(leaf: LeafPair, max_protocol: str | None, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))  # libpq requires postgresql for direct TLS
        if max_protocol == "TLSv1.1":
            with warnings.catch_warnings():  # deprecated on purpose: that is the attack
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ssl.TLSVersion.TLSv1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 disables TLS < 1.2 otherwise
        with tempfile.TemporaryDirectory(prefix="spb-hostile-") as tmp:
            cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert.write_bytes(leaf.cert_chain_pem)
            key.write_bytes(leaf.key_pem)
            os.chmod(key, 0o600)
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    # -- lifecycle ---------------------------------------------------------------
    def settle(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until every handler has finished recording its connection."""
        deadline = time.monotonic() + timeout
        for _ in range(50):
            threads = list(self._threads)
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            time.sleep(0.01)  # let the acceptor hand over a connection it just took
            backlog, _, _ = select.select([self.sock], [], [], 0)
            if (not backlog and len(self._threads) == len(threads)) or (
                time.monotonic() > deadline
            ):
                return

    def all_bytes(self) -> bytes:
        return b"".join(bytes(r.raw) + bytes(r.decrypted) for r in self.recordings)

    # -- serving -----------------------------------------------------------------
    def _register(self) -> Recording:
        record = Recording()
        with self._lock:
            self.recordings.append(record)
        return record

    def _handle(self, client: socket.socket, record: Recording) -> None:
        with client:
            conn = _Conn(client, record, time.monotonic() + CONNECTION_DEADLINE)
            try:
                self._negotiate(conn)
            except (OSError, ssl.SSLError) as exc:
                record.tls_error = record.tls_error or f"{type(exc).__name__}: {exc}"

    def _negotiate(self, conn: _Conn) -> None:
        for _ in range(4):  # GSSENCRequest, SSLRequest, then startup: a few packets at most
            if not conn.buffer and not conn.fill():
                return
            if conn.buffer[0] == TLS_HANDSHAKE_RECORD:
                conn.record.requests.append("direct-tls")
                self._tls(conn, conn.take_all())
                return
            head = conn.take(8)
            if head is None:
                return
            length, code = struct.unpack("!ii", head)
            if length == 8 and code == GSSENC_REQUEST_CODE:
                conn.record.requests.append("gssenc")
                conn.sock.sendall(b"N")
            elif length == 8 and code == SSL_REQUEST_CODE:
                conn.record.requests.append("ssl")
                if self.behaviour == "downgrade":
                    conn.sock.sendall(b"N")
                    continue
                conn.sock.sendall(b"S")
                self._tls(conn, conn.take_all())
                return
            else:  # a plaintext startup packet: keep it and everything after it
                conn.record.requests.append("startup")
                conn.take(max(0, length - 8))
                conn.sock.sendall(_cleartext_password_request())
                self._drain_plaintext(conn)
                return

    def _drain_plaintext(self, conn: _Conn) -> None:
        for _ in range(MAX_READS):
            if not conn.fill():
                return

    def _tls(self, conn: _Conn, already: bytes) -> None:
        assert self.context is not None
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        incoming.write(already)

        def flush() -> None:
            data = outgoing.read()
            if data:
                conn.sock.sendall(data)

        def pump() -> bool:
            if not conn.fill():
                return False
            incoming.write(conn.take_all())
            return True

        for _ in range(MAX_READS):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                if not pump():
                    return
            except ssl.SSLError as exc:  # the client refused our certificate (an alert)
                conn.record.tls_error = f"{exc.reason or exc}"
                flush()
                return
        else:
            return
        flush()
        conn.record.handshake_completed = True
        answered = False
        for _ in range(MAX_READS):
            try:
                data = tls.read(65536)
            except ssl.SSLWantReadError:
                flush()
                if not pump():
                    return
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                conn.record.closed_by_client = True
                return
            if not data:  # close_notify from the client
                conn.record.closed_by_client = True
                return
            conn.record.decrypted += data
            if answered and self.behaviour == "tls":
                # The password is in: refuse it as a real server would, so the client is told
                # at once instead of waiting out its connect_timeout.
                tls.write(_authentication_failed())
                flush()
                return
            if not answered and self.behaviour in {"tls", "garbage"}:
                answered = True
                if self.behaviour == "tls":
                    tls.write(_cleartext_password_request())
                else:  # no valid message type, and a huge length to tempt a long read
                    tls.write(b"\xff\x7f\xff\xff\xf0" + os.urandom(64))
                flush()


def _authentication_failed() -> bytes:
    # ErrorResponse: FATAL, SQLSTATE 28P01 (invalid_password), then the message.
    fields = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0"
    return b"E" + struct.pack("!i", 4 + len(fields)) + fields


def _cleartext_password_request() -> bytes:
    # 'R', length 8, AuthenticationCleartextPassword (3): the client would answer with it.
    return b"R" + struct.pack("!ii", 8, 3)


class RecordingProxy(_LoopbackServer):
    """A transparent TCP proxy that records what the client sends before TLS starts.

    Plaintext is recorded until the server answers the SSLRequest with ``S``; after that it
    records (but cannot read) the TLS records and passes every byte through unchanged.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.before_tls: list[bytes] = []  # per connection: client bytes before the 'S'
        self.first_tls_bytes: list[bytes] = []  # per connection: the client's first TLS bytes
        self.server_answers: list[bytes] = []  # per connection: the server's 1-byte answer
        self.after_tls: list[bytearray] = []
        super().__init__()

    def settle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _register(self) -> int:
        index = len(self.before_tls)
        self.before_tls.append(b"")
        self.first_tls_bytes.append(b"")
        self.server_answers.append(b"")
        self.after_tls.append(bytearray())
        return index

    def _handle(self, client: socket.socket, index: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        with client, upstream:
            tls_started = False
            deadline = time.monotonic() + CONNECTION_DEADLINE
            for _ in range(100_000):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is client:
                        if not tls_started:
                            self.before_tls[index] += data
                        else:
                            if not self.after_tls[index]:
                                self.first_tls_bytes[index] = data[:1]
                            self.after_tls[index] += data
                        upstream.sendall(data)
                    else:
                        if not tls_started:
                            self.server_answers[index] = data[:1]
                            tls_started = data[:1] == b"S"
                        client.sendall(data)

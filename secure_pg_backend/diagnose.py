"""After a TLS refusal: what the server presented, and why it was not trusted, in words.

libpq says "certificate verify failed" for an expired certificate, one from another CA, a
self-signed one and one not valid yet alike, and names only the first of a certificate's
names when the host name does not match. So, after libpq has refused (never on the success
path), a **diagnostic handshake** fetches the certificate the server presents and this module
says what is wrong with it: expired on DATE, not valid until DATE, self-signed, issued by a CA
that is not in the root certificate file (which holds N CAs, named when few), or valid for
NAMES but not HOST, with a fix for that case.

The diagnostic handshake goes in the way the refused attempt did (the SSLRequest and its one
byte ``S``, or TLS directly with ALPN ``postgresql`` for an endpoint that takes direct TLS),
sends the same SNI (the host name; none for an IP address or ``sslsni=0``), within a short
timeout that fits the connect's own (``min(2 s, connect_timeout)``, the whole exchange), and
sends nothing after the TLS handshake: never a startup packet, a user name or a secret, and
no client certificate. Python's ``ssl`` with ``CERT_NONE`` reads the certificate;
``cryptography`` decodes it. Nothing it learns is trusted: it only words the refusal.

Under load a refusing endpoint is refused once per request; it is probed once. Each endpoint
(host, address, port, way in) has one probe in flight at a time, shared by every thread that
asks meanwhile, and its answer is kept for ``TTL`` seconds.

Pool threads run this too (``pool`` explains its refusals there). A daemon thread inside Rust
code (``cryptography``) when the interpreter finalizes aborts the process (see ``base``), so
after ``atexit`` starts nothing new is decoded here, and a refusal is worded without it.
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .presented import (
    Diagnosis,
    Endpoint,
    Presented,
    is_ip,
    judge_hostname,
    judge_untrusted,
    load_bundle,
)

if TYPE_CHECKING:
    from .policy import Decision

__all__ = [
    "PROBE_TIMEOUT",
    "SSL_REQUEST",
    "TTL",
    "Diagnosis",
    "Endpoint",
    "Presented",
    "diagnose",
    "fetch_certificate",
    "forget",
    "probes_made",
]

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # length 8, code 80877103
ALPN = "postgresql"
PROBE_TIMEOUT = 2.0  # seconds, at most: the whole diagnostic exchange
MIN_PROBE = 0.05  # seconds: with less left of the refused connect's deadline, no probe
TTL = 10.0  # seconds an endpoint's answer is reused: a rotated certificate is seen soon
FEW_CAS = 5  # a root certificate file with this many CAs or fewer has them named
MAX_FIELD = 200  # characters of any one certificate field shown (the peer chose them)
DIAGNOSED = frozenset({"untrusted", "hostname"})  # the refusals a certificate explains


# -- the endpoint the refused attempt went to --------------------------------------------------
# psycopg's one line per attempt when several failed, then libpq's own words.
_ATTEMPT = re.compile(
    r"host: '(?P<host>[^']*)', port: (?:'(?P<port>[^']*)'|None), "
    r"hostaddr: (?:'(?P<addr>[^']*)'|None)"
)
_SERVER_AT = re.compile(
    r'server at "(?P<shown>[^"]*)"(?: \((?P<addr>[^)]*)\))?, port (?P<port>\d+)'
)


def _entries(params: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(host, hostaddr, port) per host entry, as libpq pairs the comma-separated lists."""

    def split(key: str) -> list[str]:
        value = params.get(key)
        return [part.strip() for part in str(value).split(",")] if value else []

    hosts, addrs, ports = split("host"), split("hostaddr"), split("port")
    count = max(len(hosts), len(addrs), 1)
    entries = []
    for i in range(count):
        port = ports[i] if i < len(ports) else (ports[0] if len(ports) == 1 else "5432")
        entries.append(
            (hosts[i] if i < len(hosts) else "", addrs[i] if i < len(addrs) else "", port)
        )
    return entries


def endpoint_of(segment: str, params: Mapping[str, Any], direct: bool) -> Endpoint | None:
    """The endpoint one failure message (one attempt) is about, with its host name."""
    sni = str(params.get("sslsni", "1")) != "0"
    attempt = _ATTEMPT.search(segment)
    at = _SERVER_AT.search(segment)
    host = addr = port = ""
    if attempt is not None:
        host, addr, port = attempt["host"], attempt["addr"] or "", attempt["port"] or ""
    if at is not None:
        addr = addr or at["addr"] or at["shown"]
        port = port or at["port"]
        if not host:  # libpq shows the address when it has one; the name is in the settings
            entries = _entries(params)
            for name, hostaddr, entry_port in entries:
                if at["shown"] in (name, hostaddr) and entry_port in ("", at["port"]):
                    host = name or hostaddr
                    break
            else:  # psycopg resolved the name to the address shown
                same_port = [name for name, _, entry_port in entries if entry_port == at["port"]]
                host = same_port[0] if len(same_port) == 1 and same_port[0] else at["shown"]
    if not host or not port.isdigit():
        return None
    return Endpoint(host, addr or host, int(port), direct, sni)


# -- the diagnostic handshake --------------------------------------------------------------------
class ProbeError(Exception):
    """The certificate could not be fetched; the message says why, for the refusal."""


def fetch_certificate(endpoint: Endpoint, timeout: float) -> bytes:
    """The DER certificate ``endpoint`` presents, read from the server's first flight.

    The SSLRequest (or TLS directly, with ALPN), the ClientHello, the server's answer, and the
    socket is closed: this side's Finished is never sent, so no handshake with a server the
    refusal doubts is ever completed, and nothing follows the ClientHello (no startup packet,
    no user name, no secret, no client certificate). TLS 1.3 decodes the server's flight on
    this side (``CERT_NONE``); TLS 1.2 sends its certificate in the clear, read from the
    records. The whole exchange fits in ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProbeError(f"no answer within {timeout:g} s")
        return remaining

    try:
        sock = socket.create_connection((endpoint.address, endpoint.port), timeout=left())
    except OSError as exc:
        raise ProbeError(f"could not connect again ({exc.strerror or exc})") from None
    try:
        if not endpoint.direct:
            sock.settimeout(left())
            sock.sendall(SSL_REQUEST)
            answer = sock.recv(1)
            if answer != b"S":
                raise ProbeError(f"it answered the SSLRequest with {answer!r}, not b'S'")
        return _first_flight(sock, endpoint, left)
    except TimeoutError:
        raise ProbeError(f"no answer within {timeout:g} s") from None
    except ssl.SSLError as exc:
        raise ProbeError(f"the TLS handshake failed ({exc.reason or exc})") from None
    except OSError as exc:
        raise ProbeError(f"the connection failed ({exc.strerror or exc})") from None
    finally:
        sock.close()  # everything the server sent was read: a plain end of stream (FIN)


def _first_flight(sock: socket.socket, endpoint: Endpoint, left: Callable[[], float]) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to read the certificate: the session is dropped
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if endpoint.direct:
        context.set_alpn_protocols([ALPN])
    sni = endpoint.host if endpoint.sni and not is_ip(endpoint.host) else None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    received = bytearray()
    for _ in range(256):
        try:
            tls.do_handshake()  # TLS 1.3: done on this side; its Finished stays in ``outgoing``
            der = tls.getpeercert(binary_form=True)
            if not der:
                raise ProbeError("it presented no certificate")
            return der
        except ssl.SSLWantReadError:
            pending = outgoing.read()
            if pending and received:
                der = _plaintext_certificate(bytes(received))
                if der is not None:  # TLS 1.2: its flight is in; this side's answer unsent
                    return der
                if _HELLO_RETRY not in received:  # anything but a second ClientHello: no
                    raise ProbeError("it sent no certificate before this side's turn") from None
            if pending:  # the ClientHello (a second one after a HelloRetryRequest)
                sock.settimeout(left())
                sock.sendall(pending)
            sock.settimeout(left())
            data = sock.recv(65536)
            if not data:
                raise ProbeError("it closed the connection during the handshake") from None
            received += data
            incoming.write(data)
    raise ProbeError("the handshake did not end")


_HANDSHAKE, _CERTIFICATE = 22, 11
# A TLS 1.3 HelloRetryRequest is a ServerHello with this random (RFC 8446, 4.1.3).
_HELLO_RETRY = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def _plaintext_certificate(data: bytes) -> bytes | None:
    """The first certificate of a TLS 1.2 Certificate message in the server's records (TLS 1.3
    encrypts it: never found there)."""
    messages, at = bytearray(), 0
    while at + 5 <= len(data) and data[at] == _HANDSHAKE:
        length = int.from_bytes(data[at + 3 : at + 5], "big")
        messages += data[at + 5 : at + 5 + length]
        at += 5 + length
    at = 0
    while at + 4 <= len(messages):
        kind, length = messages[at], int.from_bytes(messages[at + 1 : at + 4], "big")
        body = messages[at + 4 : at + 4 + length]
        if kind == _CERTIFICATE and len(body) >= 6:  # list length (3), first length (3), DER
            first = int.from_bytes(body[3:6], "big")
            return bytes(body[6 : 6 + first]) or None
        at += 4 + length
    return None


class _Probe:
    __slots__ = ("der", "done", "error", "expires")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.der: bytes | None = None
        self.error = ""
        self.expires = 0.0


_LOCK = threading.Lock()
_PROBES: dict[tuple[Any, ...], _Probe] = {}
_MADE = [0]  # diagnostic handshakes started by this process (tests, operators' curiosity)
_STOPPED = [False]


def probes_made() -> int:
    """How many diagnostic handshakes this process has made."""
    return _MADE[0]


def forget() -> None:
    """Drop every remembered answer (tests; after a fork, the parent's may not hold)."""
    global _LOCK
    _LOCK = threading.Lock()
    _PROBES.clear()


def presented_der(
    endpoint: Endpoint,
    timeout: float,
    fetch: Callable[[Endpoint, float], bytes] = fetch_certificate,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """The endpoint's certificate: remembered for ``TTL`` seconds, one probe in flight."""
    with _LOCK:
        probe = _PROBES.get(endpoint.key)
        if probe is not None and probe.done.is_set() and probe.expires <= clock():
            probe = None
        mine = probe is None
        if probe is None:
            if len(_PROBES) > 256:  # endpoints come and go (DNS): keep the table small
                _PROBES.clear()
            probe = _PROBES[endpoint.key] = _Probe()
            _MADE[0] += 1
    if mine:
        try:
            probe.der = fetch(endpoint, timeout)
        except ProbeError as exc:
            probe.error = str(exc)
        except Exception as exc:  # never let the diagnosis hide the refusal itself
            probe.error = f"{type(exc).__name__}: {exc}"
        finally:
            probe.expires = clock() + TTL
            probe.done.set()
    elif not probe.done.wait(timeout):
        raise ProbeError(f"no answer within {timeout:g} s")
    if probe.der is None:
        raise ProbeError(probe.error or "no certificate")
    return probe.der


# -- the refusal, diagnosed ----------------------------------------------------------------------
def _timeout(params: Mapping[str, Any]) -> float:
    try:
        connect_timeout = float(params.get("connect_timeout") or 0)
    except (TypeError, ValueError):
        connect_timeout = 0.0
    timeout = min(PROBE_TIMEOUT, connect_timeout) if connect_timeout > 0 else PROBE_TIMEOUT
    from .retry import time_left  # the refused connect's deadline (issue 30): it fits in it

    left = time_left()
    return timeout if left is None else min(timeout, left)


def _direct(decision: Decision | None, params: Mapping[str, Any]) -> bool:
    """Whether the refused attempt started TLS directly, as the next one will."""
    if str(params.get("sslnegotiation", "")) == "direct":
        return True
    from .handshake import goes_direct

    return goes_direct(decision)


def diagnose(
    segment: str,
    cause: str,
    decision: Decision | None,
    params: Mapping[str, Any],
    now: dt.datetime | None = None,
) -> Diagnosis | None:
    """The refusal ``segment`` (libpq's words for one attempt) explained by the certificate the
    server presents, or None when there is nothing to add (or it could not be fetched, said in
    a details line)."""
    if cause not in DIAGNOSED or decision is None or _STOPPED[0]:
        return None
    endpoint = endpoint_of(segment, params, _direct(decision, params))
    if endpoint is None:
        return None
    timeout = _timeout(params)
    if timeout < MIN_PROBE:  # the connect's deadline is spent: no closer look
        return None
    try:
        der = presented_der(endpoint, timeout)
    except ProbeError as exc:
        return Diagnosis(
            "",
            "",
            [f"Its certificate could not be fetched for a closer look: {exc}."],
        )
    if _STOPPED[0]:  # the interpreter began to exit while the probe ran: decode nothing
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    cert = Presented(der)
    if cause == "hostname":
        return judge_hostname(cert, endpoint)
    bundle = load_bundle(decision.root_cert, decision.root_cert_source)
    return judge_untrusted(cert, bundle, endpoint, now)


def _stop() -> None:
    _STOPPED[0] = True


atexit.register(_stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget)

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
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509

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
TTL = 10.0  # seconds an endpoint's answer is reused: a rotated certificate is seen soon
FEW_CAS = 5  # a root certificate file with this many CAs or fewer has them named
MAX_FIELD = 200  # characters of any one certificate field shown (the peer chose them)
DIAGNOSED = frozenset({"untrusted", "hostname"})  # the refusals a certificate explains


# -- text the peer chose, made safe to print ---------------------------------------------------
def shown(text: str, limit: int = MAX_FIELD) -> str:
    """A certificate field as one printable line, by the package's one rule for certificate
    text (``certificates.certificate_text``: control, line-breaking and bidi characters as OpenSSL
    escapes them, ``\\0A``), so a hostile certificate cannot forge a log line or move a
    terminal; and no longer than ``limit``."""
    from .certificates import certificate_text

    safe = certificate_text(text)
    return safe if len(safe) <= limit else safe[: limit - 1] + "…"


def quoted(text: str, limit: int = MAX_FIELD) -> str:
    """A certificate field in quotes, escaped once (``repr`` would double the escapes)."""
    return f"'{shown(text, limit)}'"


def day(moment: dt.datetime) -> str:
    """YYYY-MM-DD, as the log line writes dates."""
    return moment.strftime("%Y-%m-%d")


# -- the certificate, decoded ------------------------------------------------------------------
class Presented:
    """The leaf certificate a server presented, as far as the diagnosis needs it."""

    __slots__ = (
        "fingerprint",
        "issuer",
        "issuer_name",
        "names",
        "not_after",
        "not_before",
        "self_signed",
        "subject",
        "x509",
    )

    def __init__(self, der: bytes) -> None:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        self.x509 = cert
        self.subject = shown(cert.subject.rfc4514_string())
        self.issuer = shown(cert.issuer.rfc4514_string())
        self.issuer_name = cert.issuer
        self.not_before = cert.not_valid_before_utc
        self.not_after = cert.not_valid_after_utc
        self.fingerprint = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        self.names = _names(cert)
        self.self_signed = cert.issuer == cert.subject and _signed_by(cert, cert)

    @property
    def short_subject(self) -> str:
        return _short(self.x509.subject)

    @property
    def short_issuer(self) -> str:
        return _short(self.x509.issuer)

    def summary(self) -> str:
        names = ", ".join(shown(n, 80) for n in self.names[:8]) or "no name"
        if len(self.names) > 8:
            names += f" and {len(self.names) - 8} more"
        return (
            f"The server presented: subject {self.subject}; issuer {self.issuer}; valid for "
            f"{names}; valid from {day(self.not_before)} to {day(self.not_after)}."
        )


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    """What libpq matches the host name against: the SAN's DNS names and IP addresses, or the
    common name when the certificate has no SAN names."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        san = None
    if san is not None:
        found = [*san.get_values_for_type(x509.DNSName)]
        found += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        if found:
            return tuple(found)
    return tuple(
        str(attribute.value)
        for attribute in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # another key, another name, an algorithm cryptography does not do
        return False
    return True


def _short(name: x509.Name) -> str:
    """A name as people say it: its common name, else its organization(al unit), else whole."""
    from cryptography import x509

    for oid in (
        x509.NameOID.COMMON_NAME,
        x509.NameOID.ORGANIZATIONAL_UNIT_NAME,
        x509.NameOID.ORGANIZATION_NAME,
    ):
        values = name.get_attributes_for_oid(oid)
        if values:
            return quoted(str(values[0].value), 120)
    return quoted(name.rfc4514_string(), 120)


# -- the root certificate file -------------------------------------------------------------------
class Bundle:
    """The CAs a root certificate file holds, as the diagnosis describes them."""

    __slots__ = ("cas", "error", "origin", "path")

    def __init__(
        self, path: str, origin: str, cas: Sequence[x509.Certificate], error: str | None = None
    ) -> None:
        self.path = path
        self.origin = origin
        self.cas = tuple(cas)
        self.error = error

    def describe(self, count: bool = True) -> str:
        """``OPTIONS['sslrootcert'] ('/etc/ca.pem'), which holds 2 CAs: 'A', 'B'``."""
        where = f"{self.origin} ('{shown(self.path)}'"
        if not os.path.isabs(self.path):
            where += f", a relative path, resolved against {os.getcwd()!r}"
        where += ")"
        if self.error:
            return f"{where}, which could not be read: {self.error}"
        return f"{where}, which holds {self.held()}" if count else where

    def held(self) -> str:
        """``2 CAs: 'A', 'B'`` (named when few)."""
        if self.error:
            return "nothing readable"
        count = len(self.cas)
        text = f"{count} CA{'s' if count != 1 else ''}"
        if 0 < count <= FEW_CAS:
            text += ": " + ", ".join(_short(ca.subject) for ca in self.cas)
        return text


_BUNDLES: dict[tuple[str, int, int], tuple[Any, ...]] = {}
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _certificates(data: bytes) -> Iterator[x509.Certificate]:
    """Each certificate OpenSSL would load, one at a time: a system store holds a few that
    cryptography refuses, or warns about (a negative serial number), and they must not
    hide the others."""
    from cryptography import x509

    for block in _PEM.findall(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                yield x509.load_pem_x509_certificate(block)
            except ValueError:
                continue


def load_bundle(path: str, origin: str) -> Bundle:
    """The CAs of ``path``, parsed once per version of the file (the system store is large)."""
    try:
        info = os.stat(path)
        key = (path, info.st_mtime_ns, info.st_size)
        cas = _BUNDLES.get(key)
        if cas is None:
            with open(path, "rb") as handle:
                data = handle.read(16 * 1024 * 1024)
            cas = tuple(_certificates(data))
            if len(_BUNDLES) > 8:  # rotated bundles leave old entries behind
                _BUNDLES.clear()
            _BUNDLES[key] = cas
    except (OSError, ValueError) as exc:
        return Bundle(path, origin, (), shown(str(exc)))
    return Bundle(path, origin, cas)


# -- the endpoint the refused attempt went to --------------------------------------------------
class Endpoint:
    """Where the refused attempt went: the host name (SNI, and the name checked), the address
    connected to, the port, and whether TLS started directly."""

    __slots__ = ("address", "direct", "host", "port", "sni")

    def __init__(self, host: str, address: str, port: int, direct: bool, sni: bool = True) -> None:
        self.host = host
        self.address = address
        self.port = port
        self.direct = direct
        self.sni = sni

    @property
    def key(self) -> tuple[str, str, int, bool, bool]:
        return (self.host, self.address, self.port, self.direct, self.sni)

    def __repr__(self) -> str:
        return f"Endpoint({self.host!r}, {self.address!r}, {self.port}, direct={self.direct})"


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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


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
    sni = endpoint.host if endpoint.sni and not _is_ip(endpoint.host) else None
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


# -- the diagnosis --------------------------------------------------------------------------------
class Diagnosis:
    """A refusal in words: the first sentence's problem and fix, then details lines."""

    __slots__ = ("details", "fix", "presented", "problem")

    def __init__(
        self,
        problem: str,
        fix: str,
        details: Sequence[str] = (),
        presented: Presented | None = None,
    ) -> None:
        self.problem = problem
        self.fix = fix
        self.details = tuple(details)
        self.presented = presented


MITM = "a machine in the middle"


def judge_untrusted(
    cert: Presented, bundle: Bundle, endpoint: Endpoint, now: dt.datetime
) -> Diagnosis:
    """Why a chain libpq refused was refused: the reason OpenSSL would give, in words."""
    details = [cert.summary()]
    if cert.not_after < now:
        return Diagnosis(
            f"the server's certificate expired on {day(cert.not_after)}.",
            "renew it on the server (or ask your provider to); no setting here can accept it.",
            details,
            cert,
        )
    if cert.not_before > now:
        details.append(
            "A certificate dated in the future comes from a machine whose clock was ahead, "
            "or reaches one whose clock is behind."
        )
        return Diagnosis(
            f"the server's certificate is not valid until {day(cert.not_before)}, and this "
            f"machine's clock says {day(now)}.",
            "set the clocks right (NTP) on this machine and on the server that issued it.",
            details,
            cert,
        )
    if cert.self_signed:
        other = any(ca.subject == cert.x509.subject for ca in bundle.cas)
        way_in = "-alpn postgresql" if endpoint.direct else "-starttls postgres"
        details += [
            f"Its SHA-256 fingerprint: {cert.fingerprint}.",
            f"Your root certificate file: {bundle.describe()}.",
            "To pin it: save it (openssl s_client "
            f"{way_in} -connect {endpoint.host}:{endpoint.port} -showcerts) and set "
            "OPTIONS['sslrootcert'] to that file, after comparing its fingerprint with the "
            "server's administrator. Pinned, this one certificate is the root of trust: the "
            "connection is refused after each renewal until the file is replaced. Heroku "
            "Postgres offers verifiable certificates instead (Enhanced Certificates).",
        ]
        return Diagnosis(
            f"the server presents a self-signed certificate ({cert.short_subject}), which no "
            "CA vouches for"
            + (
                " (your root certificate file holds one of that name, but not this one)."
                if other
                else "."
            ),
            "use your provider's verifiable certificate where it offers one, or pin this one "
            "as the root of trust (below).",
            details,
            cert,
        )
    details.append(f"Your root certificate file: {bundle.describe(count=False)}.")
    same_name = [ca for ca in bundle.cas if ca.subject == cert.issuer_name]
    if not same_name:
        from .hosting import by_issuer

        provider = by_issuer(cert.issuer)
        details.append(
            f"If you did not expect {cert.short_issuer}, something between you and the "
            f"server presents its own certificate ({MITM}): do not trust it."
        )
        return Diagnosis(
            f"the server's certificate is issued by {cert.short_issuer}, which is not in your "
            f"root certificate file ({bundle.held()}).",
            f"set OPTIONS['sslrootcert'] to {provider.name}'s CA bundle ({provider.bundle})."
            if provider is not None
            else "set OPTIONS['sslrootcert'] to the CA bundle your provider publishes for "
            "this server.",
            details,
            cert,
        )
    signer = next((ca for ca in same_name if _signed_by(cert.x509, ca)), None)
    if signer is None:
        return Diagnosis(
            f"the server's certificate names {cert.short_issuer} as its issuer, but the CA of "
            "that name in your root certificate file did not sign it (another key: a CA made "
            f"again, or {MITM}).",
            "download your provider's CA bundle again and point OPTIONS['sslrootcert'] at it.",
            details,
            cert,
        )
    if signer.not_valid_after_utc < now:
        return Diagnosis(
            f"the CA {cert.short_issuer} in your root certificate file expired on "
            f"{day(signer.not_valid_after_utc)}.",
            "replace the root certificate file with your provider's current CA bundle.",
            details,
            cert,
        )
    return Diagnosis(
        f"the server's certificate is issued by {cert.short_issuer}, which is in your root "
        "certificate file, yet OpenSSL refused it (revoked in OPTIONS['sslcrl'], a key usage "
        "that forbids it, or a CA of its chain that is not valid).",
        "check OPTIONS['sslcrl'], and the certificate with your provider.",
        details,
        cert,
    )


def judge_hostname(cert: Presented, endpoint: Endpoint) -> Diagnosis:
    """A trusted certificate for other names: say which, and the fix for this kind of HOST."""
    host = endpoint.host
    listed = ", ".join(quoted(n, 80) for n in cert.names[:8]) or "no name at all"
    if len(cert.names) > 8:
        listed += f" and {len(cert.names) - 8} more"
    # The name to suggest: a DNS name (not a wildcard), one that reaches another machine if any.
    dns = [n for n in cert.names if not _is_ip(n) and not n.startswith("*")] or ["NAME"]
    name = shown(next((n for n in dns if n != "localhost"), dns[0]), 80)
    details = [cert.summary()]
    if _is_ip(host):
        problem = (
            f"the server's certificate is valid for {listed}, but not for the IP address "
            f"{host!r} in HOST."
        )
        fix = (
            f"set HOST to '{name}' (a name on the certificate) and OPTIONS['hostaddr'] to {host!r}."
        )
        details.append(
            "With the name in HOST and the address in OPTIONS['hostaddr'], the connection "
            "still goes to that address, and the certificate is checked against the name."
        )
    elif "." not in host and host != "localhost":
        problem = (
            f"the server's certificate is valid for {listed}, but not for {host!r}, a local "
            "alias (a compose service or /etc/hosts name)."
        )
        fix = (
            f"set HOST to '{name}' and make that name reach the server (a compose network "
            f"alias, or OPTIONS['hostaddr']), or give the server a certificate naming {host!r}."
        )
        if endpoint.address and endpoint.address != host:
            details.append(f"{host!r} resolved to {endpoint.address!r} for this attempt.")
    else:
        problem = f"the server's certificate is valid for {listed}, but not for {host!r}."
        fix = (
            f"set HOST to a name on the certificate ('{name}'); OPTIONS['hostaddr'] can keep "
            "the address."
        )
        details.append(
            f"If {host!r} is the right name, the server presents the wrong certificate, or "
            f"something between you and it presents its own ({MITM})."
        )
    return Diagnosis(problem, fix, details, cert)


# -- the refusal, diagnosed ----------------------------------------------------------------------
def _timeout(params: Mapping[str, Any]) -> float:
    try:
        connect_timeout = float(params.get("connect_timeout") or 0)
    except (TypeError, ValueError):
        connect_timeout = 0.0
    return min(PROBE_TIMEOUT, connect_timeout) if connect_timeout > 0 else PROBE_TIMEOUT


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
    try:
        der = presented_der(endpoint, _timeout(params))
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

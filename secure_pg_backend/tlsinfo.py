"""Live-link inspection: the public report of what a connection negotiated (``TLSInfo``).

Built on demand (``connection.tls_info``, a log record that will be emitted, a signal
receiver), so this module is not imported on a cold start that inspects nothing.
Everything here reads the client side of the established connection through libpq;
nothing sends SQL. Behind PgBouncer that is the Django-to-PgBouncer leg, which is the leg
this process is responsible for (``pg_stat_ssl`` would describe PgBouncer's own link to
the server instead).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from . import certificates, libpq
from .certificates import EXPIRY_WARNING_DAYS, certificate_not_after, days_left, expiring
from .handshake import LinkFacts
from .policy import Decision

if TYPE_CHECKING:  # cryptography is imported only when a certificate is parsed
    from cryptography import x509

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "ClientCertificate",
    "PeerCertificate",
    "TLSInfo",
    "inspect_connection",
]

T = TypeVar("T")


def _memo(obj: object, name: str, compute: Callable[[], T]) -> T:
    """Compute once per instance (frozen dataclasses too), without a lock.

    Not ``functools.cached_property``: before Python 3.12 it takes one lock shared by all
    instances, which a fork can leave held forever in the child. Two threads racing here
    just compute the same value twice.
    """
    try:
        return obj.__dict__[name]  # type: ignore[no-any-return]
    except KeyError:
        value = obj.__dict__[name] = compute()
        return value


@dataclass(frozen=True)
class PeerCertificate:
    """The server's leaf certificate as presented in this TLS session.

    Its names are text for people and logs: RFC 4514 strings (SANs ``DNS:name``) with every
    control character escaped as OpenSSL escapes it (``certificates.certificate_text``: a newline is
    ``\\0A``). The names exactly as the certificate holds them: ``certificate()``.
    """

    subject: str
    issuer: str
    subject_alt_names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    serial_number: int
    sha256_fingerprint: str
    der: bytes = field(default=b"", repr=False, compare=False)  # the certificate itself

    @classmethod
    def from_der(cls, der: bytes) -> PeerCertificate:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        try:
            san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            sans = tuple(
                [f"DNS:{n}" for n in san_ext.value.get_values_for_type(x509.DNSName)]
                + [f"IP:{ip}" for ip in san_ext.value.get_values_for_type(x509.IPAddress)]
            )
        except x509.ExtensionNotFound:
            sans = ()
        text = certificates.certificate_text
        return cls(
            subject=text(cert.subject.rfc4514_string()),
            issuer=text(cert.issuer.rfc4514_string()),
            subject_alt_names=tuple(text(name) for name in sans),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial_number=cert.serial_number,
            sha256_fingerprint=hashlib.sha256(der).hexdigest(),
            der=der,
        )

    def certificate(self) -> x509.Certificate:
        """The certificate itself (``cryptography``), raw names and all: for code that checks
        it, never for display (``subject`` and ``issuer`` are the displayable forms)."""
        from cryptography import x509

        return x509.load_der_x509_certificate(self.der)

    def days_left(self, now: dt.datetime | None = None) -> int:
        return days_left(self.not_after, now)

    def expires_soon(self, now: dt.datetime | None = None) -> bool:
        return expiring(self.not_after, now)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["not_before"] = self.not_before.isoformat()
        data["not_after"] = self.not_after.isoformat()
        data["subject_alt_names"] = list(self.subject_alt_names)
        data["serial_number"] = format(self.serial_number, "x")
        del data["der"]  # JSON: the certificate's PEM is for code that asks for it
        return data


@dataclass(frozen=True)
class ClientCertificate:
    """The certificate this side holds in the TLS session (``OPTIONS['sslcert']``, or libpq's
    default ``~/.postgresql/postgresql.crt``), sent when the server asks for one.

    Read from the live session by its own OpenSSL (names, validity) when the report is built,
    so describing it never imports ``cryptography``. Names escaped as ``PeerCertificate``'s.
    """

    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    sha256_fingerprint: str  # lower-case hex, as PeerCertificate's
    der: bytes = field(default=b"", repr=False, compare=False)  # the certificate itself

    @classmethod
    def from_der(cls, der: bytes) -> ClientCertificate:
        """The fallback where libpq's OpenSSL lacks the functions to describe it."""
        peer = PeerCertificate.from_der(der)
        return cls(
            peer.subject, peer.issuer, peer.not_before, peer.not_after, peer.sha256_fingerprint, der
        )

    def certificate(self) -> x509.Certificate:
        """The certificate itself (``cryptography``), raw names and all; not for display."""
        from cryptography import x509

        return x509.load_der_x509_certificate(self.der)

    def time_left(self, now: dt.datetime | None = None) -> dt.timedelta:
        return self.not_after - (now or dt.datetime.now(dt.timezone.utc))

    def expires_soon(self, now: dt.datetime | None = None) -> bool:
        """Less than a third of its lifetime and fewer than ``EXPIRY_WARNING_DAYS`` days left:
        its renewal is overdue (the one rule, ``certificates.expiring``)."""
        return expiring(self.not_after, now, self.not_before)

    def expiry_text(self, now: dt.datetime | None = None) -> str:
        """``expires 2026-01-31 14:05 UTC, in 3 hours``: in hours and minutes, since client
        certificates often live less than a day."""
        left = self.time_left(now)
        when = f"{self.not_after:%Y-%m-%d %H:%M} UTC"
        if left < dt.timedelta(0):
            return f"expired {when}, {_duration(-left)} ago"
        return f"expires {when}, in {_duration(left)}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["not_before"] = self.not_before.isoformat()
        data["not_after"] = self.not_after.isoformat()
        del data["der"]
        return data


def _duration(span: dt.timedelta) -> str:
    """Two days or more in days, then hours, then minutes: what an operator acts on."""

    def unit(count: int, name: str) -> str:
        return f"{count} {name}{'s' if count != 1 else ''}"

    seconds = int(span.total_seconds())
    if seconds >= 2 * 86400:
        return unit(seconds // 86400, "day")
    if seconds >= 2 * 3600:
        return unit(seconds // 3600, "hour")
    if seconds >= 3600:
        return f"{unit(seconds // 3600, 'hour')} {unit(seconds % 3600 // 60, 'minute')}"
    return unit(seconds // 60, "minute")


@dataclass(frozen=True)
class TLSInfo:
    """What was negotiated on one physical connection, and the policy in force."""

    alias: str
    # "tls"; or, opted in and without TLS: "unix-socket", "local-proxy" (a loopback sidecar
    # that does the verified TLS to the server itself)
    transport: str
    protocol: str | None
    cipher: str | None
    key_bits: int | None
    compression: bool
    alpn: str | None
    library: str | None
    host: str
    hostaddr: str | None
    port: int | None
    database: str
    sslmode: str
    min_protocol: str
    root_cert: str
    root_cert_source: str
    gssencmode: str = "disable"
    sslnegotiation: str = "postgres"
    user: str = ""  # the user libpq sent (a password provider's, when it returned one)
    client_certificate: ClientCertificate | None = None  # None: this side presented none
    _peer_der: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def tls(self) -> bool:
        return self.transport == "tls"

    @property
    def endpoint(self) -> str:
        """``host:port``, with the address reached when it differs from the name."""
        where = f"{self.host}:{self.port}" if self.port else self.host
        if self.hostaddr and self.hostaddr != self.host:
            where += f" ({self.hostaddr})"
        return where

    @property
    def peer_certificate(self) -> PeerCertificate | None:
        """Parsed (with ``cryptography``) on first access; the DER was copied while the
        session was live. For the expiry alone, ``not_after`` is much cheaper."""
        der = self._peer_der
        return _memo(
            self, "_peer_certificate", lambda: PeerCertificate.from_der(der) if der else None
        )

    @property
    def peer_certificate_der(self) -> bytes | None:
        """The server certificate as presented (DER), raw names and all; None without TLS."""
        return self._peer_der

    @property
    def not_after(self) -> dt.datetime | None:
        """When the server certificate expires (UTC); None without TLS.

        Decoded by the OpenSSL of this TLS session, so the connection path (the start-up log
        line, the expiry warning, metrics) never imports ``cryptography``; the full parse is
        the fallback where that OpenSSL lacks the functions.
        """
        der = self._peer_der
        return _memo(self, "_not_after", lambda: certificate_not_after(der) if der else None)

    def days_left(self, now: dt.datetime | None = None) -> int | None:
        """Whole days until the server certificate expires (negative once expired)."""
        not_after = self.not_after
        return None if not_after is None else days_left(not_after, now)

    def expires_soon(self, now: dt.datetime | None = None) -> bool:
        """Within ``EXPIRY_WARNING_DAYS`` of expiry (or expired)."""
        not_after = self.not_after
        return not_after is not None and expiring(not_after, now)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable; contains no secret (the password is never read)."""
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        cert = self.peer_certificate
        data["peer_certificate"] = cert.as_dict() if cert else None
        client = self.client_certificate
        data["client_certificate"] = client.as_dict() if client else None
        return data

    # -- the wording: every way a report is shown, together ----------------------------------
    def expiry_text(self, now: dt.datetime | None = None) -> str:
        """``expires 2026-01-31, in 12 days`` (the log line, dbtls, W001, the health check);
        from ``not_after``, never the parsed certificate."""
        not_after, days = self.not_after, self.days_left(now)
        if not_after is None or days is None:
            return ""
        return f"expires {not_after:%Y-%m-%d}, in {days} day{'s' if days != 1 else ''}"

    def log_line(self) -> str:
        """The start-up log line's message (``signals.announce``)."""
        if self.transport == LOCAL_PROXY:
            link = (
                "over loopback TCP WITHOUT TLS to a local proxy, whose own TLS to the server "
                "is the encryption (allow_local_proxy)"
            )
        elif not self.tls:
            link = "over a Unix-domain socket WITHOUT TLS (allow_unix_socket)"
        else:
            link = f"with {self.protocol} {self.cipher} ({self.key_bits}-bit)"
        text = (
            f"database alias {self.alias!r} connected to {self.endpoint} database "
            f"{self.database!r} as user {self.user!r} {link}, sslmode={self.sslmode}"
        )
        if self.transport != LOCAL_PROXY:  # no root certificate: the sidecar verifies
            text += f", root certificate {self.root_cert} ({self.root_cert_source})"
        expiry = self.expiry_text()
        if expiry:
            text = f"{text}; server certificate {expiry}"
        return text + self._client_text()

    def _client_text(self) -> str:
        client = self.client_certificate
        if client is None:
            return ""
        return f"; client certificate {client.subject}, {client.expiry_text()}"

    def status_line(self) -> str:
        """``manage.py dbtls``'s line: the banner, then where, what was trusted and the server
        certificate (parsed: its subject is shown)."""
        parts = [
            f"{self.alias}: {self.summary()}",
            f"host {self.endpoint}",
            f"database {self.database!r}",
            f"user {self.user!r}",
        ]
        if self.transport != LOCAL_PROXY:
            parts.append(f"root certificate {self.root_cert} ({self.root_cert_source})")
        cert = self.peer_certificate
        if cert is not None:
            parts.append(f"server certificate {cert.subject}, {self.expiry_text()}")
        return "; ".join(parts) + self._client_text()

    def summary(self) -> str:
        """psql's banner style: ``SSL connection (protocol: TLSv1.3, cipher: …)``."""
        if self.transport == LOCAL_PROXY:
            return (
                f"local proxy at {self.endpoint} (no TLS on this loopback leg; the encryption "
                "to the server is the proxy's; allowed by OPTIONS['allow_local_proxy'])"
            )
        if not self.tls:
            return (
                f"Unix-domain socket {self.host} (no TLS; allowed by OPTIONS['allow_unix_socket'])"
            )
        alpn = self.alpn or "none"
        return (
            f"SSL connection (protocol: {self.protocol}, cipher: {self.cipher}, "
            f"bits: {self.key_bits}, compression: {'on' if self.compression else 'off'}, "
            f"ALPN: {alpn})"
        )


def inspect_connection(pgconn: Any, facts: LinkFacts, decision: Decision) -> TLSInfo:
    """Build the ``TLSInfo`` for an established (already policy-checked) connection."""
    attrs: dict[str, str | None] = {}
    der = client = None
    ptr = pgconn.pgconn_ptr  # None once the connection is closed: nothing left to read
    if facts.ssl_in_use and ptr:
        attrs = libpq.ssl_attributes(ptr)
        der = certificates.peer_certificate_der(ptr)
        client = _client_certificate(ptr)
    # psycopg's ConnectionInfo: its port is libpq's compiled default where PQport is empty
    # (a connection with no PORT anywhere), not None.
    link = psycopg.ConnectionInfo(pgconn)
    try:
        port: int | None = link.port
    except psycopg.Error:  # pragma: no cover - neither PQport nor a compiled default
        port = None
    bits = attrs.get("key_bits")
    effective = facts.effective
    return TLSInfo(
        alias=decision.alias,
        transport=_transport(facts, decision),
        protocol=facts.protocol,
        cipher=facts.cipher,
        key_bits=int(bits) if bits else None,
        compression=attrs.get("compression") == "on",
        alpn=attrs.get("alpn") or None,
        library=attrs.get("library"),
        host=facts.host,
        hostaddr=link.hostaddr or None,
        port=port,
        database=link.dbname,
        sslmode=effective.get("sslmode", ""),
        min_protocol=effective.get("ssl_min_protocol_version", ""),
        root_cert=effective.get("sslrootcert", ""),
        root_cert_source=decision.root_cert_source,
        gssencmode=effective.get("gssencmode", ""),
        sslnegotiation=effective.get("sslnegotiation", "postgres"),
        user=link.user,
        client_certificate=client,
        _peer_der=der,
    )


LOCAL_PROXY = "local-proxy"


def _transport(facts: LinkFacts, decision: Decision) -> str:
    if facts.unix_socket:
        return "unix-socket"
    if decision.allow_local_proxy and not facts.ssl_in_use:  # the link check saw loopback
        return LOCAL_PROXY
    return "tls"


def _client_certificate(ptr: int) -> ClientCertificate | None:
    """The client certificate of the live session, described by its OpenSSL."""
    der = certificates.client_certificate_der(ptr)
    if der is None:
        return None
    names, validity = (
        certificates.client_certificate_names(ptr),
        certificates._session_client_validity(ptr),
    )
    if names is None or validity is None:
        return ClientCertificate.from_der(der)
    return ClientCertificate(
        subject=names[0],  # escaped by certificates.certificate_text, as every certificate name
        issuer=names[1],
        not_before=validity[0],
        not_after=validity[1],
        sha256_fingerprint=hashlib.sha256(der).hexdigest(),
        der=der,
    )

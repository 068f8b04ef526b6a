"""What a refusing server presented, in words: its certificate decoded, the root certificate
file read, and the verdict (expired on DATE, not valid until DATE, self-signed, issued by a CA
that is not in the file, or valid for NAMES but not HOST) with a fix for that case. The
diagnostic handshake that fetches the certificate is ``diagnose``'s."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "Bundle",
    "Diagnosis",
    "Endpoint",
    "Presented",
    "day",
    "is_ip",
    "judge_hostname",
    "judge_untrusted",
    "load_bundle",
    "quoted",
    "shown",
]

FEW_CAS = 5  # a root certificate file with this many CAs or fewer has them named
MAX_FIELD = 200  # characters of any one certificate field shown (the peer chose them)


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
    dns = [n for n in cert.names if not is_ip(n) and not n.startswith("*")] or ["NAME"]
    name = shown(next((n for n in dns if n != "localhost"), dns[0]), 80)
    details = [cert.summary()]
    if is_ip(host):
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


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True

"""``/tls/``: what every alias using secure_pg_backend negotiated, as a page or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from secure_pg_backend.base import DatabaseWrapper
from secure_pg_backend.errors import redact, secret_values
from secure_pg_backend.tlsinfo import TLSInfo

MONO_LABELS = ("Serial number", "SHA-256 fingerprint")


@dataclass
class AliasReport:
    alias: str
    info: TLSInfo | None = None
    error: str = ""
    connection_rows: list[tuple[str, str]] = field(default_factory=list)
    certificate_rows: list[tuple[str, str]] = field(default_factory=list)
    expiry: str = ""
    expiring_soon: bool = False

    def as_json(self) -> dict[str, Any]:
        return self.info.as_dict() if self.info else {"error": self.error}


def _colon_hex(hex_digits: str, per_line: int = 16) -> str:
    """Colon-separated bytes, as browsers and openssl show them; newlines keep rows readable."""
    hex_digits = hex_digits.upper().rjust(len(hex_digits) + len(hex_digits) % 2, "0")
    pairs = [hex_digits[i : i + 2] for i in range(0, len(hex_digits), 2)]
    lines = [":".join(pairs[i : i + per_line]) for i in range(0, len(pairs), per_line)]
    return ":\n".join(lines)


def _report(alias: str, wrapper: DatabaseWrapper) -> AliasReport:
    try:
        info = wrapper.tls_info
    except (DatabaseError, ImproperlyConfigured) as exc:
        # A refusal's first line is what is wrong and the fix; its details follow on lines of
        # their own (the page shows them so).
        lines = (" ".join(line.split()) for line in str(exc).splitlines())
        text = "\n".join(line for line in lines if line)
        return AliasReport(alias, error=redact(text, secret_values(wrapper.settings_dict)))
    report = AliasReport(alias, info=info)
    report.connection_rows = [
        ("Transport", "TLS" if info.tls else "Unix-domain socket, no TLS (opted in)"),
        ("Protocol", info.protocol or "—"),
        ("Cipher", info.cipher or "—"),
        ("Key bits", str(info.key_bits or "—")),
        ("Compression", "on" if info.compression else "off"),
        ("ALPN", info.alpn or "none"),
        ("TLS library", info.library or "—"),
        ("Server", info.endpoint),
        ("Database", info.database),
        ("sslmode", info.sslmode),
        ("Minimum protocol", info.min_protocol),
        ("Root certificate", info.root_cert),
        ("Root certificate from", info.root_cert_source),
    ]
    cert = info.peer_certificate
    if cert is not None:
        report.expiry = info.expiry_text()
        report.expiring_soon = cert.expires_soon()
        report.certificate_rows = [
            ("Subject", cert.subject),
            ("Issuer", cert.issuer),
            ("Alternative names", ", ".join(cert.subject_alt_names) or "—"),
            ("Valid from", f"{cert.not_before:%Y-%m-%d %H:%M} UTC"),
            ("Valid until", f"{cert.not_after:%Y-%m-%d %H:%M} UTC"),
            ("Serial number", _colon_hex(format(cert.serial_number, "x"))),
            ("SHA-256 fingerprint", _colon_hex(cert.sha256_fingerprint)),
        ]
    return report


def tls(request: HttpRequest) -> HttpResponse:
    reports = [
        _report(alias, wrapper)
        for alias in connections
        if isinstance(wrapper := connections[alias], DatabaseWrapper)
    ]
    status = 503 if any(r.error for r in reports) else 200  # usable by a load balancer too
    if request.GET.get("format") == "json":
        return JsonResponse({r.alias: r.as_json() for r in reports}, status=status)
    context = {"reports": reports, "mono_labels": MONO_LABELS}
    return render(request, "example_project/tls.html", context, status=status)

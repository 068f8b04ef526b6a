"""Issue 28, item 2: one escaping rule for certificate text, in every form a person reads.

A certificate's names are whatever its holder asked a CA for. A trusted certificate for the
right host whose CN held a newline and an ANSI escape made ``manage.py dbtls`` print a forged
line and clear the screen, and ``PeerCertificate.subject`` and ``as_dict()`` carried the raw
characters, while the OpenTelemetry fields (OpenSSL's printing) escaped them as ``\\0A``.
Now ``certificates.certificate_text`` is the one rule, and the server tests hold every output to it
on a real PostgreSQL presenting such certificates (and a client certificate with such a name).
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import json
import logging
import subprocess
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from health_check.exceptions import ServiceUnavailable, ServiceWarning
from hypothesis import given
from hypothesis import strategies as st

from secure_pg_backend import certificates, signals
from secure_pg_backend.contrib.health_check import VerifiedTLS
from secure_pg_backend.errors import InsecureConnectionError
from secure_pg_backend.testing import APP_USER, LeafPair, TestCA, TLSPostgres
from secure_pg_backend.tlsinfo import ClientCertificate, PeerCertificate
from tests.conftest import assert_no_secret

needs_server = pytest.mark.needs_server
UTC = dt.timezone.utc

FORGED_CN = "x\nmain: OK FORGED-LINE \x1b[2J"  # the review's certificate
ESCAPED_CN = r"x\0Amain: OK FORGED-LINE \1B[2J"
FORGED_OU = "ops\u202eenil\x9b2J"  # a right-to-left override, then a C1 CSI
ESCAPED_OU = r"ops\E2\80\AEenil\C2\9B2J"
FORGED_O = "Acme\x1b]0;pwned\x07"  # an OSC that retitles the terminal
ESCAPED_O = r"Acme\1B]0\;pwned\07"  # RFC 2253 escapes the ";"
FORGED_SAN = "evil\r\nmain: OK.test"
ESCAPED_SAN = r"DNS:evil\0D\0Amain: OK.test"
CLIENT_OU = "client\nmain: OK FORGED-CLIENT \x1b[2J"
ESCAPED_CLIENT_OU = r"client\0Amain: OK FORGED-CLIENT \1B[2J"
REFUSED_SAN = "evil\x1b[2J\nmain: OK.test"  # the only name of a certificate for another host
# As libpq's message quotes it in a refusal: messages are made one line (whitespace, the
# newline included, becomes one space) before the rule escapes the rest.
QUOTED_REFUSED_SAN = r"evil\1B[2J main: OK.test"

_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unsafe(text: str) -> list[str]:
    """What a terminal or a log viewer would act on: control characters, line and paragraph
    separators, bidirectional controls, lone surrogates (judged by Unicode's categories, not
    by the pattern under test)."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") or c in _BIDI]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


# -- the rule: no server -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (FORGED_CN, ESCAPED_CN),
        (FORGED_OU, ESCAPED_OU),
        (FORGED_O, r"Acme\1B]0;pwned\07"),
        ("\x00\x7f\x85", r"\00\7F\C2\85"),
        ("a\u2028b\u2029c", r"a\E2\80\A8b\E2\80\A9c"),
        ("\u2066\u2069\u200f", r"\E2\81\A6\E2\81\A9\E2\80\8F"),
        ("\ud800", r"\ED\A0\80"),  # a lone surrogate: no UTF-8 output could print it
        ('Café \\, "x" +#; <y> — 東京', 'Café \\, "x" +#; <y> — 東京'),  # left as is
        ("\\0A", "\\0A"),  # already escaped text stays as it is
    ],
)
def test_certificate_text_escapes_as_openssl_does(raw: str, shown: str) -> None:
    assert certificates.certificate_text(raw) == shown


@given(st.text())
def test_certificate_text_leaves_nothing_to_act_on_and_is_idempotent(text: str) -> None:
    shown = certificates.certificate_text(text)
    assert unsafe(shown) == []
    assert certificates.certificate_text(shown) == shown
    if not unsafe(text):
        assert shown == text


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _sign(
    ca: TestCA,
    subject: x509.Name,
    sans: list[x509.GeneralName] | None,
    *,
    client: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> LeafPair:
    """A leaf from ``ca`` with any subject and SANs, signed with cryptography's public API
    (trustme takes neither), as ``TestCA._issue_client`` does."""
    ca_cert = x509.load_pem_x509_certificate(ca.ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.ca.private_key_pem.bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return LeafPair(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _der(leaf: LeafPair) -> bytes:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pem)
    return cert.public_bytes(serialization.Encoding.DER)


HOSTILE_NAMES = [
    _name((NameOID.COMMON_NAME, FORGED_CN)),
    _name(
        (NameOID.ORGANIZATION_NAME, FORGED_O),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, FORGED_OU),
        (NameOID.COMMON_NAME, FORGED_CN),
    ),
    _name((NameOID.COMMON_NAME, "\x00lead\x7f tail\x1b ")),  # NUL, DEL, a trailing space
    _name((NameOID.COMMON_NAME, "#a\u2028b\u2029c\x85d, e+f\\g")),  # the RFC 2253 specials too
]


@pytest.mark.parametrize("subject", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_every_reading_of_a_hostile_name_is_the_same_string(ca: TestCA, subject: x509.Name) -> None:
    """cryptography's RFC 4514 string (``PeerCertificate``), the OpenSSL behind libpq (the log
    record's OpenTelemetry fields, the client certificate) and the ``openssl`` command with the
    same flags give one string once the rule has been applied: no second rule anywhere."""
    der = _der(_sign(ca, subject, [x509.DNSName("localhost")]))
    parsed = PeerCertificate.from_der(der)
    assert certificates.certificate_names(der) == (parsed.subject, parsed.issuer)
    assert ClientCertificate.from_der(der).subject == parsed.subject
    command = ["openssl", "x509", "-inform", "DER", "-noout", "-subject", "-nameopt"]
    printed = subprocess.run(
        [*command, "RFC2253,-esc_msb"], input=der, capture_output=True, check=True, timeout=30
    ).stdout
    line = printed.decode().removesuffix("\n").removeprefix("subject=")
    assert certificates.certificate_text(line) == parsed.subject
    assert unsafe(parsed.subject) == []
    # The raw name stays where a caller asks for the certificate itself.
    assert parsed.certificate().subject == subject
    assert subject.rfc4514_string() != parsed.subject


# -- on a real server: every output ------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_servers(ca: TestCA) -> Iterator[dict[str, TLSPostgres]]:
    """``right``: a trusted certificate for 127.0.0.1 with hostile names, demanding a client
    certificate; ``wrong``: a trusted certificate whose only name is hostile and another."""
    right = _sign(
        ca,
        _name(
            (NameOID.ORGANIZATION_NAME, FORGED_O),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, FORGED_OU),
            (NameOID.COMMON_NAME, FORGED_CN),
        ),
        [
            x509.DNSName("localhost"),
            x509.DNSName(FORGED_SAN),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
    wrong = _sign(ca, _name((NameOID.COMMON_NAME, FORGED_CN)), [x509.DNSName(REFUSED_SAN)])
    servers = {
        "right": TLSPostgres(right, trust=ca, client_ca=ca).start(),
        "wrong": TLSPostgres(wrong, trust=ca).start(),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def hostile_aliases(
    hostile_servers: dict[str, TLSPostgres],
    ca: TestCA,
    tmp_path: Path,
    aliases: Callable[..., None],
) -> None:
    # A client certificate the server accepts (CN is the user) with a hostile OU, two hours
    # from its end so that the health check and the log line warn about it.
    now = dt.datetime.now(UTC)
    client = _sign(
        ca,
        _name((NameOID.ORGANIZATIONAL_UNIT_NAME, CLIENT_OU), (NameOID.COMMON_NAME, APP_USER)),
        None,
        client=True,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(hours=2),
    )
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    cert.write_bytes(client.cert_chain_pem)
    key.write_bytes(client.key_pem)
    key.chmod(0o600)
    options = {"sslcert": str(cert), "sslkey": str(key)}
    aliases(
        forged=hostile_servers["right"].database_settings(options=options),
        elsewhere=hostile_servers["wrong"].database_settings(),
    )


@needs_server
@pytest.mark.usefixtures("hostile_aliases")
def test_dbtls_prints_one_escaped_line(capsys: pytest.CaptureFixture[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="1 of 2 database aliases failed: elsewhere"):
        call_command(
            "dbtls", "--database", "forged", "--database", "elsewhere", stdout=out, stderr=err
        )
    (line,) = out.getvalue().splitlines()  # str.splitlines breaks at every separator there is
    assert unsafe(line) == []
    assert line.startswith("forged: SSL connection (")
    assert f"server certificate CN={ESCAPED_CN},OU={ESCAPED_OU},O={ESCAPED_O}, expires" in line
    assert f"client certificate CN={APP_USER},OU={ESCAPED_CLIENT_OU}," in line
    # The refusal: libpq's message quotes the certificate's one name. Its first line, then the
    # details the backend itself puts on indented lines (what the server presented, libpq's
    # words): str.splitlines finds no other break, so the certificate made none.
    first, *details = err.getvalue().splitlines()
    assert [unsafe(line) for line in (first, *details)] == [[] for _ in (first, *details)]
    assert first.startswith("elsewhere: FAILED (TLS refused): ")
    assert details and all(line.startswith("  ") for line in details)
    assert f'server certificate for "{QUOTED_REFUSED_SAN}" (and 1 other' in details[-1]
    assert_no_secret(out.getvalue(), err.getvalue())


@needs_server
@pytest.mark.usefixtures("hostile_aliases")
def test_dbtls_json_holds_the_escaped_strings() -> None:
    out = io.StringIO()
    call_command("dbtls", "--database", "forged", "--json", stdout=out)
    report = json.loads(out.getvalue())["forged"]
    assert [s for s in _strings(report) if unsafe(s)] == []
    peer = report["peer_certificate"]
    assert peer["subject"] == f"CN={ESCAPED_CN},OU={ESCAPED_OU},O={ESCAPED_O}"
    assert ESCAPED_SAN in peer["subject_alt_names"]
    assert "der" not in peer and "der" not in report["client_certificate"]
    assert report["client_certificate"]["subject"] == f"CN={APP_USER},OU={ESCAPED_CLIENT_OU}"


@needs_server
@pytest.mark.usefixtures("hostile_aliases")
def test_the_report_its_repr_and_the_certificate_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    info = connections["forged"].tls_info
    peer, client = info.peer_certificate, info.client_certificate
    assert peer is not None and client is not None
    assert peer.subject == f"CN={ESCAPED_CN},OU={ESCAPED_OU},O={ESCAPED_O}"
    assert ESCAPED_SAN in peer.subject_alt_names
    assert client.subject == f"CN={APP_USER},OU={ESCAPED_CLIENT_OU}"
    for text in (repr(info), repr(peer), repr(client), info.status_line(), info.log_line()):
        assert unsafe(text) == [], text
        assert "FORGED" in text  # the name is there, escaped, not dropped
    assert [s for s in _strings(info.as_dict()) if unsafe(s)] == []
    assert "\\\\0Amain: OK FORGED-LINE \\\\1B[2J" in repr(peer)  # repr's own backslashes
    # Raw, where code asks for the certificate itself.
    raw = peer.certificate().subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert raw == FORGED_CN
    assert info.peer_certificate_der == peer.der
    raw_ou = client.certificate().subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert raw_ou[0].value == CLIENT_OU

    # The start-up log line and its fields (OpenTelemetry's names included).
    (record,) = [r for r in caplog.records if "alias 'forged' connected" in r.getMessage()]
    message = record.getMessage()
    assert unsafe(message) == [] and f"OU={ESCAPED_CLIENT_OU}" in message
    fields = signals.extra_fields(info)
    assert [s for s in _strings(fields) if unsafe(s)] == []
    assert vars(record)["tls.server.subject"] == peer.subject == fields["tls.server.subject"]
    assert vars(record)["tls.server.issuer"] == peer.issuer
    assert vars(record)["tls.client.subject"] == client.subject


@needs_server
@pytest.mark.usefixtures("hostile_aliases")
def test_the_health_check_and_the_system_check_escape_it() -> None:
    with pytest.raises(ServiceWarning) as warned:
        VerifiedTLS(alias="forged").run()
    (line,) = str(warned.value).splitlines()
    assert unsafe(line) == [] and f"OU={ESCAPED_CLIENT_OU}" in line
    with pytest.raises(ServiceUnavailable) as refused:
        VerifiedTLS(alias="elsewhere").run()
    (line,) = str(refused.value).splitlines()
    assert unsafe(line) == [] and QUOTED_REFUSED_SAN in line
    issues = connections["forged"].validation.check()
    assert issues and all(unsafe(i.msg) == [] for i in issues)
    assert any(f"OU={ESCAPED_CLIENT_OU}" in i.msg for i in issues)


@needs_server
def test_a_refusal_quotes_the_name_escaped(
    hostile_servers: dict[str, TLSPostgres], make_wrapper: Callable[..., Any]
) -> None:
    wrapper = make_wrapper(hostile_servers["wrong"].database_settings(), alias="refused")
    with pytest.raises(InsecureConnectionError) as caught:
        wrapper.ensure_connection()
    message = str(caught.value)
    # The only line breaks are the backend's own (its details, indented): str.splitlines, which
    # breaks at every separator there is, finds the same lines as a split at newlines.
    lines = message.split("\n")
    assert message.splitlines() == lines
    assert [unsafe(line) for line in lines] == [[] for _ in lines]
    assert all(line.startswith("  ") for line in lines[1:])
    assert f'server certificate for "{QUOTED_REFUSED_SAN}" (and 1 other' in message
    assert "Fix:" in lines[0]


@needs_server
@pytest.mark.usefixtures("hostile_aliases")
def test_no_metric_label_carries_certificate_text() -> None:
    from prometheus_client import REGISTRY, generate_latest

    from secure_pg_backend import metrics

    assert metrics.install()
    connections["forged"].ensure_connection()
    exposition = generate_latest(REGISTRY).decode()
    assert 'secure_pg_backend_tls_info{alias="forged"' in exposition
    assert "FORGED" not in exposition and "Acme" not in exposition and "evil" not in exposition
    assert unsafe(exposition.replace("\n", "")) == []

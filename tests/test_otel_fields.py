"""The start-up log record also carries OpenTelemetry's semantic convention names (the server
side: ``db.*``, ``server.*``, ``tls.*``), so an OTel log pipeline needs no mapping."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_pg_backend import certificates, signals
from secure_pg_backend.handshake import cipher_is_strong
from secure_pg_backend.testing import TLSPostgres
from secure_pg_backend.tlsinfo import PeerCertificate, TLSInfo
from tests.conftest import assert_no_secret, leaf_certificate

Wrapper = Callable[..., Any]
OTEL_PREFIXES = ("db.", "server.", "network.", "tls.")


class JSONFormatter(logging.Formatter):
    """What a JSON log handler does with ``extra``: the record's attributes as keys."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k.startswith(OTEL_PREFIXES)}
        return json.dumps({"message": record.getMessage(), **fields})


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("secure_pg_backend")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_the_log_record_carries_the_otel_names(
    make_wrapper: Wrapper,
    good_server: TLSPostgres,
    caplog: pytest.LogCaptureFixture,
    json_lines: io.StringIO,
) -> None:
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    # By name, reached at an address: server.address is the name, the address is the peer's.
    settings = good_server.database_settings(host="localhost", options={"hostaddr": "127.0.0.1"})
    info = make_wrapper(settings, alias="otel").tls_info
    (record,) = [r for r in caplog.records if "alias 'otel' connected" in r.getMessage()]
    fields = {k: v for k, v in vars(record).items() if k.startswith(OTEL_PREFIXES)}
    leaf = leaf_certificate(good_server)
    assert info.protocol is not None and info.protocol.startswith("TLSv")
    expected = {
        "db.system.name": "postgresql",
        "db.namespace": "app",
        "server.address": "localhost",
        "server.port": good_server.port,
        "network.peer.address": "127.0.0.1",
        "tls.protocol.name": "tls",
        "tls.protocol.version": info.protocol.removeprefix("TLSv"),  # "1.3"
        "tls.cipher": info.cipher,  # a TLS 1.3 suite: OpenSSL's name is the IANA one
        "tls.server.not_after": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tls.server.subject": leaf.subject.rfc4514_string(),
        "tls.server.issuer": leaf.issuer.rfc4514_string(),
        "tls.server.hash.sha256": hashlib.sha256(leaf.public_bytes(Encoding.DER))
        .hexdigest()
        .upper(),
    }
    if info.alpn:  # libpq 17+ against PostgreSQL 17+: ALPN "postgresql"
        expected["tls.next_protocol"] = info.alpn
    assert fields == expected
    assert isinstance(fields["server.port"], int)
    assert dt.datetime.fromisoformat(fields["tls.server.not_after"].replace("Z", "+00:00")) == (
        leaf.not_valid_after_utc
    )
    # The names and the fingerprint are the ones the parsed certificate reports (the
    # fingerprint in OTel's uppercase).
    assert info.peer_certificate is not None
    assert fields["tls.server.subject"] == info.peer_certificate.subject
    assert fields["tls.server.issuer"] == info.peer_certificate.issuer
    assert fields["tls.server.hash.sha256"] == info.peer_certificate.sha256_fingerprint.upper()
    # Beside the existing names, not instead of them.
    assert record.db_name == "app" and record.tls_cipher == info.cipher  # type: ignore[attr-defined]

    # A JSON handler emits the dotted keys as they are.
    (line,) = [json.loads(x) for x in json_lines.getvalue().splitlines() if "'otel'" in x]
    assert {k: v for k, v in line.items() if k != "message"} == expected
    # logging's %-style format strings take dotted names only unvalidated (docs/tls-info.md).
    formatter = logging.Formatter("%(server.address)s:%(server.port)d", validate=False)
    assert formatter.format(record) == f"localhost:{good_server.port}"
    assert_no_secret(json_lines.getvalue(), repr(vars(record)))


def _info(**changes: Any) -> TLSInfo:
    base: dict[str, Any] = dict(
        alias="x",
        transport="tls",
        protocol="TLSv1.2",
        cipher="ECDHE-RSA-AES256-GCM-SHA384",
        key_bits=256,
        compression=False,
        alpn=None,
        library="OpenSSL",
        host="db.example.com",
        hostaddr="10.0.3.7",
        port=5432,
        database="app",
        sslmode="verify-full",
        min_protocol="TLSv1.2",
        root_cert="/etc/ca.pem",
        root_cert_source="OPTIONS['sslrootcert']",
    )
    base.update(changes)
    return TLSInfo(**base)


def test_tls_12_cipher_gets_its_iana_name_and_an_unknown_one_none() -> None:
    fields = signals.otel_server_fields(_info(), None)
    assert fields["tls.cipher"] == "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"
    assert fields["tls.protocol.version"] == "1.2"
    assert "tls.server.not_after" not in fields and "tls.server.hash.sha256" not in fields
    # A legacy suite (allow_legacy_ciphers) whose IANA name is not known here: left out, not
    # guessed; tls_cipher still has OpenSSL's name.
    legacy = signals.otel_server_fields(_info(cipher="AES256-SHA"), None)
    assert "tls.cipher" not in legacy
    assert signals.extra_fields(_info(cipher="AES256-SHA"))["tls_cipher"] == "AES256-SHA"


def test_without_tls_no_tls_names() -> None:
    info = _info(
        transport="unix-socket",
        protocol=None,
        cipher=None,
        key_bits=None,
        host="/var/run/postgresql",
        hostaddr=None,
    )
    fields = signals.otel_server_fields(info, None)
    assert fields == {
        "db.system.name": "postgresql",
        "db.namespace": "app",
        "server.address": "/var/run/postgresql",
        "server.port": 5432,
    }


def test_the_iana_names_are_openssls() -> None:
    listing = subprocess.run(
        ["openssl", "ciphers", "-stdname", "ALL"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    openssl = {}
    for line in listing.splitlines():
        standard, _, name = line.split()[:3]
        openssl[name] = standard
    for name, iana in signals._IANA_CIPHERS.items():
        assert openssl.get(name) == iana, name
        assert cipher_is_strong("TLSv1.2", name), name  # only suites the link check accepts


def test_names_read_by_openssl_are_the_parsed_certificates() -> None:
    """The log record's names (OpenSSL, no cryptography import) and ``PeerCertificate``'s
    (cryptography) are the same strings, escaping and UTF-8 included."""
    ca = trustme.CA(organization_name="Acme, Inc.", organization_unit_name="Ops+DB")
    leaves = [
        ca.issue_cert("db.example.com"),
        ca.issue_cert(
            "db.example.com",
            common_name='Café "x"; <y> #1 ',
            organization_name="#Org",
            organization_unit_name=" lead",
        ),
    ]
    for leaf in leaves:
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        raw = cert.public_bytes(Encoding.DER)
        parsed = PeerCertificate.from_der(raw)
        assert certificates.certificate_names(raw) == (parsed.subject, parsed.issuer)

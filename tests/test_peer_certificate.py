"""``tls_info.peer_certificate`` equals what the test CA issued; the log line carries the expiry."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from secure_pg_backend import signals
from secure_pg_backend.testing import TestCA, TLSPostgres
from tests.conftest import leaf_certificate


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)} | {
        f"IP:{ip}" for ip in ext.get_values_for_type(x509.IPAddress)
    }


def _connect(make_wrapper: Callable[..., Any], server: TLSPostgres, blocker: Any) -> Any:
    wrapper = make_wrapper(server.database_settings())
    with blocker.unblock():
        wrapper.ensure_connection()
    return wrapper


def test_every_field_matches_the_issued_certificate(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    ca: TestCA,
    django_db_blocker: Any,
) -> None:
    peer = _connect(make_wrapper, good_server, django_db_blocker).tls_info.peer_certificate
    issued = leaf_certificate(good_server)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert peer is not None
    assert peer.subject == issued.subject.rfc4514_string()
    assert peer.issuer == issued.issuer.rfc4514_string() == ca_cert.subject.rfc4514_string()
    assert set(peer.subject_alt_names) == _sans(issued)
    assert set(peer.subject_alt_names) == {"DNS:localhost", "IP:127.0.0.1", "DNS:db.test"}
    assert peer.not_before == issued.not_valid_before_utc
    assert peer.not_after == issued.not_valid_after_utc
    assert peer.not_before.utcoffset() == peer.not_after.utcoffset() == dt.timedelta(0)
    assert peer.serial_number == issued.serial_number
    # Hex of the SHA-256 of the DER leaf, as openssl x509 -fingerprint -sha256 computes it.
    assert peer.sha256_fingerprint == hashlib.sha256(issued.public_bytes(Encoding.DER)).hexdigest()
    assert peer.sha256_fingerprint == issued.fingerprint(hashes.SHA256()).hex()


def test_it_is_the_certificate_of_this_session(
    make_wrapper: Callable[..., Any],
    start_server: Callable[..., TLSPostgres],
    ca: TestCA,
    django_db_blocker: Any,
) -> None:
    """After a certificate rotation the old session still reports the old leaf."""
    server = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca)
    first_leaf = leaf_certificate(server)
    before = _connect(make_wrapper, server, django_db_blocker)
    server.rotate_certificate(ca.issue("localhost", "127.0.0.1", "rotated.test"))
    after = _connect(make_wrapper, server, django_db_blocker)
    assert before.tls_info.peer_certificate.serial_number == first_leaf.serial_number
    assert after.tls_info.peer_certificate.serial_number == leaf_certificate(server).serial_number
    assert after.tls_info.peer_certificate.serial_number != first_leaf.serial_number
    assert "DNS:rotated.test" in after.tls_info.peer_certificate.subject_alt_names


def _startup_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "secure_pg_backend"]


def test_log_line_is_a_warning_for_an_expiring_certificate(
    make_wrapper: Callable[..., Any],
    expiring_server: TLSPostgres,
    django_db_blocker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    signals.reset_announced()
    caplog.set_level(logging.DEBUG, logger="secure_pg_backend")
    _connect(make_wrapper, expiring_server, django_db_blocker)
    (record,) = _startup_records(caplog)
    not_after = leaf_certificate(expiring_server).not_valid_after_utc
    assert record.levelno == logging.WARNING
    assert f"server certificate expires {not_after:%Y-%m-%d}, in 10 days" in record.getMessage()
    assert record.tls_cert_not_after == not_after.isoformat()  # type: ignore[attr-defined]


def test_log_line_is_info_for_a_good_certificate(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    django_db_blocker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    signals.reset_announced()
    caplog.set_level(logging.DEBUG, logger="secure_pg_backend")
    _connect(make_wrapper, good_server, django_db_blocker)
    (record,) = _startup_records(caplog)
    not_after = leaf_certificate(good_server).not_valid_after_utc
    assert record.levelno == logging.INFO
    assert f"server certificate expires {not_after:%Y-%m-%d}, in " in record.getMessage()

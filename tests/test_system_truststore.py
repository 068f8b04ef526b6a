"""``sslrootcert="system"``: the platform store, found as Python finds it, is what libpq uses."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from secure_pg_backend import InsecureConnectionError, SecurePolicyError
from secure_pg_backend.testing import TestCA, TLSPostgres
from secure_pg_backend.truststore import system_trust_file
from tests.conftest import assert_no_secret

SYSTEM = {"sslrootcert": "system"}


def _bundle(path: Path, *pems: bytes) -> Path:
    """A CA bundle like a distribution's: the OS roots (when present) plus extra CAs."""
    parts = []
    default = ssl.get_default_verify_paths().openssl_cafile
    if default and os.path.isfile(default):
        parts.append(Path(default).read_bytes())
    parts.extend(pems)
    path.write_bytes(b"\n".join(parts))
    return path


def _connect(make_wrapper: Callable[..., Any], server: TLSPostgres, blocker: Any) -> Any:
    wrapper = make_wrapper(server.database_settings(host="localhost", options=SYSTEM))
    with blocker.unblock():
        wrapper.ensure_connection()
    return wrapper


def test_system_store_with_the_ca_in_ssl_cert_file_connects(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    ca: TestCA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    django_db_blocker: Any,
) -> None:
    bundle = _bundle(tmp_path / "ca-bundle.crt", ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    info = _connect(make_wrapper, good_server, django_db_blocker).tls_info
    assert info.transport == "tls"
    assert info.root_cert == str(bundle)
    assert info.root_cert_source == "system (SSL_CERT_FILE)"


def test_system_store_without_the_ca_is_refused(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    django_db_blocker: Any,
) -> None:
    """The same bundle minus the test CA fails: libpq really verifies against that file."""
    bundle = _bundle(tmp_path / "other-bundle.crt", TestCA(directory=tmp_path).cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with pytest.raises(InsecureConnectionError) as caught:
        _connect(make_wrapper, good_server, django_db_blocker)
    assert "certificate verify failed" in str(caught.value)
    assert "DATABASES['secure'] (host 'localhost')" in str(caught.value)
    assert_no_secret(str(caught.value))


def test_unreadable_ssl_cert_file_is_refused_before_connecting(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    django_db_blocker: Any,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.crt"))
    with pytest.raises(SecurePolicyError) as caught:
        _connect(make_wrapper, good_server, django_db_blocker)
    message = str(caught.value)
    assert "OPTIONS['sslrootcert'] is 'system', but SSL_CERT_FILE is" in message
    assert "missing.crt" in message and "Fix:" in message
    assert [v.code for v in caught.value.violations] == ["E006"]


def test_without_override_the_platform_bundle_is_a_real_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    path, where = system_trust_file(os.environ)
    assert where in {"OpenSSL default", "OS bundle", "certifi"}
    assert os.path.isfile(path) and os.access(path, os.R_OK)
    assert b"-----BEGIN CERTIFICATE-----" in Path(path).read_bytes()
    # A usable trust store: OpenSSL loads CA certificates from it.
    assert ssl.create_default_context(cafile=path).cert_store_stats()["x509_ca"] > 10


def test_without_override_a_private_ca_server_is_not_trusted(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    monkeypatch: pytest.MonkeyPatch,
    django_db_blocker: Any,
) -> None:
    """Public roots only: "system" must not accept the test CA's server."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(InsecureConnectionError) as caught:
        _connect(make_wrapper, good_server, django_db_blocker)
    assert "certificate verify failed" in str(caught.value)

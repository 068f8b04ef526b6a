"""The example project's ``/tls/`` page and its JSON, through Django's test client."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from django.db import connections
from django.test import Client, override_settings

from secure_pg_backend.testing import TLSPostgres
from tests.conftest import assert_no_secret, leaf_certificate

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent.parent / "example_project" / "templates"],
    }
]


@pytest.fixture
def client(aliases: Callable[..., None]) -> Iterator[Client]:
    with override_settings(ROOT_URLCONF="example_project.urls", TEMPLATES=TEMPLATES):
        yield Client()


def test_html_page_shows_the_negotiated_tls_and_certificate(
    client: Client, good_server: TLSPostgres
) -> None:
    response = client.get("/tls/")
    html = response.content.decode()
    assert response.status_code == 200
    assert_no_secret(html)
    info = connections["default"].tls_info
    assert "<h2>default</h2>" in html
    assert "Verified TLS" in html
    assert f"SSL connection (protocol: {info.protocol}, cipher: {info.cipher}" in html
    assert f"<td>{info.protocol}</td>" in html and f"<td>{info.cipher}</td>" in html
    cert = leaf_certificate(good_server)
    assert f"Certificate expires {cert.not_valid_after_utc:%Y-%m-%d}, in " in html
    assert f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC" in html
    assert f"<td>{cert.subject.rfc4514_string()}</td>" in html
    fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
    first_row = ":".join(fingerprint[i : i + 2] for i in range(0, 32, 2))
    assert first_row + ":\n" in html  # colon-separated bytes, 16 per line


def test_json_format_is_keyed_by_alias(client: Client, good_server: TLSPostgres) -> None:
    response = client.get("/tls/", {"format": "json"})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    data = json.loads(response.content)
    assert list(data) == ["default"]
    assert data["default"]["transport"] == "tls"
    assert data["default"]["sslmode"] == "verify-full"
    cert = leaf_certificate(good_server)
    assert data["default"]["peer_certificate"]["not_after"] == cert.not_valid_after_utc.isoformat()


def test_refused_alias_is_shown_and_turns_the_status_to_503(
    client: Client, aliases: Callable[..., None], mitm_server: TLSPostgres
) -> None:
    aliases(intercepted=mitm_server.database_settings())
    page = client.get("/tls/")
    html = page.content.decode()
    assert page.status_code == 503
    assert "<h2>intercepted</h2>" in html and "Refused" in html
    assert "certificate verify failed" in html
    assert "Verified TLS" in html  # default is still shown as fine
    data = json.loads(client.get("/tls/?format=json").content)
    assert "certificate verify failed" in data["intercepted"]["error"]
    assert data["default"]["transport"] == "tls"
    assert_no_secret(html, json.dumps(data))


def test_expiring_certificate_is_highlighted(
    client: Client, aliases: Callable[..., None], expiring_server: TLSPostgres
) -> None:
    aliases(soon=expiring_server.database_settings())
    html = client.get("/tls/").content.decode()
    assert "certificate expires soon" in html
    assert "Certificate expires" in html and "in 10 days" in html


def test_root_redirects_to_the_page(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 302 and response["Location"] == "/tls/"


def test_unknown_format_falls_back_to_html(client: Client) -> None:
    response = client.get("/tls/", {"format": "xml"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")

"""Threat: a server (or a downgrade) negotiating a TLS 1.2 suite without forward secrecy or AEAD.

libpq itself accepts such a link under verify-full (measured: ``TLSv1.2 AES128-SHA``), so the
backend checks the live link after the handshake and refuses it unless the operator opted out
with ``allow_legacy_ciphers``. Real servers restricted with ``ssl_ciphers`` prove both sides.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from secure_pg_backend import InsecureConnectionError, handshake, policy
from secure_pg_backend.testing import APP_PASSWORD, TestCA, TLSPostgres
from tests.conftest import assert_no_secret

# PostgreSQL's ssl_ciphers applies to TLS <= 1.2 only, so each server is capped at TLS 1.2.
TLS12 = {"ssl_min_protocol_version": "'TLSv1.2'", "ssl_max_protocol_version": "'TLSv1.2'"}

STRONG = [
    ("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
    ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256"),
    ("TLSv1.3", "TLS_AES_128_CCM_SHA256"),
    ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384"),
    ("TLSv1.2", "ECDHE-RSA-CHACHA20-POLY1305"),
    ("TLSv1.2", "DHE-RSA-AES256-GCM-SHA384"),
    ("TLSv1.2", "ECDHE-ECDSA-AES128-CCM"),
]
WEAK = [
    ("TLSv1.2", "AES128-SHA"),  # RSA key exchange, CBC + SHA1 MAC
    ("TLSv1.2", "AES256-GCM-SHA384"),  # AEAD but no forward secrecy
    ("TLSv1.2", "ECDHE-RSA-AES128-SHA"),  # forward secrecy but CBC
    ("TLSv1.2", "ECDHE-ECDSA-AES256-SHA384"),
    ("TLSv1.2", "DHE-RSA-AES128-SHA256"),
    ("TLSv1.2", "DES-CBC3-SHA"),
    ("TLSv1.2", "RC4-SHA"),
    ("TLSv1.2", "PSK-AES128-GCM-SHA256"),  # no certificate at all
    ("TLSv1.2", None),
    ("TLSv1.2", ""),
]


# -- the rule, as a pure function --------------------------------------------------
@pytest.mark.parametrize(("protocol", "cipher"), STRONG)
def test_strong_suites_pass(protocol: str, cipher: str) -> None:
    assert handshake.cipher_is_strong(protocol, cipher)


@pytest.mark.parametrize(("protocol", "cipher"), WEAK)
def test_weak_suites_fail(protocol: str, cipher: str | None) -> None:
    assert not handshake.cipher_is_strong(protocol, cipher)


def _decision(**kwargs: Any) -> policy.Decision:
    return policy.Decision(
        alias="default", hosts=("db.test",), root_cert="/ca.pem", root_cert_source="t", **kwargs
    )


def _facts(protocol: str | None, cipher: str | None, ssl: bool = True) -> handshake.LinkFacts:
    return handshake.LinkFacts(
        host="db.test",
        ssl_in_use=ssl,
        protocol=protocol,
        cipher=cipher,
        effective=_decision().forced,  # libpq used what the (default) policy forced
    )


def test_check_link_names_the_cipher() -> None:
    problem = handshake.check_link(_decision(), _facts("TLSv1.2", "AES128-SHA"))
    assert problem is not None
    cause, words, fix = problem
    assert cause == "cipher"  # explain cipher: the same entry (causes.BY_NAME)
    assert "AES128-SHA" in words and "TLSv1.2" in words
    assert "allow_legacy_ciphers" in fix


def test_opt_out_relaxes_only_the_cipher_rule() -> None:
    legacy = _decision(allow_legacy_ciphers=True)
    assert handshake.check_link(legacy, _facts("TLSv1.2", "AES128-SHA")) is None
    # Still refused with the opt-out: old protocols, no TLS at all, a raised minimum.
    assert handshake.check_link(legacy, _facts("TLSv1.1", "AES128-SHA")) is not None
    assert handshake.check_link(legacy, _facts(None, None, ssl=False)) is not None
    strict = _decision(allow_legacy_ciphers=True, min_protocol="TLSv1.3")
    assert handshake.check_link(strict, _facts("TLSv1.2", "AES128-SHA")) is not None
    gss = handshake.LinkFacts(
        "db.test", True, "TLSv1.3", "TLS_AES_256_GCM_SHA384", used_gssapi=True
    )
    assert handshake.check_link(legacy, gss) is not None


# -- real servers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls12_server(ca: TestCA) -> Iterator[Callable[[str, bool], TLSPostgres]]:
    """One real server per (ssl_ciphers, RSA leaf), started on first use."""
    servers: dict[tuple[str, bool], TLSPostgres] = {}

    def get(ciphers: str, rsa: bool) -> TLSPostgres:
        if (ciphers, rsa) not in servers:
            leaf = ca.issue("localhost", "127.0.0.1", rsa=rsa)
            conf = {**TLS12, "ssl_ciphers": f"'{ciphers}'"}
            servers[ciphers, rsa] = TLSPostgres(leaf, trust=ca, settings=conf).start()
        return servers[ciphers, rsa]

    yield get
    for server in servers.values():
        server.stop()


def _app_sessions(server: TLSPostgres) -> int:
    rows = server.admin_sql("select count(*) from pg_stat_activity where usename = 'app'")
    return int(rows[0][0])


def _wait_no_app_session(server: TLSPostgres) -> int:
    """The refused connection was closed by the client; the backend exits shortly after."""
    count, deadline = -1, time.monotonic() + 10
    for _ in range(100):
        count = _app_sessions(server)
        if count == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return count


@pytest.mark.needs_server  # tls12_server
@pytest.mark.parametrize(
    ("ciphers", "rsa"),
    [("AES128-SHA", True), ("ECDHE-RSA-AES128-SHA", True), ("AES256-GCM-SHA384", True)],
)
def test_legacy_cipher_server_is_refused(
    tls12_server: Callable[[str, bool], TLSPostgres],
    make_wrapper: Callable[..., Any],
    ciphers: str,
    rsa: bool,
) -> None:
    server = tls12_server(ciphers, rsa)
    wrapper = make_wrapper(server.database_settings())
    with pytest.raises(InsecureConnectionError) as caught:
        wrapper.ensure_connection()
    message = str(caught.value)
    assert f"the cipher {ciphers} over TLSv1.2" in message
    assert "allow_legacy_ciphers" in message
    assert wrapper.connection is None
    assert_no_secret(message, repr(caught.value))
    assert _wait_no_app_session(server) == 0


@pytest.mark.needs_server  # tls12_server
def test_legacy_cipher_accepted_with_opt_out(
    tls12_server: Callable[[str, bool], TLSPostgres], make_wrapper: Callable[..., Any]
) -> None:
    server = tls12_server("AES128-SHA", True)
    wrapper = make_wrapper(
        server.database_settings(options={"allow_legacy_ciphers": True}), "default"
    )
    info = wrapper.tls_info
    assert (info.protocol, info.cipher, info.transport) == ("TLSv1.2", "AES128-SHA", "tls")
    with wrapper.cursor() as cur:
        cur.execute("select version, cipher from pg_stat_ssl where pid = pg_backend_pid()")
        assert cur.fetchone() == ("TLSv1.2", "AES128-SHA")


def test_opt_out_keeps_certificate_verification(
    mitm_server: TLSPostgres, make_wrapper: Callable[..., Any]
) -> None:
    wrapper = make_wrapper(
        mitm_server.database_settings(options={"allow_legacy_ciphers": True}), "default"
    )
    with pytest.raises(InsecureConnectionError, match="certificate verify failed") as caught:
        wrapper.ensure_connection()
    assert APP_PASSWORD not in str(caught.value)


@pytest.mark.needs_server  # tls12_server
def test_opt_out_keeps_a_raised_minimum_protocol(
    tls12_server: Callable[[str, bool], TLSPostgres], make_wrapper: Callable[..., Any]
) -> None:
    server = tls12_server("AES128-SHA", True)
    options = {"allow_legacy_ciphers": True, "ssl_min_protocol_version": "TLSv1.3"}
    wrapper = make_wrapper(server.database_settings(options=options))
    with pytest.raises(InsecureConnectionError, match="TLS handshake failed"):
        wrapper.ensure_connection()


@pytest.mark.needs_server  # tls12_server
@pytest.mark.parametrize(
    ("ciphers", "rsa"),
    [
        ("ECDHE-ECDSA-AES128-GCM-SHA256", False),
        ("ECDHE-RSA-AES256-GCM-SHA384", True),
        ("ECDHE-RSA-CHACHA20-POLY1305", True),
    ],
)
def test_tls12_forward_secret_aead_is_accepted(
    tls12_server: Callable[[str, bool], TLSPostgres],
    make_wrapper: Callable[..., Any],
    ciphers: str,
    rsa: bool,
) -> None:
    wrapper = make_wrapper(tls12_server(ciphers, rsa).database_settings())
    info = wrapper.tls_info
    assert (info.protocol, info.cipher) == ("TLSv1.2", ciphers)
    with wrapper.cursor() as cur:
        cur.execute("select 1")
        assert cur.fetchone() == (1,)


def test_default_tls13_server_is_accepted(
    good_server: TLSPostgres, make_wrapper: Callable[..., Any]
) -> None:
    info = make_wrapper(good_server.database_settings()).tls_info
    assert info.protocol == "TLSv1.3"
    assert info.cipher is not None and info.cipher.startswith("TLS_")


@pytest.mark.needs_server  # start_server
def test_a_link_is_ruled_on_again_when_the_same_server_negotiates_otherwise(
    start_server: Callable[..., TLSPostgres], ca: TestCA, make_wrapper: Callable[..., Any]
) -> None:
    """The rules are not asked again for a link showing the facts the last one passed with:
    the same endpoint reconfigured to a legacy suite shows other facts, and is refused."""
    server = start_server(ca.issue("localhost", "127.0.0.1", rsa=True), trust=ca)
    wrapper = make_wrapper(server.database_settings())
    for _ in range(2):
        wrapper.ensure_connection()
        assert wrapper.tls_info.protocol == "TLSv1.3"
        wrapper.close()
    server.admin_sql(
        "ALTER SYSTEM SET ssl_max_protocol_version = 'TLSv1.2'",
        "ALTER SYSTEM SET ssl_ciphers = 'AES128-SHA'",
        "SELECT pg_reload_conf()",
    )
    with pytest.raises(InsecureConnectionError, match=r"the cipher AES128-SHA over TLSv1\.2"):
        wrapper.ensure_connection()
    assert wrapper.connection is None

"""Every refusal diagnosed: the certificate the server presented, in the refusal (issue 31).

Real servers: each way a certificate can be refused gives its own message naming what the
server presented. A hostile server that decrypts what it receives, and a recording proxy,
show that the diagnostic handshake sends nothing after the TLS handshake; a refusing
endpoint under concurrent load is probed once.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from secure_pg_backend import InsecureConnectionError, diagnose, libpq, presented
from secure_pg_backend.testing import TestCA, TLSPostgres
from tests.conftest import assert_no_secret, leaf_certificate, refused_by_old_libpq
from tests.support.error_table import self_signed
from tests.support.hostile import SSL_REQUEST, HostileServer, RecordingProxy

# libpq 17+ knows sslnegotiation (psycopg's binary build); the C and pure-Python builds here
# use the system's libpq 15, which only does the SSLRequest.
LIBPQ_DIRECT = "sslnegotiation" in libpq.keywords()

pytestmark = pytest.mark.needs_server

FUTURE = {
    "not_before": dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc),
    "not_after": dt.datetime(2032, 1, 1, tzinfo=dt.timezone.utc),
}


@pytest.fixture(autouse=True)
def _fresh_probes() -> Iterator[None]:
    diagnose.forget()
    yield
    diagnose.forget()


@pytest.fixture
def refuse(make_wrapper: Callable[..., Any], ca: TestCA) -> Callable[..., InsecureConnectionError]:
    """Connect with these settings (trusting the session CA) and return the refusal."""

    def connect(entry: dict[str, Any], **options: Any) -> InsecureConnectionError:
        if options.get("sslnegotiation") == "postgres" and not LIBPQ_DIRECT:
            del options["sslnegotiation"]  # a libpq before 17 only knows the SSLRequest
        entry = {**entry, "OPTIONS": {**entry["OPTIONS"], **options}}
        with pytest.raises(InsecureConnectionError) as caught:
            make_wrapper(entry).ensure_connection()
        return caught.value

    return connect


def day(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def test_each_certificate_problem_has_its_own_message_naming_what_was_presented(
    refuse: Callable[..., InsecureConnectionError],
    good_server: TLSPostgres,
    mitm_server: TLSPostgres,
    expired_server: TLSPostgres,
    start_server: Callable[..., TLSPostgres],
    ca: TestCA,
) -> None:
    future = start_server(ca.issue("localhost", "127.0.0.1", **FUTURE), trust=ca)
    lone = start_server(self_signed("localhost", "127.0.0.1"), trust=ca)
    errors = {
        "expired": refuse(expired_server.database_settings()),
        "future": refuse(future.database_settings()),
        "self-signed": refuse(lone.database_settings()),
        "other CA": refuse(mitm_server.database_settings()),
        "other name": refuse(
            good_server.database_settings(host="db.other.test"), hostaddr="127.0.0.1"
        ),
    }
    firsts = {kind: str(error).splitlines()[0] for kind, error in errors.items()}
    assert len(set(firsts.values())) == len(firsts), firsts  # five different messages
    for kind, error in errors.items():
        text = str(error)
        assert "The server presented: subject " in text, kind
        assert text.count("DATABASES['secure']") == 1, kind  # the alias once
        assert "Fix: " in firsts[kind] and "libpq said:" in text.splitlines()[-1], kind
        assert_no_secret(text)
    assert errors["other name"].cause == "hostname"
    assert {e.cause for k, e in errors.items() if k != "other name"} == {"untrusted"}

    expired = leaf_certificate(expired_server)
    assert firsts["expired"].endswith(
        "the server's certificate expired on 2021-01-01. Fix: renew it on the server (or ask "
        "your provider to); no setting here can accept it."
    )
    assert f"valid from {day(expired.not_valid_before_utc)} to 2021-01-01" in str(errors["expired"])

    assert "not valid until 2031-01-01, and this machine's clock says " in firsts["future"]
    assert "valid from 2031-01-01 to 2032-01-01" in str(errors["future"])

    assert "presents a self-signed certificate ('localhost')" in firsts["self-signed"]
    assert "pin this one as the root of trust" in firsts["self-signed"]
    lone_leaf = x509.load_pem_x509_certificate(lone.leaf.cert_chain_pem)  # type: ignore[union-attr]
    fingerprint = ":".join(f"{b:02X}" for b in lone_leaf.fingerprint(hashes.SHA256()))
    assert f"Its SHA-256 fingerprint: {fingerprint}." in str(errors["self-signed"])
    assert "-starttls postgres -connect 127.0.0.1:" in str(errors["self-signed"])

    other = leaf_certificate(mitm_server)
    issuer = other.issuer.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    trusted = x509.load_pem_x509_certificate(ca.cert_pem)
    ours = trusted.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    assert (
        f"is issued by {issuer!r}, which is not in your root certificate file "
        in firsts["other CA"]
    )
    assert f"(1 CA: {ours!r})" in firsts["other CA"]
    assert f"OPTIONS['sslrootcert'] ({str(ca.cert_path)!r})" in str(errors["other CA"])

    assert firsts["other name"].endswith(
        "the server's certificate is valid for 'localhost', 'db.test', '127.0.0.1', but not "
        "for 'db.other.test'. Fix: set HOST to a name on the certificate ('db.test'); "
        "OPTIONS['hostaddr'] can keep the address."
    )


def test_an_ip_in_host_and_a_compose_alias_get_fixes_for_what_they_are(
    refuse: Callable[..., InsecureConnectionError],
    start_server: Callable[..., TLSPostgres],
    ca: TestCA,
) -> None:
    named = start_server(ca.issue("db.example.test"), trust=ca)
    by_ip = str(refuse(named.database_settings(host="127.0.0.1"))).splitlines()[0]
    assert "valid for 'db.example.test', but not for the IP address '127.0.0.1' in HOST." in by_ip
    assert by_ip.endswith(
        "Fix: set HOST to 'db.example.test' (a name on the certificate) and "
        "OPTIONS['hostaddr'] to '127.0.0.1'."
    )
    compose = str(refuse(named.database_settings(host="db"), hostaddr="127.0.0.1"))
    assert "but not for 'db', a local alias (a compose service or /etc/hosts name)." in compose
    assert "set HOST to 'db.example.test' and make that name reach the server" in compose


def _probe_of(server: HostileServer) -> Any:
    """The probe's connection: the last one, made after libpq refused (it sent an alert)."""
    *attempts, probe = server.recordings
    assert attempts and all("ALERT" in (r.tls_error or "") for r in attempts)
    return probe


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
def test_the_diagnostic_handshake_never_completes_and_sends_nothing_after_the_client_hello(
    refuse: Callable[..., InsecureConnectionError], good_server: TLSPostgres, tls12: bool
) -> None:
    """A server that decrypts what it receives: the probe sends the SSLRequest and its
    ClientHello, reads the certificate from the server's flight, and hangs up without its
    Finished (TLS 1.3) or its key exchange (TLS 1.2, whose certificate travels in the clear)."""
    entry = good_server.database_settings()
    with HostileServer("tls", self_signed("db.probe.test")) as hostile:
        if tls12:
            assert hostile.context is not None
            hostile.context.maximum_version = ssl.TLSVersion.TLSv1_2
        entry["PORT"] = str(hostile.port)
        error = refuse(entry, sslnegotiation="postgres")
        hostile.settle()
    assert "self-signed certificate ('db.probe.test')" in str(error)
    probe = _probe_of(hostile)
    assert probe.requests == ["ssl"]
    assert bytes(probe.raw[:8]) == SSL_REQUEST
    assert not probe.handshake_completed
    assert probe.decrypted == bytearray()  # no startup packet, no user, no password
    assert _records(bytes(probe.raw[8:])) == [0x16]  # one record: the ClientHello
    assert probe.closed_by_client or "EOF" in (probe.tls_error or "")
    assert_no_secret(hostile.all_bytes().decode("latin-1"))


def test_a_direct_endpoint_is_probed_directly_with_alpn(
    refuse: Callable[..., InsecureConnectionError],
    good_server: TLSPostgres,
    make_wrapper: Callable[..., Any],
) -> None:
    entry = good_server.database_settings()
    if not LIBPQ_DIRECT:  # the setting is refused before any I/O, naming the libpq it needs
        direct = {**entry, "OPTIONS": {**entry["OPTIONS"], "sslnegotiation": "direct"}}
        assert refused_by_old_libpq(make_wrapper(direct), "sslnegotiation")
        return
    with HostileServer("tls", self_signed("db.direct.test")) as hostile:
        entry["PORT"] = str(hostile.port)
        error = refuse(entry, sslnegotiation="direct")
        hostile.settle()
    assert "-alpn postgresql -connect " in str(error)
    probe = _probe_of(hostile)
    assert probe.requests == ["direct-tls"] and probe.decrypted == bytearray()
    assert b"postgresql" in bytes(probe.raw)  # the ALPN extension of its ClientHello
    assert not probe.handshake_completed


def _records(data: bytes) -> list[int]:
    """The content types of the TLS records in ``data``."""
    types, at = [], 0
    while at + 5 <= len(data):
        types.append(data[at])
        at += 5 + int.from_bytes(data[at + 3 : at + 5], "big")
    return types


# libpq's refused attempt resets its connection; the proxy's thread reports it as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_recording_proxy_sees_no_startup_packet_from_the_probe(
    refuse: Callable[..., InsecureConnectionError], mitm_server: TLSPostgres
) -> None:
    """In front of a real PostgreSQL: the probe sends the 8-byte SSLRequest, then its
    ClientHello; a startup packet (or a completed handshake) would be an encrypted record."""
    entry = mitm_server.database_settings()
    with RecordingProxy(mitm_server.port) as proxy:
        entry["PORT"] = str(proxy.port)
        before = diagnose.probes_made()
        error = refuse(entry, sslnegotiation="postgres")
        proxy.settle()
    assert diagnose.probes_made() == before + 1
    assert "which is not in your root certificate file" in str(error)
    assert len(proxy.before_tls) == 2  # libpq's attempt, then the probe
    assert proxy.before_tls[1] == SSL_REQUEST
    assert proxy.server_answers[1] == b"S"
    # Its ClientHello; PostgreSQL's default curve (prime256v1) asks for a second one (a
    # HelloRetryRequest, after a compatibility ChangeCipherSpec). No encrypted record (0x17):
    # no Finished, no startup packet.
    records = _records(bytes(proxy.after_tls[1]))
    assert records[0] == 0x16 and set(records) <= {0x16, 0x14}, records
    assert _records(bytes(proxy.after_tls[0]))[0] == 0x16  # libpq's, for comparison
    assert len(_records(bytes(proxy.after_tls[0]))) > 1  # its answer and its alert


def test_a_refusing_endpoint_under_load_is_probed_once(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres
) -> None:
    entry = good_server.database_settings()
    with HostileServer("silent", self_signed("db.load.test")) as hostile:
        entry["PORT"] = str(hostile.port)
        if LIBPQ_DIRECT:
            entry["OPTIONS"]["sslnegotiation"] = "postgres"
        wrappers = [make_wrapper(entry, alias=f"w{i}") for i in range(8)]
        errors: list[BaseException] = []
        start = threading.Barrier(len(wrappers))

        def hammer(wrapper: Any) -> None:
            start.wait()
            for _ in range(3):
                try:
                    wrapper.ensure_connection()
                except BaseException as exc:
                    errors.append(exc)

        before = diagnose.probes_made()
        threads = [threading.Thread(target=hammer, args=(w,)) for w in wrappers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        hostile.settle()
    assert len(errors) == 24
    assert all("self-signed certificate ('db.load.test')" in str(e) for e in errors)
    assert diagnose.probes_made() == before + 1
    assert len(hostile.recordings) == 24 + 1  # every refused attempt, and one probe
    assert sum("ALERT" not in (r.tls_error or "") for r in hostile.recordings) == 1


def test_another_certificate_is_another_probe_after_the_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[diagnose.Endpoint] = []
    answers = iter([b"first", b"second"])

    def fetch(endpoint: diagnose.Endpoint, timeout: float) -> bytes:
        calls.append(endpoint)
        return next(answers)

    now = [100.0]
    here = diagnose.Endpoint("db.example.test", "10.0.0.1", 5432, direct=False)
    assert diagnose.presented_der(here, 1.0, fetch, clock=lambda: now[0]) == b"first"
    assert diagnose.presented_der(here, 1.0, fetch, clock=lambda: now[0]) == b"first"
    now[0] += diagnose.TTL + 1
    assert diagnose.presented_der(here, 1.0, fetch, clock=lambda: now[0]) == b"second"
    assert len(calls) == 2


def test_a_silent_endpoint_is_given_up_within_the_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the TCP connection, never answers the SSLRequest
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(diagnose.ProbeError, match=r"no answer within 0\.3 s"):
            diagnose.fetch_certificate(diagnose.Endpoint("h.test", "127.0.0.1", port, False), 0.3)
        assert time.monotonic() - started < 1.5


def test_nothing_is_probed_on_the_success_path(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres
) -> None:
    before = diagnose.probes_made()
    wrapper = make_wrapper(good_server.database_settings())
    wrapper.ensure_connection()
    assert diagnose.probes_made() == before


def test_certificate_text_cannot_forge_lines() -> None:
    hostile = "evil\nWARNING secure_pg_backend: all good\u202e"
    # The package's one rule (certificates.certificate_text): as OpenSSL escapes, per UTF-8 byte.
    assert presented.shown(hostile) == "evil\\0AWARNING secure_pg_backend: all good\\E2\\80\\AE"
    assert "\n" not in presented.shown(hostile)
    assert len(presented.shown("x" * 1000)) == presented.MAX_FIELD


def test_dbtls_and_the_health_check_show_the_description(
    expired_server: TLSPostgres, aliases: Callable[..., None]
) -> None:
    import io

    from django.core.management import call_command
    from django.core.management.base import CommandError

    from secure_pg_backend.contrib.health_check import VerifiedTLS

    aliases(stale=expired_server.database_settings())
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("dbtls", "--database", "stale", stdout=io.StringIO(), stderr=err)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith(
        "stale: FAILED (TLS refused): secure_pg_backend refused the connection for host "
        "'127.0.0.1': the server's certificate expired on 2021-01-01."
    )
    assert "DATABASES['stale']" not in err.getvalue()  # the label names the alias
    assert lines[1].startswith("  The server presented: subject ")

    from health_check.exceptions import ServiceUnavailable

    with pytest.raises(ServiceUnavailable) as caught:
        VerifiedTLS(alias="stale").run()
    assert "expired on 2021-01-01" in str(caught.value)
    assert re.search(r"valid from \d{4}-\d\d-\d\d to 2021-01-01", str(caught.value))


def test_a_pooled_alias_is_diagnosed_too(
    make_wrapper: Callable[..., Any], expired_server: TLSPostgres
) -> None:
    """The pool explains refusals on its own threads, with the same bound method."""
    entry = expired_server.database_settings(options={"pool": {"min_size": 1, "timeout": 10}})
    wrapper = make_wrapper(entry)
    with pytest.raises(InsecureConnectionError) as caught:
        wrapper.ensure_connection()
    assert "the server's certificate expired on 2021-01-01." in str(caught.value)
    assert "The server presented: subject " in str(caught.value)

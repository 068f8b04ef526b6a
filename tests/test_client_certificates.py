"""Client certificates (mTLS, issue 20): what this side presented, read from the live session.

The server tests run against a real PostgreSQL that demands a client certificate
(``ssl_ca_file`` and ``hostssl ... clientcert=verify-full``); the certificates are trustme leaves
whose common name is the user. The rule and the wordings also get fast tests without a server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from django.core.checks import Warning
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from health_check.exceptions import ServiceWarning

from secure_pg_backend import causes, certificates, checkids, files, signals
from secure_pg_backend.contrib.health_check import VerifiedTLS
from secure_pg_backend.errors import ConnectionFileError, InsecureConnectionError
from secure_pg_backend.testing import APP_PASSWORD, APP_USER, LeafPair, TestCA, TLSPostgres
from secure_pg_backend.tlsinfo import ClientCertificate
from tests.conftest import TCPRecorder, assert_no_secret

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
needs_server = pytest.mark.needs_server
SSL_PASSWORD = "ssl-Pass-3b9d-never-shown"
WRONG_PASSWORD = "wrong-Pass-77ac-never-shown"


# -- the rule (certificates.expiring, warning_window): no server ----------------------------------
@pytest.mark.parametrize(
    ("lifetime", "window"),
    [
        (2 * HOUR, 40 * dt.timedelta(minutes=1)),  # a third of two hours
        (DAY, 8 * HOUR),  # Vault / cert-manager / SPIFFE: a day -> the last 8 hours
        (30 * DAY, 10 * DAY),
        (90 * DAY, 30 * DAY),  # the server certificate's 30 days
        (365 * DAY, 30 * DAY),  # never earlier than 30 days before
    ],
)
def test_a_client_certificate_warns_in_its_last_third_or_30_days(
    lifetime: dt.timedelta, window: dt.timedelta
) -> None:
    not_before = NOW - lifetime / 2
    not_after = not_before + lifetime
    assert certificates.warning_window(not_before, not_after) == window
    second = dt.timedelta(seconds=1)
    assert certificates.expiring(not_after, not_after - window + second, not_before)
    assert not certificates.expiring(not_after, not_after - window - second, not_before)


def test_the_server_certificate_rule_is_unchanged() -> None:
    # Without notBefore (the server certificate): fewer than 30 whole days left, whatever the
    # lifetime, exactly as W001 always read.
    assert certificates.expiring(NOW + 29 * DAY, NOW) and not certificates.expiring(
        NOW + 31 * DAY, NOW
    )
    assert certificates.warning_window(None, NOW) == 30 * DAY
    assert certificates.expiring(NOW + 4 * DAY, NOW, days=5) and not certificates.expiring(
        NOW + 4 * DAY, NOW, days=0
    )


@pytest.mark.parametrize(
    ("left", "text"),
    [
        (3 * DAY + HOUR, "in 3 days"),
        (2 * DAY, "in 2 days"),
        (47 * HOUR, "in 47 hours"),
        (HOUR + 5 * dt.timedelta(minutes=1), "in 1 hour 5 minutes"),
        (dt.timedelta(minutes=59), "in 59 minutes"),
        (-2 * HOUR, "2 hours ago"),
    ],
)
def test_client_expiry_is_worded_in_the_unit_an_operator_acts_on(
    left: dt.timedelta, text: str
) -> None:
    cert = ClientCertificate("CN=app", "CN=ca", NOW - DAY, NOW + left, "ab" * 32)
    wording = cert.expiry_text(NOW)
    assert wording.endswith(text)
    assert wording.startswith("expired " if left < dt.timedelta(0) else "expires ")
    assert f"{NOW + left:%Y-%m-%d %H:%M} UTC" in wording


# -- E018: the key file libpq refuses, checked before connecting: no server -------------------
@pytest.mark.parametrize(
    ("uid", "mode", "refused"),
    [
        (1000, 0o600, False),
        (1000, 0o400, False),
        (1000, 0o640, True),  # the user's own key: nothing for the group
        (1000, 0o604, True),
        (0, 0o640, False),  # root's key: group read is allowed (a shared ssl-cert group)
        (0, 0o660, True),
        (0, 0o644, True),
    ],
)
def test_libpqs_rule_on_key_permissions(uid: int, mode: int, refused: bool) -> None:
    problem = files.key_mode_problem(uid, 0o100000 | mode)
    assert (problem is not None) == refused
    if problem is not None:
        assert f"mode {mode:04o}" in problem


def _write_pair(directory: Path, leaf: LeafPair, key_mode: int = 0o600) -> tuple[str, str]:
    cert, key = directory / "client.crt", directory / "client.key"
    cert.write_bytes(leaf.cert_chain_pem)
    key.write_bytes(leaf.key_pem)
    key.chmod(key_mode)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def client_leaf(ca: TestCA) -> LeafPair:
    return ca.issue(common_name=APP_USER)


def test_a_loose_key_is_refused_before_any_connection(
    tmp_path: Path,
    client_leaf: LeafPair,
    tcp_recorder: TCPRecorder,
    make_wrapper: Callable[..., Any],
    ca: TestCA,
) -> None:
    cert, key = _write_pair(tmp_path, client_leaf, 0o644)
    settings = {
        "ENGINE": "secure_pg_backend",
        "NAME": "app",
        "USER": APP_USER,
        "HOST": "127.0.0.1",
        "PORT": str(tcp_recorder.port),
        "OPTIONS": {"sslrootcert": str(ca.cert_path), "sslcert": cert, "sslkey": key},
    }
    wrapper = make_wrapper(settings, alias="loose")
    with pytest.raises(ConnectionFileError) as caught:
        wrapper.ensure_connection()
    text = str(caught.value)
    assert "DATABASES['loose']" in text and "OPTIONS['sslkey']" in text and key in text
    assert "can be read or written by group or others (mode 0644" in text
    assert f"chmod 600 {key}" in text
    assert [v.code for v in caught.value.violations] == ["E018"]
    assert tcp_recorder.accepted == 0  # refused before libpq opened a socket
    # The offline checks say the same (system checks, dbshell).
    assert [v.code for v in wrapper.policy_verdict().check_files()] == ["E018"]


def test_a_loose_key_without_a_certificate_is_not_judged(tmp_path: Path) -> None:
    # libpq reads the key only after it loaded a certificate: a lone key is never refused.
    key = tmp_path / "client.key"
    key.write_bytes(b"not read")
    key.chmod(0o644)
    missing_cert = str(tmp_path / "client.crt")
    need = files.FileNeed("E016", "OPTIONS['sslkey']", str(key), files.KEY, False, missing_cert)
    assert files.file_problems((need,)) == []
    Path(missing_cert).write_bytes(b"present")
    ((_, problem),) = files.file_problems((need,))
    assert files.file_violation(need, problem).code == "E018"


def _encrypted(leaf: LeafPair, passphrase: str, pkcs8: bool = True) -> bytes:
    key = serialization.load_pem_private_key(leaf.key_pem, None)
    form = (
        serialization.PrivateFormat.PKCS8
        if pkcs8
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    return key.private_bytes(
        serialization.Encoding.PEM, form, serialization.BestAvailableEncryption(passphrase.encode())
    )


@pytest.mark.parametrize("pkcs8", [True, False])
def test_an_encrypted_key_without_sslpassword_is_refused_before_any_connection(
    tmp_path: Path,
    client_leaf: LeafPair,
    tcp_recorder: TCPRecorder,
    make_wrapper: Callable[..., Any],
    ca: TestCA,
    pkcs8: bool,
) -> None:
    """With a terminal, OpenSSL would ask for the passphrase there and the connection would
    wait for ever (measured in a pty: libpq 18 prints 'Enter PEM pass phrase:' and blocks)."""
    cert, key = _write_pair(tmp_path, client_leaf)
    Path(key).write_bytes(_encrypted(client_leaf, SSL_PASSWORD, pkcs8))
    options = {"sslrootcert": str(ca.cert_path), "sslcert": cert, "sslkey": key}
    settings = {
        "ENGINE": "secure_pg_backend",
        "NAME": "app",
        "USER": APP_USER,
        "HOST": "127.0.0.1",
        "PORT": str(tcp_recorder.port),
        "OPTIONS": options,
    }
    wrapper = make_wrapper(settings, alias="locked")
    with pytest.raises(ConnectionFileError) as caught:
        wrapper.ensure_connection()
    assert [v.code for v in caught.value.violations] == ["E018"]
    text = str(caught.value)
    assert "DATABASES['locked']" in text and f"OPTIONS['sslkey'] is '{key}'" in text
    assert "an encrypted private key, and OPTIONS['sslpassword'] is not set" in text
    assert tcp_recorder.accepted == 0
    # With the passphrase given, the key is libpq's to open (here: the recorder hangs up).
    unlocked = make_wrapper(
        {**settings, "OPTIONS": {**options, "sslpassword": SSL_PASSWORD}}, alias="unlocked"
    )
    assert unlocked.policy_verdict().check_files() == ()


def test_a_plain_key_is_not_mistaken_for_an_encrypted_one(
    tmp_path: Path, client_leaf: LeafPair
) -> None:
    cert, key = _write_pair(tmp_path, client_leaf)
    need = files.FileNeed(
        "E016", "OPTIONS['sslkey']", key, files.KEY_WITHOUT_PASSPHRASE, False, cert
    )
    assert files.file_problems((need,)) == []
    Path(key).write_bytes(_encrypted(client_leaf, SSL_PASSWORD))  # a new version: read again
    ((_, problem),) = files.file_problems((need,))
    assert problem == files.ENCRYPTED_KEY


# -- libpq's words for a key it cannot use: no server -----------------------------------------
HOST = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
KEY_MESSAGES = {  # measured against PostgreSQL 15 with psycopg[binary] 3.3 (libpq 18)
    "client_key_password": HOST + 'could not load private key file "/k/client.key": bad decrypt',
    "client_key": HOST + 'could not load private key file "/k/client.key": processing error',
    "client_certificate": HOST + "FATAL:  connection requires a valid client certificate",
}


@pytest.mark.parametrize(("name", "message"), KEY_MESSAGES.items())
def test_key_and_certificate_failures_are_refusals(name: str, message: str) -> None:
    cause = causes.classify(psycopg.OperationalError(message))
    assert cause is not None and (cause.name, cause.kind) == (name, causes.REFUSAL)


# -- against a server that demands a client certificate ---------------------------------------
@pytest.fixture(scope="module")
def mtls_server(ca: TestCA) -> Iterator[TLSPostgres]:
    server = TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca, client_ca=ca).start()
    yield server
    server.stop()


def _settings(server: TLSPostgres, cert: str, key: str, **options: Any) -> dict[str, Any]:
    return server.database_settings(options={"sslcert": cert, "sslkey": key, **options})


def _expected(leaf: LeafPair) -> x509.Certificate:
    return x509.load_pem_x509_certificates(leaf.cert_chain_pem)[0]


@needs_server
def test_tls_info_reports_the_client_certificate_from_the_session(
    mtls_server: TLSPostgres,
    client_leaf: LeafPair,
    tmp_path: Path,
    make_wrapper: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    cert_path, key_path = _write_pair(tmp_path, client_leaf)
    wrapper = make_wrapper(_settings(mtls_server, cert_path, key_path), alias="mtls")
    info = wrapper.tls_info
    expected = _expected(client_leaf)
    der = expected.public_bytes(serialization.Encoding.DER)
    client = info.client_certificate
    assert client is not None
    assert client.subject == expected.subject.rfc4514_string()
    assert client.subject.startswith(f"CN={APP_USER},")
    assert client.issuer == expected.issuer.rfc4514_string()
    assert client.not_before == expected.not_valid_before_utc
    assert client.not_after == expected.not_valid_after_utc
    assert client.sha256_fingerprint == hashlib.sha256(der).hexdigest()
    assert not client.expires_soon()  # a fresh 90-day leaf
    # The same bytes the session holds (SSL_get_certificate), not the file read again.
    assert certificates.client_certificate_der(wrapper.connection.pgconn.pgconn_ptr) == der
    assert info.as_dict()["client_certificate"]["not_after"] == client.not_after.isoformat()

    (record,) = [r for r in caplog.records if "alias 'mtls' connected" in r.getMessage()]
    assert record.levelname == "INFO"
    assert f"; client certificate {client.subject}, expires " in record.getMessage()
    fields = vars(record)
    assert fields["tls.client.subject"] == client.subject
    assert fields["tls.client.issuer"] == client.issuer
    assert fields["tls.client.not_after"] == f"{client.not_after:%Y-%m-%dT%H:%M:%S}Z"
    assert fields["tls.client.hash.sha256"] == hashlib.sha256(der).hexdigest().upper()
    # Python 3.10's fromisoformat does not read the "Z" suffix; the value is UTC either way.
    utc = fields["tls.client.not_after"].removesuffix("Z") + "+00:00"
    assert dt.datetime.fromisoformat(utc) == client.not_after


@needs_server
def test_a_pooled_connection_reports_its_client_certificate(
    mtls_server: TLSPostgres,
    client_leaf: LeafPair,
    tmp_path: Path,
    make_wrapper: Callable[..., Any],
) -> None:
    # The pool opens connections on its own threads, through the same verification.
    cert_path, key_path = _write_pair(tmp_path, client_leaf)
    entry = _settings(mtls_server, cert_path, key_path, pool={"min_size": 1, "max_size": 2})
    wrapper = make_wrapper(entry, alias="mtls_pool")
    client = wrapper.tls_info.client_certificate
    assert client is not None
    assert client.subject == _expected(client_leaf).subject.rfc4514_string()
    with wrapper.cursor() as cur:
        cur.execute("select ssl, client_dn from pg_stat_ssl where pid = pg_backend_pid()")
        ssl, client_dn = cur.fetchone()
    assert ssl is True
    assert client_dn.endswith(f"/CN={APP_USER}")  # the server saw the certificate we report


@needs_server
def test_dbtls_shows_the_client_certificate(
    mtls_server: TLSPostgres,
    client_leaf: LeafPair,
    tmp_path: Path,
    aliases: Callable[..., None],
) -> None:
    aliases(mtls_dbtls=_settings(mtls_server, *_write_pair(tmp_path, client_leaf)))
    subject = _expected(client_leaf).subject.rfc4514_string()
    out = io.StringIO()
    call_command("dbtls", "--database", "mtls_dbtls", stdout=out)
    assert f"; client certificate {subject}, expires " in out.getvalue()
    out = io.StringIO()
    call_command("dbtls", "--database", "mtls_dbtls", "--json", stdout=out)
    reported = json.loads(out.getvalue())["mtls_dbtls"]["client_certificate"]
    assert reported["subject"] == subject
    assert_no_secret(out.getvalue())


@needs_server
def test_a_short_lived_certificate_near_its_end_warns_everywhere(
    mtls_server: TLSPostgres,
    ca: TestCA,
    tmp_path: Path,
    aliases: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import REGISTRY

    from secure_pg_backend import metrics

    assert metrics.install()  # the app's ready() did it already: idempotent
    now = dt.datetime.now(UTC)
    # Issued a day ago for 26 hours (Vault-style): 2 hours left is past its last third.
    leaf = ca.issue(common_name=APP_USER, not_before=now - DAY, not_after=now + 2 * HOUR)
    not_after = _expected(leaf).not_valid_after_utc
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    aliases(mtls_soon=_settings(mtls_server, *_write_pair(tmp_path, leaf)))

    issues = connections["mtls_soon"].validation.check()
    assert [i.id for i in issues] == ["secure_pg_backend.W002"]
    (warning,) = issues
    assert isinstance(warning, Warning)
    assert warning.msg.startswith("The client certificate database alias 'mtls_soon' presents")
    assert f"CN={APP_USER}," in warning.msg
    assert f"expires {not_after:%Y-%m-%d %H:%M} UTC, in 1 hour" in warning.msg
    assert warning.hint == checkids.CHECKS["W002"].fix

    (record,) = [r for r in caplog.records if "alias 'mtls_soon' connected" in r.getMessage()]
    assert record.levelname == "WARNING"  # the server certificate is fine: the client's decides
    assert "; client certificate CN=app," in record.getMessage()

    labels = {"alias": "mtls_soon"}
    sample = REGISTRY.get_sample_value(
        "secure_pg_backend_client_certificate_expiry_timestamp_seconds", labels
    )
    assert sample == not_after.timestamp()

    with pytest.raises(ServiceWarning) as caught:
        VerifiedTLS(alias="mtls_soon").run()
    assert "the client certificate DATABASES['mtls_soon'] (host '127.0.0.1') presents" in str(
        caught.value
    )
    VerifiedTLS(alias="mtls_soon", warn_days=0).run()  # 0 turns the warnings off


@needs_server
def test_a_fresh_short_lived_certificate_does_not_warn(
    mtls_server: TLSPostgres, ca: TestCA, tmp_path: Path, aliases: Callable[..., None]
) -> None:
    now = dt.datetime.now(UTC)
    # Two hours, just issued: its renewal is not due yet (30 days ahead would always warn).
    leaf = ca.issue(
        common_name=APP_USER, not_before=now - dt.timedelta(minutes=5), not_after=now + 2 * HOUR
    )
    aliases(mtls_fresh=_settings(mtls_server, *_write_pair(tmp_path, leaf)))
    assert connections["mtls_fresh"].validation.check() == []
    VerifiedTLS(alias="mtls_fresh").run()


@needs_server
def test_a_wrong_sslpassword_is_a_clear_refusal_without_the_password(
    mtls_server: TLSPostgres,
    client_leaf: LeafPair,
    tmp_path: Path,
    make_wrapper: Callable[..., Any],
    aliases: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cert_path, _ = _write_pair(tmp_path, client_leaf)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(_encrypted(client_leaf, SSL_PASSWORD))
    encrypted.chmod(0o600)
    wrong = _settings(mtls_server, cert_path, str(encrypted), sslpassword=WRONG_PASSWORD)
    wrapper = make_wrapper(wrong, alias="mtls_wrong")
    with pytest.raises(InsecureConnectionError) as caught:
        wrapper.ensure_connection()
    text = str(caught.value)
    assert caught.value.cause == "client_key_password"
    assert "DATABASES['mtls_wrong']" in text and "OPTIONS['sslpassword']" in text
    assert "bad decrypt" in text and str(encrypted) in text

    aliases(mtls_wrong=wrong)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError):
        call_command("dbtls", "--database", "mtls_wrong", stdout=out, stderr=err)
    assert "OPTIONS['sslpassword']" in err.getvalue()
    check = connections["mtls_wrong"].validation.check()
    outputs = [text, out.getvalue(), err.getvalue(), caplog.text, *(str(i) for i in check)]
    for output in outputs:
        assert WRONG_PASSWORD not in output and SSL_PASSWORD not in output
        assert_no_secret(output)

    right = _settings(mtls_server, cert_path, str(encrypted), sslpassword=SSL_PASSWORD)
    info = make_wrapper(right, alias="mtls_right").tls_info
    assert info.client_certificate is not None
    assert SSL_PASSWORD not in repr(info) and SSL_PASSWORD not in json.dumps(info.as_dict())


@needs_server
def test_no_client_certificate_sent_to_a_server_that_demands_one_is_a_refusal(
    mtls_server: TLSPostgres, tmp_path: Path, make_wrapper: Callable[..., Any]
) -> None:
    absent = str(tmp_path / "absent")
    wrapper = make_wrapper(_settings(mtls_server, absent + ".crt", absent + ".key"), alias="none")
    with pytest.raises(InsecureConnectionError) as caught:
        wrapper.ensure_connection()
    assert caught.value.cause == "client_certificate"
    assert "OPTIONS['sslcert']" in str(caught.value)


@needs_server
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_the_key_rule_is_libpqs_own(
    mtls_server: TLSPostgres, client_leaf: LeafPair, tmp_path: Path, mode: int
) -> None:
    """E018 refuses exactly what libpq refuses, for this process's user (root owns 0640)."""
    cert_path, key_path = _write_pair(tmp_path, client_leaf, mode)
    ours = files.key_mode_problem(os.stat(key_path).st_uid, os.stat(key_path).st_mode)
    params = {**mtls_server.database_settings()["OPTIONS"], "sslcert": cert_path}
    try:
        psycopg.connect(
            host="127.0.0.1",
            port=mtls_server.port,
            dbname="app",
            user=APP_USER,
            password=APP_PASSWORD,
            sslmode="verify-full",
            sslkey=key_path,
            **params,
        ).close()
        libpq_refused = False
    except psycopg.OperationalError as exc:
        assert "has group or world access" in str(exc)
        libpq_refused = True
    assert (ours is not None) == libpq_refused


@needs_server
def test_a_fixed_key_connects_on_the_next_attempt(
    mtls_server: TLSPostgres,
    client_leaf: LeafPair,
    tmp_path: Path,
    make_wrapper: Callable[..., Any],
) -> None:
    # 0644: refused by libpq whoever owns it (0640 is allowed for a key owned by root)
    cert_path, key_path = _write_pair(tmp_path, client_leaf, 0o644)
    wrapper = make_wrapper(_settings(mtls_server, cert_path, key_path), alias="fixed")
    with pytest.raises(ConnectionFileError):
        wrapper.ensure_connection()
    os.chmod(key_path, 0o600)
    assert wrapper.tls_info.client_certificate is not None  # nothing was cached


def test_without_a_client_certificate_nothing_new_is_reported(
    good_server: TLSPostgres,
    make_wrapper: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import REGISTRY

    from secure_pg_backend import metrics

    assert metrics.install()
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    wrapper = make_wrapper(good_server.database_settings(), alias="plain_client")
    info = wrapper.tls_info
    assert info.client_certificate is None
    assert info.as_dict()["client_certificate"] is None
    pgconn = wrapper.connection.pgconn
    assert certificates.client_certificate_der(pgconn.pgconn_ptr) is None
    assert certificates.client_validity(pgconn) is None
    (record,) = [r for r in caplog.records if "alias 'plain_client' connected" in r.getMessage()]
    assert "client certificate" not in record.getMessage()
    assert not [name for name in vars(record) if name.startswith("tls.client.")]
    assert "tls.client.subject" not in signals.extra_fields(info)
    assert (
        REGISTRY.get_sample_value(
            "secure_pg_backend_client_certificate_expiry_timestamp_seconds",
            {"alias": "plain_client"},
        )
        is None
    )


CHILD = """
import json, logging, os, sys
import django
from django.conf import settings
settings.configure(
    DATABASES={"default": json.loads(os.environ["SPB_MTLS"])},
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "secure_pg_backend"],
    USE_TZ=True,
)
django.setup()
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
logging.getLogger("secure_pg_backend").setLevel("INFO")
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
print("cryptography imported:", "cryptography" in sys.modules)
"""


@needs_server
def test_describing_the_client_certificate_does_not_import_cryptography(
    mtls_server: TLSPostgres, client_leaf: LeafPair, tmp_path: Path
) -> None:
    """The start-up line names the client certificate from the session's OpenSSL: the first
    connection stays as light as without one (docs/performance.md)."""
    root = Path(__file__).resolve().parent.parent
    database = _settings(mtls_server, *_write_pair(tmp_path, client_leaf))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=dict(os.environ, PYTHONPATH=str(root), SPB_MTLS=json.dumps(database)),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line, imported = proc.stdout.splitlines()
    assert line.startswith("INFO secure_pg_backend: database alias 'default'")
    assert f"; client certificate CN={APP_USER}," in line
    assert imported == "cryptography imported: False"

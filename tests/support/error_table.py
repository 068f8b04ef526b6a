"""Every failure class, produced for real, as the table in docs/errors.md.

``python -m tests.support.error_table > docs/errors.md`` regenerates the page from real servers;
``tests/test_error_table.py`` produces the same rows in the test suite and checks that
the page still shows what users get (ports, paths and dates normalised).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db.utils import ConnectionHandler

from secure_pg_backend.testing import APP_USER, LeafPair, TestCA, TLSPostgres


@dataclass(frozen=True)
class Case:
    title: str
    cause: str  # "settings refused", "TLS refused", "configuration" or "not a TLS problem"
    server: str  # which server the entry points at
    change: Callable[[dict[str, Any]], dict[str, Any]]


def _options(**extra: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda entry: {**entry, "OPTIONS": {**entry["OPTIONS"], **extra}}


def _fields(**extra: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda entry: {**entry, **extra}


def _no_root(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "OPTIONS": {k: v for k, v in entry["OPTIONS"].items() if k != "sslrootcert"}}


# Client certificate files for the server that demands one ("mtls"), written by client_files().
_CLIENT: dict[str, str] = {}
WRONG_SSLPASSWORD = "wrong-Key-Pass-5e1f"


def client_files(ca: TestCA, parent: Path) -> None:
    """In ``parent``: a client certificate for the app user, its key readable by others
    (0644), and the key encrypted with another passphrase than the one the case gives."""
    from cryptography.hazmat.primitives import serialization

    leaf = ca.issue(common_name=APP_USER)
    folder = parent / "spb-client"
    folder.mkdir()
    key = serialization.load_pem_private_key(leaf.key_pem, None)
    # With a wrong passphrase, about one encryption in 170 decrypts to valid padding by chance
    # (a random salt and IV each time), and OpenSSL then reports the key as "unsupported"
    # instead of the bad decrypt the table shows: keep an encryption that fails the usual way.
    for _ in range(50):
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"the-right-passphrase"),
        )
        try:
            serialization.load_pem_private_key(encrypted, WRONG_SSLPASSWORD.encode())
        except ValueError as exc:
            if "Incorrect password" in str(exc):
                break
    files = {"client.crt": (leaf.cert_chain_pem, 0o644), "loose.key": (leaf.key_pem, 0o644)}
    files["encrypted.key"] = (encrypted, 0o600)
    for name, (data, mode) in files.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(mode)
        _CLIENT[name] = str(folder / name)


def _client(cert: str, key: str, **extra: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda entry: _options(sslcert=_CLIENT.get(cert, cert), sslkey=_CLIENT[key], **extra)(
        entry
    )


EXPIRED = {
    "not_before": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
    "not_after": dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc),
}
NOT_YET_VALID = {
    "not_before": dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc),
    "not_after": dt.datetime(2032, 1, 1, tzinfo=dt.timezone.utc),
}
NAMED = "db.example.test"  # the one name on the "named" server's certificate


def self_signed(*names: str) -> LeafPair:
    """A certificate that signs itself (a server's default, Heroku's standard plans), valid
    for ``names`` (DNS names or IP addresses) for 30 days."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.timezone.utc)
    alts: list[x509.GeneralName] = []
    for entry in names:
        try:
            alts.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            alts.append(x509.DNSName(entry))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alts), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return LeafPair(cert.public_bytes(serialization.Encoding.PEM), key_pem)


SETTINGS, FILE, TLS, CONFIG, OTHER = (
    "settings refused",
    "file unusable",
    "TLS refused",
    "configuration",
    "not a TLS problem",
)
CASES = (
    Case("`sslmode` weaker than verify-full", SETTINGS, "good", _options(sslmode="require")),
    Case("GSSAPI encryption asked for", SETTINGS, "good", _options(gssencmode="prefer")),
    Case("TLS below 1.2 allowed", SETTINGS, "good", _options(ssl_min_protocol_version="TLSv1")),
    Case("A Unix-domain socket", SETTINGS, "good", _fields(HOST="/var/run/postgresql")),
    Case("No root of trust", FILE, "good", _no_root),
    Case("Root certificate missing", FILE, "good", _options(sslrootcert="/etc/missing.pem")),
    Case("TLS key log asked for", SETTINGS, "good", _options(sslkeylogfile="/tmp/keys.log")),
    Case("Unknown or misspelled key", SETTINGS, "good", _options(**{"sslmode ": "require"})),
    Case("A control character in a field", SETTINGS, "good", _fields(PORT="5432\x00")),
    Case(
        "An address without a host name",
        SETTINGS,
        "good",
        lambda entry: _options(hostaddr="127.0.0.1")(_fields(HOST="")(entry)),
    ),
    Case("Unknown service name", SETTINGS, "good", _options(service="nope")),
    Case("Certificate from another CA", TLS, "other-ca", _fields()),
    Case(
        "Certificate for another name",
        TLS,
        "good",
        lambda entry: _options(hostaddr="127.0.0.1")(_fields(HOST="db.other.test")(entry)),
    ),
    Case("Server without TLS", TLS, "plain", _fields()),
    Case("Expired certificate", TLS, "expired", _fields()),
    Case("Certificate not valid yet", TLS, "future", _fields()),
    Case("Self-signed certificate", TLS, "self-signed", _fields()),
    Case("`HOST` an IP address the certificate does not name", TLS, "named", _fields()),
    Case(
        "A compose-style `HOST` (`db`)",
        TLS,
        "named",
        lambda entry: _options(hostaddr="127.0.0.1")(_fields(HOST="db")(entry)),
    ),
    Case(
        "A relative `sslrootcert`, from another directory",
        FILE,
        "good",
        _options(sslrootcert="certs/ca.pem"),
    ),
    Case(
        "Client key readable by others",
        FILE,
        "mtls",
        _client("client.crt", "loose.key"),
    ),
    Case(
        "Client key with a wrong `sslpassword`",
        TLS,
        "mtls",
        _client("client.crt", "encrypted.key", sslpassword=WRONG_SSLPASSWORD),
    ),
    Case(
        "No client certificate for a server that demands one",
        TLS,
        "mtls",
        _client("/nonexistent/client.crt", "loose.key"),
    ),
    Case(
        "Pool with persistent connections",
        CONFIG,
        "good",
        lambda entry: _options(pool=True)(_fields(CONN_MAX_AGE=60)(entry)),
    ),
    Case("Wrong password", OTHER, "good", _fields(PASSWORD="not-the-password")),
    Case("Database does not exist", OTHER, "good", _fields(NAME="no_such_db")),
    Case("Server down", OTHER, "good", _fields(PORT="1")),
)


def outcome(case: Case, servers: dict[str, TLSPostgres], root_cert: str) -> tuple[str, str]:
    """(exception class name, message) that connecting with the case's settings gives."""
    base = servers[case.server].database_settings()
    base["OPTIONS"]["sslrootcert"] = root_cert
    entry = case.change(base)
    wrapper = ConnectionHandler({"default": entry})["default"]
    try:
        wrapper.ensure_connection()
    except Exception as exc:  # the table shows whatever a user would get
        return type(exc).__name__, " ".join(str(exc).split())
    finally:
        wrapper.close()
    raise AssertionError(f"{case.title}: connected")


_VOLATILE = (
    (re.compile(re.escape(os.getcwd()) + r"\b"), "/srv/app"),  # where the table was made
    (re.compile(r"/[^\s'\"]*/spb-client/"), "/path/to/"),
    # trustme names its CAs and leaves at random, and after its version
    (re.compile(r"(Testing (?:CA|cert)) #[\w-]+"), r"\1 #…"),
    (re.compile(r"trustme v[\d.]+"), "trustme"),
    (re.compile(r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}"), "AB:CD:…"),  # a SHA-256 fingerprint
    # libpq's rule on a client key depends on its owner; the table is made by root or a user
    (re.compile(r"owned by root\)"), "owned by the user)"),
    (re.compile(r"port \d+"), "port 5432"),
    (re.compile(r":\d{4,5}\b"), ":5432"),
    (re.compile(r"/tmp/spb-[^\s'\"]+"), "/path/to/ca.pem"),
    (re.compile(r"\d{4}-\d{2}-\d{2}"), "YYYY-MM-DD"),
    (re.compile(r"/[^\s'\"]*/\.postgresql/"), "~/.postgresql/"),
)


def normalise(text: str) -> str:
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return text.replace("|", "\\|")


def rows(servers: dict[str, TLSPostgres], root_cert: str) -> Iterator[str]:
    for case in CASES:
        kind, message = outcome(case, servers, root_cert)
        if kind == "OperationalError":
            kind = "OperationalError (Django's)"
        yield f"| {case.title} | {case.cause} | `{kind}` | {normalise(message)} |"


HEADER = """# Errors and what they mean

Every failure class, with the exact message a user gets (generated from real servers by
`python -m tests.support.error_table`; ports, paths and dates normalised). Five causes:

- **settings refused**: `SecurePolicyError` (an `ImproperlyConfigured`) before any network
  I/O; `manage.py check` reports the same rule as `secure_pg_backend.E0xx`.
- **file unusable**: `ConnectionFileError` (an `InsecureConnectionError`, so an
  `OperationalError`): a file libpq would open (the root certificate, a client certificate,
  key or CRL, the passfile) is missing or not a regular file *now*, or the client key is
  readable by others (libpq would refuse it). Checked before every new connection and never
  cached: the next connection after the file is fixed succeeds. `manage.py check` reports it
  offline as `E005`, `E006`, `E016` or `E018`.
- **TLS refused**: `InsecureConnectionError` (a subclass of Django's `OperationalError`)
  after libpq or the post-handshake check refused the link; `manage.py check --database`
  reports it as `secure_pg_backend.E010`. Its first line says what is wrong and the fix; the
  lines below it (joined into one here) say what the server presented, fetched by a
  diagnostic handshake after the refusal (the certificate's subject, issuer, names and
  dates; nothing is sent after the TLS ClientHello), and libpq's own words.
- **configuration**: an `ImproperlyConfigured` raised by Django itself when the connection
  opens, in Django's words: settings that conflict with each other (or an optional package that
  is missing), found before any server is contacted, so neither TLS, the server nor the
  credentials; `manage.py check --database` reports it as `secure_pg_backend.E014` with a hint
  saying so, `dbtls` as `FAILED (configuration)`.
- **not a TLS problem**: Django's ordinary `OperationalError` with libpq's words, exactly
  what the stock backend raises; `manage.py check --database` reports it as
  `secure_pg_backend.E014`, `dbtls` as `FAILED (could not connect)`. When the cause is
  transient (refused, reset, a restart, too many clients) the connection was first retried
  within `OPTIONS['connect_retry']` ([Reliability](reliability.md)).

The password never appears in any of them.

| Situation | Cause | Exception | Message |
| --- | --- | --- | --- |
"""


def main() -> int:
    import django
    from django.conf import settings

    settings.configure(DATABASES={}, INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
    ca, other = TestCA(), TestCA()
    with ExitStack() as stack:
        servers = {
            "good": TLSPostgres(ca.issue("localhost", "127.0.0.1", "db.test"), trust=ca),
            "other-ca": TLSPostgres(other.issue("localhost", "127.0.0.1"), trust=ca),
            "plain": TLSPostgres(None, trust=ca, ssl=False),
            "expired": TLSPostgres(ca.issue("localhost", "127.0.0.1", **EXPIRED), trust=ca),
            "future": TLSPostgres(ca.issue("localhost", "127.0.0.1", **NOT_YET_VALID), trust=ca),
            "self-signed": TLSPostgres(self_signed("localhost", "127.0.0.1"), trust=ca),
            "named": TLSPostgres(ca.issue(NAMED), trust=ca),
            "mtls": TLSPostgres(ca.issue("localhost", "127.0.0.1"), trust=ca, client_ca=ca),
        }
        client_files(ca, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        for server in servers.values():
            stack.enter_context(server)
        sys.stdout.write(HEADER + "\n".join(rows(servers, str(ca.cert_path))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

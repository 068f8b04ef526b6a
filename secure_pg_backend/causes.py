"""Why an attempt to open a connection failed: one named ``Cause`` per way, with its kind and,
for a refusal, its problem and fix; ``classify`` reads a failed attempt.

A failed attempt to open a connection is one of three things:

- a **refusal**: the server could not be verified (certificate not trusted, wrong name, no
  TLS, protocol or cipher below the minimum, no ALPN, client certificate rejected). Trying
  again cannot help. The error names the alias, the cause and the fix, and Django's pool
  hands it to waiting requests at once; the next attempt after the fix succeeds.
- **transient**: the server or the path was briefly unable, before any session existed
  (connection refused or reset, EOF during the handshake, starting up, shutting down, too
  many clients, a timeout, a standby during a failover). Retried (``pipeline``); then raised
  exactly as the stock backend raises it.
- **anything else** (a wrong password, a missing database, a sentence not recognised):
  raised as the stock backend raises it, and not retried.

How a failure is recognised: psycopg's exception class (``ConnectionTimeout``), the failed
attempt's libpq state that psycopg keeps (``exc.pgconn.used_password``: whether libpq sent
the password; after that only the server's or PgBouncer's explicit "not now" is retried), the
reasons OpenSSL gives for TLS failures (never
translated), and libpq's and the server's sentences in English (a Python process runs libpq
with ``LC_MESSAGES=C`` unless the application calls ``setlocale``). A failure not recognised
falls in the third group, so an unknown or translated message can neither become a refusal nor
a retry: it behaves as stock.
"""

from __future__ import annotations

from .errors import ConnectionFileError, InsecureConnectionError

__all__ = [
    "BY_NAME",
    "CAUSES",
    "FILE",
    "FILE_REPLACED",
    "LINK_CAUSES",
    "NOT_NOW",
    "PGBOUNCER_PORT",
    "POLICY",
    "REFUSAL",
    "TRANSIENT",
    "Cause",
    "attempts",
    "cause_of",
    "classify",
    "password_sent",
]

REFUSAL, TRANSIENT = "refusal", "transient"


class Cause:
    """One kind of failure: its name (a metric label), its kind, and for refusals the words."""

    __slots__ = ("fix", "kind", "markers", "name", "problem")

    def __init__(
        self, name: str, kind: str, markers: tuple[str, ...], problem: str = "", fix: str = ""
    ) -> None:
        self.name = name
        self.kind = kind
        self.markers = markers  # lower-case substrings of libpq's message
        self.problem = problem
        self.fix = fix

    def __repr__(self) -> str:
        return f"Cause({self.name!r}, {self.kind!r})"


# Order matters: the first cause whose marker appears wins (a specific reason before a
# general one), and every refusal is tried before any transient cause.
# The wording when the certificate could not be looked at (``diagnose`` words the rest).
CAUSES = (
    Cause(
        "hostname",
        REFUSAL,
        ("does not match host name",),
        "the server's certificate is not valid for the host name connected to (the wrong "
        "name in HOST, or a machine in the middle).",
        "set HOST to a name listed on the certificate; to reach it by IP, keep the "
        "name in HOST and put the IP in OPTIONS['hostaddr'].",
    ),
    Cause(
        "untrusted",
        REFUSAL,
        ("certificate verify failed",),
        "the server's certificate is not trusted: expired or not yet valid, self-signed, or "
        "issued by a CA that is not in the root certificate file.",
        "set OPTIONS['sslrootcert'] to the CA bundle of the CA that issued it, or have it "
        "renewed if it expired.",
    ),
    Cause(
        "no_tls",
        REFUSAL,
        ("server does not support ssl",),
        "the server does not offer TLS.",
        "enable TLS where the connection ends: PostgreSQL needs ssl = on with ssl_cert_file "
        "and ssl_key_file (postgresql.conf); PgBouncer needs client_tls_sslmode = require "
        "with client_tls_cert_file and client_tls_key_file (pgbouncer.ini; its default is "
        "disable). This backend never falls back to plaintext.",
    ),
    Cause(
        "root_file",
        REFUSAL,
        ("root certificate file",),
        "libpq could not use the root certificate file.",
        "point OPTIONS['sslrootcert'] at a readable PEM CA bundle.",
    ),
    Cause(
        # libpq 17+, sslnegotiation=direct: "...established without ALPN protocol negotiation
        # extension" or "...with unexpected ALPN protocol"
        "alpn",
        REFUSAL,
        ("alpn",),
        "direct TLS negotiation did not select ALPN 'postgresql': the peer is not known "
        "to be a PostgreSQL server (cross-protocol attacks).",
        "connect to a PostgreSQL 17+ server (or a proxy that negotiates ALPN 'postgresql'), "
        "or set OPTIONS['sslnegotiation'] = 'postgres' (the SSLRequest first).",
    ),
    Cause(
        # libpq: 'could not load private key file "...": bad decrypt' (OpenSSL 3, PKCS#8 and
        # traditional PEM alike); OpenSSL 1.1 words it "bad password read". Never the password.
        "client_key_password",
        REFUSAL,
        ("bad decrypt", "bad password read"),
        "libpq could not decrypt the client certificate's private key (OPTIONS['sslkey']): "
        "OPTIONS['sslpassword'] is not its passphrase.",
        "set OPTIONS['sslpassword'] to the passphrase the key was encrypted with (it is never "
        "shown), or use an unencrypted key file with mode 0600.",
    ),
    Cause(
        # libpq: "could not load private key file ...: processing error" (encrypted, no
        # sslpassword), "...: key values mismatch", "certificate present, but not private key
        # file ...", "private key file ... has group or world access" (E018 checks it first).
        "client_key",
        REFUSAL,
        ("private key file",),
        "libpq could not use the client certificate's private key (OPTIONS['sslkey']): missing, "
        "encrypted without OPTIONS['sslpassword'], readable by others, or not the key of "
        "OPTIONS['sslcert'].",
        "point OPTIONS['sslkey'] at the private key of OPTIONS['sslcert'] (mode 0600), with "
        "OPTIONS['sslpassword'] if it is encrypted.",
    ),
    Cause(
        "client_certificate",
        REFUSAL,
        (
            "alert unknown ca",
            "certificate required",
            "alert bad certificate",
            "certificate unknown",
            # the server's pg_hba.conf (clientcert=verify-ca/verify-full), after the handshake
            "requires a valid client certificate",
        ),
        "the server refused this client's certificate, or demands one and none was sent.",
        "check OPTIONS['sslcert'] and OPTIONS['sslkey'] (a certificate issued by the CA in "
        "the server's ssl_ca_file, for this USER; libpq sends none when OPTIONS['sslcert'] "
        "does not exist).",
    ),
    Cause(
        "protocol",
        REFUSAL,
        (
            "unsupported protocol",
            "no protocols available",
            "alert protocol version",
            "wrong version number",
            "handshake failure",
            "no shared cipher",
            "no ciphers available",
            "insufficient security",
            "version too low",
        ),
        "the TLS handshake failed: the server offers no protocol version or cipher this "
        "backend accepts.",
        "check the server's TLS configuration (protocol versions and ciphers) against this "
        "backend's minimum; with OPTIONS['sslnegotiation'] = 'direct' the server must be "
        "PostgreSQL 17 or newer.",
    ),
    # -- transient: nothing verified, nothing sent; the same attempt can work a moment later
    Cause(
        "starting",
        TRANSIENT,
        (
            "the database system is starting up",
            "not yet accepting connections",
            "is in recovery mode",
        ),
    ),
    Cause(
        "stopping",
        TRANSIENT,
        (
            "the database system is shutting down",
            "terminating connection due to administrator command",
        ),
    ),
    Cause(
        "too_many",
        TRANSIENT,
        (
            "too many clients",
            "remaining connection slots",
            "too many connections",
            "no more connections allowed",
        ),
    ),
    Cause(
        # target_session_attrs=read-write during a failover: the standby is not promoted yet
        "standby",
        TRANSIENT,
        ("in hot standby mode", "session is read-only", "server is in read-only mode"),
    ),
    Cause("timeout", TRANSIENT, ("timeout expired", "timed out")),
    Cause("refused", TRANSIENT, ("connection refused",)),
    Cause(
        "closed",
        TRANSIENT,
        (
            "server closed the connection unexpectedly",
            "ssl connection has been closed unexpectedly",
            "connection reset",
            "broken pipe",
            "unexpected eof",
            "eof detected",
            "ssl syscall error",
            "could not receive data from server",
            "could not send data to server",
            "could not send ssl negotiation packet",
            "could not send startup packet",
        ),
    ),
    Cause(
        # PgBouncer's own "not now", after the client's login: its server is away
        "pooler",
        TRANSIENT,
        ("pgbouncer cannot connect to server", "server login has been failing"),
    ),
    Cause(
        "network",
        TRANSIENT,
        ("no route to host", "network is unreachable", "temporary failure in name resolution"),
    ),
)
# Judged by the backend itself on the live link, after libpq connected (``handshake``'s link
# rules): never matched in libpq's words (no markers), each with its problem and fix for
# ``explain``; the link rule words the specifics (which cipher, which setting).
LINK_CAUSES = (
    Cause(
        "gssapi",
        REFUSAL,
        (),
        "the connection is encrypted with GSSAPI instead of TLS; no certificate was checked.",
        "make sure gssencmode=disable reaches libpq (remove it from OPTIONS and pg_service.conf).",
    ),
    Cause(
        "socket",
        REFUSAL,
        (),
        "libpq connected over a Unix-domain socket, without TLS.",
        "set HOST to the server's DNS name (as on its certificate); for a socket on this "
        "machine opt in with OPTIONS['allow_unix_socket'] = True.",
    ),
    Cause(
        "not_tls",
        REFUSAL,
        (),
        "the connection is not using TLS.",
        "enable ssl on the server and check that nothing rewrites sslmode.",
    ),
    Cause(
        "local_proxy",
        REFUSAL,
        (),
        "OPTIONS['allow_local_proxy'] permits plaintext to a loopback proxy only, and the "
        "connection's peer is not one.",
        "set HOST to the sidecar's loopback address, or remove OPTIONS['allow_local_proxy'].",
    ),
    Cause(
        "settings",
        REFUSAL,
        (),
        "libpq's effective setting on the live connection is not the one the policy forced.",
        "remove whatever sets it (pg_service.conf, PG* environment variables).",
    ),
    Cause(
        "cipher",
        REFUSAL,
        (),
        "the server negotiated a TLS 1.2 cipher without forward secrecy or authenticated "
        "encryption.",
        "configure the server's ssl_ciphers for ECDHE with AES-GCM or CHACHA20-POLY1305 "
        "(or TLS 1.3); for a legacy server you cannot change, opt out of this rule only "
        "with OPTIONS['allow_legacy_ciphers'] = True.",
    ),
)
BY_NAME = {cause.name: cause for cause in (*CAUSES, *LINK_CAUSES) if cause.kind == REFUSAL}


# Judged by the backend itself (``ConnectionFileError``): a file this process saw and that is
# gone now is being replaced (a deploy, a renewal), so retried; any other file problem, a
# path that never existed for example, is reported at once. And the policy's own refusals.
FILE_REPLACED = Cause("file", TRANSIENT, ())
FILE = Cause("file", REFUSAL, ())
POLICY = Cause("policy", REFUSAL, ())
# Once libpq sent the password (its own state: PQconnectionUsedPassword, psycopg's
# ``pgconn.used_password`` on the failed attempt), only an explicit "not now" from the server
# or PgBouncer is tried again: starting up, too many clients (or slots reserved), a standby
# while target_session_attrs wants a primary (a failover in progress), PgBouncer's server away.
NOT_NOW = frozenset({"starting", "too_many", "standby", "pooler"})
_ATTEMPTS_HEADER = "multiple connection attempts failed"


def cause_of(text: str) -> Cause | None:
    lowered = text.lower()
    for cause in CAUSES:
        if any(marker in lowered for marker in cause.markers):
            return cause
    return None


def _segments(text: str) -> list[str]:
    """One message per host tried (psycopg joins them when several hosts failed)."""
    head, sep, tail = text.lower().partition(_ATTEMPTS_HEADER)
    if not sep:
        return [text]
    return tail.split("\n- host:")[1:] or [head]


def classify(exc: BaseException) -> Cause | None:
    """The cause of a failed connection attempt, or None when it is not one we know."""
    if isinstance(exc, ConnectionFileError):
        return FILE_REPLACED if exc.replaced else FILE
    if isinstance(exc, InsecureConnectionError):  # already judged: the policy refused it
        return POLICY
    causes = [cause_of(segment) for segment in _segments(str(exc))]
    refusals = [c for c in causes if c is not None and c.kind == REFUSAL]
    if refusals:
        return refusals[0]  # one host failing verification is a refusal, whatever the others did
    if not causes or None in causes:
        return None
    cause = causes[-1]
    assert cause is not None
    if cause.name not in NOT_NOW and password_sent(exc):
        return None
    return cause


def password_sent(exc: BaseException) -> bool:
    """libpq's own word on the failed attempt (the last host's, when several were tried):
    the server asked for the password and libpq answered."""
    pgconn = getattr(exc, "pgconn", None)
    try:
        return bool(getattr(pgconn, "used_password", False))
    except Exception:  # a connection libpq has freed answers nothing: assume it was sent
        return pgconn is not None


def attempts(text: str) -> list[str]:
    """libpq's words per attempt, case kept (psycopg lists each attempt when several failed)."""
    at = text.lower().find(_ATTEMPTS_HEADER)
    if at < 0:
        return [text]
    return ["host:" + part for part in text[at:].split("\n- host:")[1:]] or [text]


PGBOUNCER_PORT = 6432  # PgBouncer's default listen_port

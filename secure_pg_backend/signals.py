"""What a new connection reports: the signals, and the start-up log line.

Signals, for code that observes connections (metrics, health checks, audit logs).

Sent by ``VerifiedTLSMixin`` for every physical connection, pooled or not. Receivers
run on the thread that opened the connection (a pool's worker thread, for a pool),
so they must be quick and must not raise; exceptions are not caught for them.

- ``connection_verified(sender, alias, tls_info, facts, not_after, client_validity)``: the
  post-handshake check passed. ``tls_info`` is a zero-argument callable returning the
  ``TLSInfo`` (built on demand, so a receiver that does not need it costs nothing); ``facts``
  is the ``handshake.LinkFacts`` the check judged (protocol, cipher, host), ``not_after`` a
  zero-argument callable returning the server certificate's notAfter and ``client_validity``
  one returning the client certificate's (notBefore, notAfter) or None (each read once, by
  the session's OpenSSL), for receivers that run on every connection (the metrics).
- ``connection_refused(sender, alias, error)``: the settings or the live link were
  refused (``SecurePolicyError`` or ``InsecureConnectionError``).
- ``connection_retried(sender, alias, attempt, cause, delay, message)``: opening a
  connection failed for a transient cause (``causes.classify``) and is tried again in ``delay``
  seconds; ``message`` is libpq's, the password removed.
- ``breaker_changed(sender, endpoint, state, openings)``: an endpoint's circuit breaker
  (``breakers.Breakers``, one per "host:port" for the whole process) opened or closed;
  ``state`` is ``"open"`` or ``"closed"``, ``openings`` how many times it opened.

``sender`` is the wrapper class.

The start-up log line (logger ``secure_pg_backend``): INFO for each alias's first connection
(WARNING when its server or client certificate expires soon), DEBUG after; the ``TLSInfo`` it
describes is built only for a record that will be emitted.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.dispatch import Signal

from . import certificates
from .certificates import Validity, expiring

__all__ = [
    "after_fork_in_child",
    "connection_refused",
    "connection_retried",
    "connection_verified",
    "extra_fields",
    "iana_cipher",
    "otel_server_fields",
    "reset_announced",
    "verified",
]

if TYPE_CHECKING:  # not at run time: the report is built only for a record that is emitted
    from .handshake import LinkFacts
    from .tlsinfo import TLSInfo

connection_verified = Signal()
connection_refused = Signal()
connection_retried = Signal()
breaker_changed = Signal()

# -- the start-up log line --------------------------------------------------------------------
logger = logging.getLogger("secure_pg_backend")

_announced: set[str] = set()
_lock = threading.Lock()


def _first_time(alias: str) -> bool:
    if alias in _announced:  # fast path without the lock
        return False
    with _lock:
        if alias in _announced:
            return False
        _announced.add(alias)
        return True


def extra_fields(info: TLSInfo) -> dict[str, Any]:
    not_after = info.not_after
    fields: dict[str, Any] = {
        "db_alias": info.alias,
        "db_host": info.host,
        "db_hostaddr": info.hostaddr,
        "db_port": info.port,
        "db_name": info.database,
        "db_user": info.user,
        "tls_transport": info.transport,
        "tls_protocol": info.protocol,
        "tls_cipher": info.cipher,
        "tls_key_bits": info.key_bits,
        "tls_sslmode": info.sslmode,
        "tls_root_cert": info.root_cert,
        "tls_root_cert_source": info.root_cert_source,
        "tls_cert_not_after": not_after.isoformat() if not_after else None,
        **otel_server_fields(info, not_after),
    }
    fields.update(_client_fields(info))
    return fields


def _client_fields(info: TLSInfo) -> dict[str, str]:
    """The client certificate this side presented, under OpenTelemetry's names; nothing
    without one."""
    client = info.client_certificate
    if client is None:
        return {}
    return {
        "tls.client.subject": client.subject,
        "tls.client.issuer": client.issuer,
        "tls.client.not_after": _otel_time(client.not_after),
        "tls.client.hash.sha256": client.sha256_fingerprint.upper(),
    }


# -- the same facts under OpenTelemetry's semantic convention names: the server side ----------
# Dotted keys are plain record attributes to ``logging`` and plain keys to a JSON formatter, so
# a pipeline that speaks OTel needs no mapping. A name is left out, never guessed, when the link
# does not have it (no TLS, no ALPN, a cipher without a known IANA name).

# OpenSSL names TLS 1.2 suites its own way; OTel's tls.cipher is the IANA name (TLS 1.3 suites
# have it already). The suites the link check accepts by default (forward secrecy + AEAD) that
# servers negotiate; tests/test_otel_fields.py holds this table to `openssl ciphers -stdname`.
_IANA_CIPHERS = {
    "ECDHE-ECDSA-AES128-GCM-SHA256": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305": "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384": "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "DHE-RSA-AES128-GCM-SHA256": "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    "DHE-RSA-AES256-GCM-SHA384": "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    "DHE-RSA-CHACHA20-POLY1305": "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}


def iana_cipher(cipher: str | None) -> str | None:
    """The IANA name of an OpenSSL cipher name, or None when it is not known here."""
    if not cipher:
        return None
    return cipher if cipher.startswith("TLS_") else _IANA_CIPHERS.get(cipher)


def otel_server_fields(info: TLSInfo, not_after: dt.datetime | None) -> dict[str, Any]:
    """``db.*``, ``server.*``, ``network.peer.address`` and the server side of ``tls.*``.

    ``db.namespace`` is the database name: PostgreSQL's convention qualifies it with the
    schema only when that is known without another round trip, and it is not.
    """
    fields: dict[str, Any] = {
        "db.system.name": "postgresql",
        "db.namespace": info.database,
        "server.address": info.host,  # the name connected to (a socket directory without TLS)
    }
    if info.port is not None:
        fields["server.port"] = info.port
    if info.hostaddr and info.hostaddr != info.host:
        fields["network.peer.address"] = info.hostaddr
    if not info.tls:
        return fields
    name, _, version = (info.protocol or "").partition("v")  # "TLSv1.3"
    if name.upper() in ("TLS", "SSL") and version:
        fields["tls.protocol.name"] = name.lower()
        fields["tls.protocol.version"] = version
    cipher = iana_cipher(info.cipher)
    if cipher:
        fields["tls.cipher"] = cipher
    if info.alpn:
        fields["tls.next_protocol"] = info.alpn
    if not_after is not None:
        fields["tls.server.not_after"] = _otel_time(not_after)
    der = info._peer_der  # the certificate as presented; hashing it needs no parse
    if der:
        # The names by the session's OpenSSL: this record must not import cryptography.
        names = certificates.certificate_names(der)
        if names is not None:
            fields["tls.server.subject"], fields["tls.server.issuer"] = names
        fields["tls.server.hash.sha256"] = hashlib.sha256(der).hexdigest().upper()
    return fields


def _otel_time(moment: dt.datetime) -> str:
    """ISO 8601 in UTC, as OTel's examples write it: ``2027-03-01T12:00:00Z``."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def verified(
    sender: type,
    alias: str,
    connection: Any,
    facts: LinkFacts,
    tls_info_of: Callable[[Any], TLSInfo],
) -> None:
    """A connection passed the post-handshake check: its log line and ``connection_verified``.

    The first connection of an alias is logged at INFO, or WARNING when the server or the
    client certificate expires soon; later ones at DEBUG. The certificates' dates (the level's
    only input) are read, once and shared by both, only if a record will be emitted or a
    receiver listens: usually neither, after the first, so nothing is built for the usual
    connection; ``tls_info_of(connection)`` (the TLSInfo) runs only for a record that is
    emitted or a receiver that asks."""
    first = alias not in _announced and _first_time(alias)  # its lock-free test, first
    listened = bool(connection_verified.receivers)  # Django's own first test in send()
    if not (first or listened or logger.isEnabledFor(logging.DEBUG)):
        return
    build = functools.partial(tls_info_of, connection)
    dates = certificates.SessionCertificates(connection.pgconn)

    def not_after() -> dt.datetime | None:
        return dates.server_not_after

    def client_validity() -> Validity | None:
        return dates.client_validity

    _log(alias, first, not_after, build, client_validity)
    if listened:
        connection_verified.send(
            sender,
            alias=alias,
            tls_info=build,
            facts=facts,
            not_after=not_after,
            client_validity=client_validity,
        )


def _log(
    alias: str,
    first: bool,
    not_after: Callable[[], dt.datetime | None],
    build: Callable[[], TLSInfo],
    client_validity: Callable[[], Validity | None],
) -> None:
    level = _first_level(not_after, client_validity) if first else logging.DEBUG
    if level is None or not logger.isEnabledFor(level):
        return
    info = build()
    logger.log(level, "secure_pg_backend: %s", info.log_line(), extra=extra_fields(info))


def _first_level(
    not_after: Callable[[], dt.datetime | None], client_validity: Callable[[], Validity | None]
) -> int | None:
    if not logger.isEnabledFor(logging.WARNING):
        return None
    expires = not_after()
    if expires is not None and expiring(expires):
        return logging.WARNING
    client = client_validity()
    if client is not None and expiring(client[1], not_before=client[0]):
        return logging.WARNING
    return logging.INFO


def reset_announced() -> None:
    """Forget which aliases were announced (for tests)."""
    with _lock:
        _announced.clear()


def after_fork_in_child() -> None:
    # A forked child announces its own first connections; the lock may have been held by
    # one of the parent's threads at the fork, so the child gets a fresh one.
    global _lock
    _lock = threading.Lock()
    _announced.clear()

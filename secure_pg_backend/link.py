"""Reading the live link, cheaply: what every new connection needs, and nothing more.

* ``read_facts``: libpq state and the socket in, ``LinkFacts`` out, for the post-handshake
  check (the rules that judge them are in ``link_rules``). No SQL, no round trip.
* The server certificate's expiry: the one warning rule, and its notAfter decoded by the
  session's own OpenSSL, so the first connection can choose its start-up log level.

The public report (``tlsinfo.TLSInfo``, two dataclasses, about 2 ms of a cold start) is
built from these only when something inspects or logs the connection.
"""

from __future__ import annotations

import datetime as dt
import functools
import socket
from typing import Any

from . import libpq
from .link_rules import LinkFacts

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "certificate_not_after",
    "days_left",
    "decode",
    "expiring",
    "peer_not_after",
    "read_facts",
]


def decode(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def read_facts(pgconn: Any) -> LinkFacts:
    """The facts the post-handshake check needs, from libpq and the socket (no SQL)."""
    ssl_in_use = bool(pgconn.ssl_in_use)
    protocol = cipher = alpn = None
    effective = libpq.effective_settings(pgconn)
    if ssl_in_use:
        get = libpq.functions().ssl_attribute
        ptr = pgconn.pgconn_ptr
        protocol = decode(get(ptr, b"protocol")) or None
        cipher = decode(get(ptr, b"cipher")) or None
        if effective.get("sslnegotiation") == "direct":
            alpn = decode(get(ptr, b"alpn")) or None
    return LinkFacts(
        host=decode(pgconn.host),
        ssl_in_use=ssl_in_use,
        protocol=protocol,
        cipher=cipher,
        used_gssapi=libpq.used_gssapi(pgconn),
        unix_socket=libpq.socket_family(pgconn) == socket.AF_UNIX,
        effective=effective,
        alpn=alpn,
    )


# -- the server certificate's expiry ---------------------------------------------------------

# Log line, system check W001, health check and the example page all warn from this many days.
EXPIRY_WARNING_DAYS = 30


def days_left(not_after: dt.datetime, now: dt.datetime | None = None) -> int:
    return (not_after - (now or dt.datetime.now(dt.timezone.utc))).days


def expiring(not_after: dt.datetime, now: dt.datetime | None = None) -> bool:
    """The one expiry rule: fewer than ``EXPIRY_WARNING_DAYS`` whole days left."""
    return days_left(not_after, now) < EXPIRY_WARNING_DAYS


@functools.lru_cache(maxsize=32)
def certificate_not_after(der: bytes) -> dt.datetime:
    """A DER certificate's notAfter, cached per certificate.

    Decoded by the OpenSSL of the TLS session (libpq's), so reading it on every connection
    (the log line, metrics) never imports ``cryptography``; the full parse is the fallback
    where that OpenSSL lacks the functions.
    """
    not_after = libpq.certificate_not_after(der)
    if not_after is None:
        from .tlsinfo import PeerCertificate

        not_after = PeerCertificate.from_der(der).not_after
    return not_after


def peer_not_after(pgconn: Any) -> dt.datetime | None:
    """notAfter of the certificate the server presented on a live connection; None without TLS.

    Read from the certificate the TLS session already holds; the DER route (and its fallback
    to a full parse) only where libpq's OpenSSL lacks the functions.
    """
    ptr = pgconn.pgconn_ptr
    if not ptr or not pgconn.ssl_in_use:
        return None
    not_after = libpq.peer_not_after(ptr)
    if not_after is None:
        der = libpq.peer_certificate_der(ptr)
        not_after = certificate_not_after(der) if der else None
    return not_after

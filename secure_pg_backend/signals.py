"""Signals for code that observes connections (metrics, health checks, audit logs).

Sent by ``VerifiedTLSMixin`` for every physical connection, pooled or not. Receivers
run on the thread that opened the connection (a pool's worker thread, for a pool),
so they must be quick and must not raise; exceptions are not caught for them.

- ``connection_verified(sender, alias, tls_info, facts, not_after)``: the post-handshake
  check passed. ``tls_info`` is a zero-argument callable returning the ``TLSInfo`` (built on
  demand, so a receiver that does not need it costs nothing); ``facts`` is the
  ``handshake.LinkFacts`` the check judged (protocol, cipher, host), and ``not_after`` a
  zero-argument callable returning the server certificate's notAfter (read once, by the
  session's OpenSSL), for receivers that run on every connection (the metrics).
- ``connection_refused(sender, alias, error)``: the settings or the live link were
  refused (``SecurePolicyError`` or ``InsecureConnectionError``).
- ``connection_retried(sender, alias, attempt, cause, delay, message)``: opening a
  connection failed for a transient cause (``faults``) and is tried again in ``delay``
  seconds; ``message`` is libpq's, the password removed.

``sender`` is the wrapper class.
"""

from __future__ import annotations

from django.dispatch import Signal

connection_verified = Signal()
connection_refused = Signal()
connection_retried = Signal()

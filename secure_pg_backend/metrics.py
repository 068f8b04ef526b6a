"""Prometheus metrics for every physical connection (prometheus-client, extra ``[metrics]``).

Installed by the app's ``ready()`` when ``prometheus_client`` is importable, in its
default registry, which django-prometheus' ``/metrics`` (and ``start_http_server``)
already export::

    secure_pg_backend_connections_total{alias,outcome}      outcome: verified | refused
    secure_pg_backend_server_certificate_expiry_timestamp_seconds{alias,host}
    secure_pg_backend_client_certificate_expiry_timestamp_seconds{alias}   with mTLS only
    secure_pg_backend_tls_info{alias,protocol,cipher}       1 for what was last negotiated
    secure_pg_backend_connection_retries_total{alias,cause}  transient failures retried, and
        provider credentials asked for again after a 28P01 (cause "rotated")
    secure_pg_backend_breaker_open{endpoint}                 1 while open, 0 once closed
    secure_pg_backend_breaker_openings_total{endpoint}       times the breaker opened

Driven by the ``connection_verified``, ``connection_refused``, ``connection_retried`` and
``breaker_changed`` signals (an endpoint is "host:port", shared by every alias using it).
A verified connection is recorded from what the post-handshake check already read
(``facts``: protocol, cipher, host) and its certificate's notAfter as the session's OpenSSL
decodes it (``not_after``, shared with the log line), and the client certificate's validity
read the same way (``client_validity``: two ctypes calls that return NULL on a connection
without one): never the full ``TLSInfo`` report, whose four ``PQsslAttribute`` calls and DER
copy would be paid on every pooled connection.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import signals

if TYPE_CHECKING:
    from .handshake import LinkFacts
from .certificates import Validity

__all__ = ["install"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_metrics: dict[str, Any] = {}
# The (protocol, cipher) each alias last reported, so a change replaces the old series.
_tls_labels: dict[str, tuple[str, str]] = {}
# Aliases with a client certificate series, so a connection without one costs nothing here.
_client_aliases: set[str] = set()


def _no_client() -> None:
    return None


def _on_verified(
    sender: object,
    alias: str,
    facts: LinkFacts,
    not_after: Callable[[], dt.datetime | None],
    client_validity: Callable[[], Validity | None] = _no_client,
    **_: Any,
) -> None:
    _metrics["connections"].labels(alias=alias, outcome="verified").inc()
    try:
        _record_link(alias, facts, not_after)
        _record_client(alias, client_validity())
    except Exception:  # a metrics fault must never fail the connection it describes
        logger.exception("secure_pg_backend: could not record TLS metrics for %r", alias)


def _record_client(alias: str, validity: Validity | None) -> None:
    if validity is not None:
        _metrics["client_expiry"].labels(alias=alias).set(validity[1].timestamp())
        _client_aliases.add(alias)
    elif alias in _client_aliases:  # no client certificate any more: no series
        _client_aliases.discard(alias)
        with contextlib.suppress(KeyError):  # another thread removed it first
            _metrics["client_expiry"].remove(alias)


def _record_link(
    alias: str, facts: LinkFacts, read_not_after: Callable[[], dt.datetime | None]
) -> None:
    # This runs on the pool's threads for every connection: the expiry comes from the
    # session's OpenSSL (certificates.peer_not_after), never a ``cryptography`` parse, which
    # there can abort the process at exit.
    labels = (facts.protocol or "", facts.cipher or "")
    with _lock:
        previous = _tls_labels.get(alias)
        if previous != labels:
            if previous is not None:
                _metrics["tls"].remove(alias, *previous)
            _metrics["tls"].labels(alias, *labels).set(1)
            _tls_labels[alias] = labels
    not_after = read_not_after()
    if not_after is not None:
        _metrics["expiry"].labels(alias=alias, host=facts.host).set(not_after.timestamp())


def _on_refused(sender: object, alias: str, **_: Any) -> None:
    _metrics["connections"].labels(alias=alias, outcome="refused").inc()


def _on_retried(sender: object, alias: str, cause: str, **_: Any) -> None:
    _metrics["retries"].labels(alias=alias, cause=cause).inc()


def _on_breaker(sender: object, endpoint: str, state: str, **_: Any) -> None:
    is_open = state == "open"
    _metrics["breaker"].labels(endpoint=endpoint).set(1 if is_open else 0)
    if is_open:
        _metrics["openings"].labels(endpoint=endpoint).inc()


def install(aliases: Callable[[], Iterable[str]] = tuple, registry: Any = None) -> bool:
    """Create the metrics and connect the receivers (once); False without prometheus_client.

    The ``aliases()`` get their counters at 0 up front, so ``rate()`` works from the first
    scrape. A callable: finding them builds every alias's wrapper, which a process without
    prometheus_client should not pay for at start-up.
    """
    try:
        import prometheus_client
    except ImportError:
        return False
    with _lock:
        if not _metrics:
            kwargs = {} if registry is None else {"registry": registry}
            _metrics["connections"] = prometheus_client.Counter(
                "secure_pg_backend_connections",
                "Physical database connections, by alias and policy outcome.",
                ["alias", "outcome"],
                **kwargs,
            )
            _metrics["expiry"] = prometheus_client.Gauge(
                "secure_pg_backend_server_certificate_expiry_timestamp_seconds",
                "notAfter of the server certificate last presented, as a Unix timestamp.",
                ["alias", "host"],
                multiprocess_mode="min",  # across workers, the soonest expiry
                **kwargs,
            )
            _metrics["client_expiry"] = prometheus_client.Gauge(
                "secure_pg_backend_client_certificate_expiry_timestamp_seconds",
                "notAfter of the client certificate this side last presented, as a Unix "
                "timestamp (no series for an alias without one).",
                ["alias"],
                multiprocess_mode="min",  # across workers, the soonest expiry
                **kwargs,
            )
            _metrics["tls"] = prometheus_client.Gauge(
                "secure_pg_backend_tls_info",
                "TLS protocol and cipher last negotiated per alias (value 1).",
                ["alias", "protocol", "cipher"],
                multiprocess_mode="max",
                **kwargs,
            )
            _metrics["retries"] = prometheus_client.Counter(
                "secure_pg_backend_connection_retries",
                "Connection attempts that failed for a transient cause and were retried.",
                ["alias", "cause"],
                **kwargs,
            )
            _metrics["breaker"] = prometheus_client.Gauge(
                "secure_pg_backend_breaker_open",
                "1 while the endpoint's circuit breaker is open (connects fail at once, one "
                "probe at a time), 0 once closed.",
                ["endpoint"],
                multiprocess_mode="max",  # across workers: open in any of them
                **kwargs,
            )
            _metrics["openings"] = prometheus_client.Counter(
                "secure_pg_backend_breaker_openings",
                "Times the endpoint's circuit breaker opened (a connect spent its whole retry "
                "budget without reaching it).",
                ["endpoint"],
                **kwargs,
            )
            signals.breaker_changed.connect(_on_breaker, weak=False, dispatch_uid=__name__)
            signals.connection_verified.connect(_on_verified, weak=False, dispatch_uid=__name__)
            signals.connection_retried.connect(_on_retried, weak=False, dispatch_uid=__name__)
            signals.connection_refused.connect(_on_refused, weak=False, dispatch_uid=__name__)
    for alias in aliases():
        for outcome in ("verified", "refused"):
            _metrics["connections"].labels(alias=alias, outcome=outcome)
    return True

"""Prometheus metrics for every physical connection (prometheus-client, extra ``[metrics]``).

Installed by the app's ``ready()`` when ``prometheus_client`` is importable, in its
default registry, which django-prometheus' ``/metrics`` (and ``start_http_server``)
already export::

    secure_pg_backend_connections_total{alias,outcome}      outcome: verified | refused
    secure_pg_backend_server_certificate_expiry_timestamp_seconds{alias,host}
    secure_pg_backend_tls_info{alias,protocol,cipher}       1 for what was last negotiated
    secure_pg_backend_connection_retries_total{alias,cause}  transient failures retried

Driven by the ``connection_verified``, ``connection_refused`` and ``connection_retried``
signals.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import signals
from .link import certificate_not_after

if TYPE_CHECKING:
    from .tlsinfo import TLSInfo

__all__ = ["install", "server_certificate_not_after"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_metrics: dict[str, Any] = {}
# The (protocol, cipher) each alias last reported, so a change replaces the old series.
_tls_labels: dict[str, tuple[str, str]] = {}


def server_certificate_not_after(info: TLSInfo) -> dt.datetime | None:
    """The one place the expiry is read: decoded by the session's OpenSSL, once per distinct
    certificate, without filling ``info``'s cached fields (a connection nobody inspects stays
    as cheap as before). This runs on the pool's threads for every connection: a certificate
    parse with ``cryptography`` there can abort the process at exit.
    """
    der = info._peer_der
    return certificate_not_after(der) if der else None


def _on_verified(sender: object, alias: str, tls_info: Callable[[], TLSInfo], **_: Any) -> None:
    _metrics["connections"].labels(alias=alias, outcome="verified").inc()
    try:
        _record_link(alias, tls_info())
    except Exception:  # a metrics fault must never fail the connection it describes
        logger.exception("secure_pg_backend: could not record TLS metrics for %r", alias)


def _record_link(alias: str, info: TLSInfo) -> None:
    labels = (info.protocol or "", info.cipher or "")
    with _lock:
        previous = _tls_labels.get(alias)
        if previous != labels:
            if previous is not None:
                _metrics["tls"].remove(alias, *previous)
            _metrics["tls"].labels(alias, *labels).set(1)
            _tls_labels[alias] = labels
    not_after = server_certificate_not_after(info)
    if not_after is not None:
        _metrics["expiry"].labels(alias=alias, host=info.host).set(not_after.timestamp())


def _on_refused(sender: object, alias: str, **_: Any) -> None:
    _metrics["connections"].labels(alias=alias, outcome="refused").inc()


def _on_retried(sender: object, alias: str, cause: str, **_: Any) -> None:
    _metrics["retries"].labels(alias=alias, cause=cause).inc()


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
            signals.connection_verified.connect(_on_verified, weak=False, dispatch_uid=__name__)
            signals.connection_retried.connect(_on_retried, weak=False, dispatch_uid=__name__)
            signals.connection_refused.connect(_on_refused, weak=False, dispatch_uid=__name__)
    for alias in aliases():
        for outcome in ("verified", "refused"):
            _metrics["connections"].labels(alias=alias, outcome=outcome)
    return True

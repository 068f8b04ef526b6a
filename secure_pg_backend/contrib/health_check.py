"""A django-health-check (4.x) check: the alias connects under the TLS policy.

::

    from health_check.views import HealthCheckView
    from secure_pg_backend.contrib.health_check import VerifiedTLS

    path("health/", HealthCheckView.as_view(checks=[
        (VerifiedTLS, {"alias": "default", "warn_days": 30}),
    ]))

Healthy when a connection for the alias passes the policy and answers ``SELECT 1``;
a warning when the server certificate expires within ``warn_days``, or the client certificate
this side presents has less than a third of its lifetime and fewer than ``warn_days`` left
(0 turns both warnings off), or another of the alias's hosts has its circuit breaker open
(``breakers.breakers()``: a standby down, say); unavailable when the connection is refused or
fails, with the reason, and for an endpoint whose breaker is open, since when (connects to it
fail at once, one probe at a time): the check answers at once during an outage instead of
holding the worker that serves it for the retry budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django.db import connections
from django.utils.connection import ConnectionDoesNotExist
from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable, ServiceWarning

from .. import breakers
from ..base import VerifiedTLSMixin
from ..certificates import EXPIRY_WARNING_DAYS, certificate_text, expiring
from ..errors import InsecureConnectionError, SecurePolicyError, location, redact, secret_values
from ..tlsinfo import TLSInfo

__all__ = ["VerifiedTLS"]


def _endpoints(settings_dict: Any) -> frozenset[str]:
    """The alias's endpoints as the breakers name them ("host:port")."""
    params = {"host": settings_dict.get("HOST"), "port": settings_dict.get("PORT")}
    return frozenset(f"{host}:{port}" for host, port in breakers.endpoints_of(params))


def _open_breakers(endpoints: frozenset[str]) -> list[str]:
    return [
        f"{b['endpoint']} open for {b['for']:.0f} s, connects to it fail at once, one probe "
        "at a time"
        for b in breakers.breakers()
        if b["endpoint"] in endpoints and b["state"] == "open"
    ]


@dataclasses.dataclass
class VerifiedTLS(HealthCheck):  # type: ignore[misc]  # health_check is untyped
    """Connect ``alias`` under the policy; warn ``warn_days`` before the certificate expires."""

    alias: str = "default"
    warn_days: int = EXPIRY_WARNING_DAYS
    _endpoints: frozenset[str] = dataclasses.field(default=frozenset(), init=False, repr=False)

    def run(self) -> None:
        info = self._connect()
        others = _open_breakers(self._endpoints)
        if others:
            raise ServiceWarning(
                f"{location(self.alias, info.host)}: connected, but circuit breaker: "
                + "; ".join(others)
                + "."
            )
        # The session's notAfter, judged by the rule the log line, checks and metrics share.
        not_after = info.not_after
        if not_after is not None and expiring(not_after, days=self.warn_days):
            raise ServiceWarning(
                f"the server certificate of {location(self.alias, info.host)} "
                f"{info.expiry_text()} (warn_days={self.warn_days}); renew it."
            )
        client = info.client_certificate
        if client is not None and expiring(
            client.not_after, None, client.not_before, self.warn_days
        ):
            raise ServiceWarning(
                f"the client certificate {location(self.alias, info.host)} presents "
                f"({client.subject}) {client.expiry_text()} (warn_days={self.warn_days}); check "
                "the automation that renews OPTIONS['sslcert']."
            )

    def _connect(self) -> TLSInfo:
        """A connection of its own (closed, or returned to the pool, afterwards)."""
        try:
            connection = connections.create_connection(self.alias)
        except (ConnectionDoesNotExist, KeyError):
            raise ServiceUnavailable(f"DATABASES has no alias {self.alias!r}.") from None
        if not isinstance(connection, VerifiedTLSMixin):
            raise ServiceUnavailable(
                f"DATABASES[{self.alias!r}] does not use secure_pg_backend as its ENGINE."
            )
        self._endpoints = _endpoints(connection.settings_dict)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            return connection.tls_info
        except Exception as exc:  # refused (policy, TLS) or failed: the reason is the result
            password = secret_values(connection.settings_dict)
            # libpq's words may quote a certificate's names: escaped like every such text
            reason = certificate_text(" ".join(redact(str(exc), password).split()))
            if not isinstance(exc, SecurePolicyError | InsecureConnectionError):
                # Our refusals name the alias already; anything else gets it here.
                where = location(self.alias, connection.settings_dict.get("HOST") or None)
                reason = f"{where}: {type(exc).__name__}: {reason}"
            opened = _open_breakers(self._endpoints)
            if opened:
                reason += " [circuit breaker: " + "; ".join(opened) + "]"
            raise ServiceUnavailable(reason) from exc
        finally:
            connection.close()

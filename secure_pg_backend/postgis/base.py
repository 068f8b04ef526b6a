"""The GeoDjango ENGINE: Django's PostGIS wrapper under the verified-TLS policy."""

from __future__ import annotations

from typing import Any

from django.contrib.gis.db.backends.postgis import base as postgis

from ..base import VerifiedTLSMixin

__all__ = ["DatabaseWrapper"]


class DatabaseWrapper(VerifiedTLSMixin, postgis.DatabaseWrapper):
    # display_name stays Django's, as on the core ENGINE (see secure_pg_backend.base).

    # PostGIS's get_new_connection looks up the geometry types with SQL right after the
    # connect, which is before the mixin's post-handshake check. Defer that lookup until the
    # check has passed, so no query goes over a link the policy has not accepted yet.
    _connecting = False

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        self._connecting = True
        try:
            connection = super().get_new_connection(conn_params)
        finally:
            self._connecting = False
        self.register_geometry_adapters(connection)
        return connection

    def register_geometry_adapters(self, pg_connection: Any, clear_caches: bool = False) -> None:
        if not self._connecting:
            super().register_geometry_adapters(pg_connection, clear_caches)

"""Online checks (``manage.py check --database ALIAS``, and before ``migrate``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.validation import BaseDatabaseValidation
from django.db.utils import DatabaseError

from .errors import redact
from .logs import expiry_text

if TYPE_CHECKING:
    from .base import DatabaseWrapper

W_EXPIRY = "secure_pg_backend.W001"
E_CONNECT = "secure_pg_backend.E010"


class DatabaseValidation(BaseDatabaseValidation):
    connection: DatabaseWrapper

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        issues = list(super().check(**kwargs))
        alias = self.connection.alias
        try:
            info = self.connection.tls_info
        except (DatabaseError, ImproperlyConfigured) as exc:
            message = redact(str(exc), self.connection.settings_dict.get("PASSWORD"))
            issues.append(
                checks.Error(
                    f"Database alias {alias!r} could not connect under the TLS policy: {message}",
                    hint="The message ends with the fix; the README's Troubleshooting table "
                    "explains every refusal.",
                    obj=f"DATABASES[{alias!r}]",
                    id=E_CONNECT,
                )
            )
            return issues
        cert = info.peer_certificate
        if cert is not None and cert.expires_soon():
            issues.append(
                checks.Warning(
                    f"The server certificate of database alias {alias!r} "
                    f"({cert.subject}) {expiry_text(info)}.",
                    hint="Renew the server certificate before it expires; clients will "
                    "refuse the connection after that date.",
                    obj=f"DATABASES[{alias!r}]",
                    id=W_EXPIRY,
                )
            )
        return issues

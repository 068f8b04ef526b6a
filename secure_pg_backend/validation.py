"""Online checks (``manage.py check --database ALIAS``, and before ``migrate``).

One cause, one message: settings the policy refuses are already reported offline
(E001-E013) and are not repeated here; a link the policy refused is E010; a server
that is down, a wrong password or a missing database is E014, in libpq's words,
because it is not a TLS problem and must not look like one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.validation import BaseDatabaseValidation
from django.db.utils import DatabaseError

from .errors import InsecureConnectionError, SecurePolicyError, redact
from .logs import expiry_text

if TYPE_CHECKING:
    from .base import VerifiedTLSMixin

W_EXPIRY = "secure_pg_backend.W001"
E_REFUSED = "secure_pg_backend.E010"
E_CONNECT = "secure_pg_backend.E014"
DOCS_HINT = "docs/errors.md lists every refusal and failure with its fix."


class DatabaseValidation(BaseDatabaseValidation):
    connection: VerifiedTLSMixin

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        issues = list(super().check(**kwargs))
        alias = self.connection.alias
        where = f"DATABASES[{alias!r}]"
        try:
            info = self.connection.tls_info
        except SecurePolicyError:
            return issues  # the offline check already reported each broken rule
        except InsecureConnectionError as exc:
            message = f"Database alias {alias!r}: {self._redact(exc)}"
            return [*issues, checks.Error(message, hint=DOCS_HINT, obj=where, id=E_REFUSED)]
        except (DatabaseError, ImproperlyConfigured) as exc:
            message = f"Database alias {alias!r} could not connect: {self._redact(exc)}"
            hint = (
                "Not a TLS problem: check that the server is running and reachable, and the "
                "USER, PASSWORD and NAME. " + DOCS_HINT
            )
            return [*issues, checks.Error(message, hint=hint, obj=where, id=E_CONNECT)]
        cert = info.peer_certificate
        if cert is not None and cert.expires_soon():
            issues.append(
                checks.Warning(
                    f"The server certificate of database alias {alias!r} "
                    f"({cert.subject}) {expiry_text(info)}.",
                    hint="Renew the server certificate before it expires; clients will "
                    "refuse the connection after that date.",
                    obj=where,
                    id=W_EXPIRY,
                )
            )
        return issues

    def _redact(self, exc: Exception) -> str:
        return redact(" ".join(str(exc).split()), self.connection.settings_dict.get("PASSWORD"))

"""Online checks (``manage.py check --database ALIAS``, and before ``migrate``).

One cause, one message: settings the policy refuses are already reported offline
(E001-E013) and are not repeated here; a link the policy refused is E010; a server
that is down, a wrong password or a missing database is E014, in libpq's words,
because it is not a TLS problem and must not look like one. Nor is a combination of
settings Django itself refuses when the connection opens (``OPTIONS["pool"]`` with
``CONN_MAX_AGE``): E014 too, in Django's words, said to be configuration, not the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.validation import BaseDatabaseValidation
from django.db.utils import DatabaseError

from .checkids import CHECKS, explain_command
from .errors import (
    CONFIGURATION,
    FILE_UNUSABLE,
    NO_CONNECTION,
    SETTINGS_REFUSED,
    TLS_REFUSED,
    ConnectionFileError,
    InsecureConnectionError,
    SecurePolicyError,
    outcome,
    redact,
    secret_values,
    without_alias,
)

__all__ = [
    "CONFIGURATION",
    "E_CONNECT",
    "E_REFUSED",
    "FILE_UNUSABLE",
    "NO_CONNECTION",
    "SETTINGS_REFUSED",
    "TLS_REFUSED",
    "W_CLIENT_EXPIRY",
    "W_EXPIRY",
    "DatabaseValidation",
    "failure_cause",
]

if TYPE_CHECKING:
    from .base import VerifiedTLSMixin

W_EXPIRY = CHECKS["W001"].id
W_CLIENT_EXPIRY = CHECKS["W002"].id
E_REFUSED = CHECKS["E010"].id
E_CONNECT = CHECKS["E014"].id


def _explained(code: str) -> str:
    return f"'{explain_command(code)}' says what it means and how to fix it."


# What kind of failure a connection attempt ended in: dbtls prints it, the checks choose
# their message and hint by it.
# The kinds of failure (each exception class carries its own: ``errors.outcome``).
failure_cause = outcome


class DatabaseValidation(BaseDatabaseValidation):
    connection: VerifiedTLSMixin

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        issues = list(super().check(**kwargs))
        alias = self.connection.alias
        where = f"DATABASES[{alias!r}]"
        try:
            info = self.connection.tls_info
        except (SecurePolicyError, ConnectionFileError):
            return issues  # the offline check already reported each broken rule
        except InsecureConnectionError as exc:
            # Django prints the object (DATABASES['alias']) before the message: named once.
            message = without_alias(self._redact(exc, lines=True), alias, exc.host)
            return [
                *issues,
                checks.Error(message, hint=_explained("E010"), obj=where, id=E_REFUSED),
            ]
        except (DatabaseError, ImproperlyConfigured) as exc:
            if failure_cause(exc) == CONFIGURATION:
                message = f"Database alias {alias!r}: the settings conflict: {self._redact(exc)}"
                hint = (
                    f"A configuration problem, found before any server was contacted (not "
                    f"TLS, the server or the credentials): change {where} as the message "
                    "says. " + _explained("E014")
                )
            else:
                message = f"Database alias {alias!r} could not connect: {self._redact(exc)}"
                hint = (
                    "Not a TLS problem: check that the server is running and reachable, and "
                    "the USER, PASSWORD and NAME. " + _explained("E014")
                )
            return [*issues, checks.Error(message, hint=hint, obj=where, id=E_CONNECT)]
        # Decided on the session's notAfter (certificates.expiring); the certificate is parsed
        # only for the warning's subject.
        cert = info.peer_certificate if info.expires_soon() else None
        if cert is not None:
            issues.append(
                checks.Warning(
                    f"The server certificate of database alias {alias!r} "
                    f"({cert.subject}) {info.expiry_text()}.",
                    hint=CHECKS["W001"].fix,
                    obj=where,
                    id=W_EXPIRY,
                )
            )
        client = info.client_certificate
        if client is not None and client.expires_soon():  # the same rule (certificates.expiring)
            issues.append(
                checks.Warning(
                    f"The client certificate database alias {alias!r} presents "
                    f"({client.subject}) {client.expiry_text()}.",
                    hint=CHECKS["W002"].fix,
                    obj=where,
                    id=W_CLIENT_EXPIRY,
                )
            )
        return issues

    def _redact(self, exc: Exception, lines: bool = False) -> str:
        """The message, whitespace collapsed (``lines``: within each of its lines)."""
        text = str(exc)
        if lines:
            text = "\n  ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
        else:
            text = " ".join(text.split())
        return redact(text, secret_values(self.connection.settings_dict))

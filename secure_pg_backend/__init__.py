"""secure_pg_backend: a Django PostgreSQL backend that only speaks verified TLS.

Use ``"ENGINE": "secure_pg_backend"``; add ``"secure_pg_backend"`` to
INSTALLED_APPS for the system checks and the ``dbtls`` command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# First, before anything reads psycopg or libpq: one clear ImproperlyConfigured when psycopg 3
# or libpq >= 13 is missing, instead of a ModuleNotFoundError from deep inside (or Django's
# "isn't an available database backend") and libpq's "invalid connection option" later.
from .compat import require_libpq, require_psycopg

require_psycopg()
require_libpq()

from .errors import ConnectionFileError, InsecureConnectionError, SecurePolicyError  # noqa: E402

if TYPE_CHECKING:
    from .provider import Credentials
    from .tlsinfo import PeerCertificate, TLSInfo

__version__ = "0.1.0"
__all__ = [
    "ConnectionFileError",
    "Credentials",
    "InsecureConnectionError",
    "PeerCertificate",
    "SecurePolicyError",
    "TLSInfo",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The report types are imported when first asked for: a process that connects but never
    # inspects a connection does not pay for their dataclasses (part of every cold start).
    if name in ("PeerCertificate", "TLSInfo"):
        from . import tlsinfo

        return getattr(tlsinfo, name)
    if name == "Credentials":  # what a password provider may return (with the user)
        from .provider import Credentials

        return Credentials
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

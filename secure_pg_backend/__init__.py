"""secure_pg_backend: a Django PostgreSQL backend that only speaks verified TLS.

Use ``"ENGINE": "secure_pg_backend"``; add ``"secure_pg_backend"`` to
INSTALLED_APPS for the system checks and the ``dbtls`` command.
"""

from . import _requirements  # noqa: F401 - first: psycopg 3 and libpq >= 13, clearly
from .errors import InsecureConnectionError, SecurePolicyError
from .tlsinfo import PeerCertificate, TLSInfo

__version__ = "0.1.0"
__all__ = [
    "InsecureConnectionError",
    "PeerCertificate",
    "SecurePolicyError",
    "TLSInfo",
    "__version__",
]

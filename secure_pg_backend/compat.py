"""What this process's psycopg and libpq can do, checked up front with a clear error.

Three things go wrong far from their cause without these checks:

* Django's postgresql backend silently falls back to psycopg2 when psycopg 3 is
  missing; this backend reads psycopg 3's ``PGconn`` and would fail deep inside
  with a ``ModuleNotFoundError``.
* The policy forces ``ssl_min_protocol_version``, which libpq only knows from
  PostgreSQL 13 on. psycopg's C and pure-Python builds use whatever libpq the
  system has (Debian 12: 15, Ubuntu 22.04: 14, older distributions: 12 or less).
* A libpq keyword that is newer than the loaded libpq (``sslnegotiation`` on
  libpq 15, say) fails at connect time with libpq's ``invalid connection
  option``, which names neither the alias nor the fix.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

from .errors import Violation

__all__ = [
    "MIN_LIBPQ",
    "NEWER_KEYWORDS",
    "LibpqSupportError",
    "describe_libpq",
    "require_libpq",
    "require_psycopg",
    "too_new_violation",
]

# ssl_min_protocol_version: the first libpq that lets a client refuse TLS 1.0/1.1.
MIN_LIBPQ = 130000

# libpq keywords added after the floor -> the first libpq that knows them (release notes).
NEWER_KEYWORDS = {
    "require_auth": 160000,
    "sslcertmode": 160000,
    "load_balance_hosts": 160000,
    "sslnegotiation": 170000,
    "sslkeylogfile": 180000,
    "min_protocol_version": 180000,
    "max_protocol_version": 180000,
    "oauth_issuer": 180000,
    "oauth_client_id": 180000,
    "oauth_client_secret": 180000,
    "oauth_scope": 180000,
}

_INSTALL_FIX = (
    "install psycopg 3 (pip install 'secure-pg-backend', which brings psycopg[binary]); "
    "psycopg2 may stay installed next to it, but this backend only runs on psycopg 3."
)


class LibpqSupportError(ImproperlyConfigured):
    """psycopg or libpq in this process cannot give the guarantees this backend makes."""


def require_psycopg() -> None:
    """Raise one clear error when psycopg 3 cannot be imported."""
    try:
        import psycopg  # noqa: F401
    except ImportError as error:
        raise LibpqSupportError(
            f"secure_pg_backend needs psycopg 3, which cannot be imported ({error}). "
            f"Fix: {_INSTALL_FIX}"
        ) from None


def describe_libpq() -> str:
    """``libpq 15.18 (psycopg's c build)``: what a message about libpq should name."""
    import psycopg

    version = psycopg.pq.version_pretty(psycopg.pq.version())
    return f"libpq {version} (psycopg's {psycopg.pq.__impl__} build)"


def require_libpq(version: int | None = None) -> None:
    """Refuse a libpq that cannot enforce the minimum TLS version."""
    import psycopg

    version = psycopg.pq.version() if version is None else version
    if version < MIN_LIBPQ:
        raise LibpqSupportError(
            f"secure_pg_backend needs libpq 13 or newer (for ssl_min_protocol_version); "
            f"psycopg's {psycopg.pq.__impl__} build uses libpq "
            f"{psycopg.pq.version_pretty(version)}. "
            "Fix: install psycopg[binary] (it bundles a current libpq), or upgrade the "
            "system's libpq (Debian/Ubuntu: libpq5) and rebuild psycopg[c]."
        )


def too_new_violation(name: str, keyword: str) -> Violation:
    """E009 for a libpq keyword this process's libpq is too old for (``policy.screen``)."""
    from psycopg.pq import version_pretty  # psycopg is loaded by then (require_psycopg)

    return Violation(
        "E009",
        f"{name} needs libpq {version_pretty(NEWER_KEYWORDS[keyword])} or newer, and this "
        f"process uses {describe_libpq()}, which would refuse it.",
        f"remove {name}, or install psycopg[binary] (it bundles a current libpq), or "
        "upgrade the system's libpq and rebuild psycopg[c].",
    )

"""Resolve ``sslrootcert="system"`` to a real CA bundle file.

psycopg[binary] bundles its own OpenSSL, whose compiled-in trust store
(``/usr/lib/psycopg-openssl/``) does not exist on normal machines, so libpq's
own ``system`` fails against every public-CA server. We resolve the platform's
store the way Python does (``SSL_CERT_FILE`` first) and hand libpq a file.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Mapping

__all__ = [
    "SystemTrustStoreError",
    "system_trust_file",
]

# Well-known OS bundles, for Pythons built against an OpenSSL with another prefix.
_OS_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL, Amazon Linux
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, FreeBSD, Alpine
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
)


class SystemTrustStoreError(Exception):
    fix = (
        "install the OS CA bundle (Debian: apt-get install ca-certificates) or "
        "certifi, or set SSL_CERT_FILE to a PEM bundle."
    )


def _readable_file(path: str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.R_OK)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8)
def _resolve(cert_file_env: str | None) -> tuple[str, str]:
    if cert_file_env:
        if _readable_file(cert_file_env):
            return cert_file_env, "SSL_CERT_FILE"
        raise SystemTrustStoreError(
            f"SSL_CERT_FILE is {cert_file_env!r}, which is not a readable file."
        )
    default = ssl.get_default_verify_paths().openssl_cafile
    if _readable_file(default):
        return default, "OpenSSL default"
    for path in _OS_BUNDLES:
        if _readable_file(path):
            return path, "OS bundle"
    try:
        import certifi
    except ImportError:
        pass
    else:
        path = certifi.where()
        if _readable_file(path):
            return path, "certifi"
    raise SystemTrustStoreError("no platform CA bundle was found (and certifi is not installed).")


def system_trust_file(environ: Mapping[str, str]) -> tuple[str, str]:
    """Return (path, how it was found); cached per ``SSL_CERT_FILE`` value."""
    return _resolve(environ.get("SSL_CERT_FILE") or None)

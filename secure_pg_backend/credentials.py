"""The built-in password providers, for ``OPTIONS['password_provider']``.

Short-lived credentials (AWS RDS IAM tokens, Azure Entra ID tokens, Cloud SQL IAM
access tokens) expire; a provider is called for every new physical connection::

    "OPTIONS": {"password_provider": "secure_pg_backend.credentials.aws_rds_iam"}

How a provider is named, allowed (E015), screened and called is the policy's
(``policy``, its "password provider" section); this module only holds the providers the
package ships, imported when a setting names one.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

__all__ = ["aws_rds_iam"]

# -- built-in providers -----------------------------------------------------------

# Compiled on first use (re caches it): only the IAM provider needs it, not every start-up.
_RDS_REGION = r"\.([a-z]{2}(?:-[a-z]+)+-\d+)\.rds\.amazonaws\.com(?:\.cn)?$"
_client_lock = threading.Lock()
_signing = threading.local()


class _QuietWhileSigning(logging.Filter):
    """Drop botocore.auth's debug records (it logs the signature) while we sign a token.

    Thread-local, so botocore's logging for anything else in the process is unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_signing, "active", False)


_quiet = _QuietWhileSigning()


@functools.lru_cache(maxsize=8)
def _rds_client(region: str | None, profile: str | None) -> Any:
    # Building a client loads the RDS service model (slow); signing with it is not.
    import botocore.session

    with _client_lock:  # botocore sessions are not thread-safe while they build clients
        session = botocore.session.Session(profile=profile)
        region = region or session.get_config_variable("region")
        if not region:
            raise ValueError(
                "no AWS region: HOST is not an RDS endpoint name and botocore has no region "
                "configured. Set AWS_DEFAULT_REGION, or use "
                "functools.partial(aws_rds_iam, region=...)."
            )
        return session.create_client("rds", region_name=region)


def aws_rds_iam(
    alias: str,
    settings_dict: Mapping[str, Any],
    *,
    region: str | None = None,
    profile: str | None = None,
) -> str:
    """An RDS IAM authentication token for HOST, PORT and USER (valid 15 minutes).

    Signed locally by botocore (``pip install 'secure-pg-backend[aws]'``) with the usual
    AWS credential chain; no network call. The region is ``region``, else the one in an
    RDS host name (``*.eu-west-1.rds.amazonaws.com``), else botocore's configured one.
    Use ``functools.partial(aws_rds_iam, region=..., profile=...)`` to fix them.
    """
    try:
        import botocore  # noqa: F401
    except ImportError:
        raise ImproperlyConfigured(
            "aws_rds_iam needs botocore: pip install 'secure-pg-backend[aws]'."
        ) from None
    host = str(settings_dict.get("HOST") or "").strip()
    if not host or "," in host or host.startswith("/"):
        raise ValueError(
            f"HOST is {host!r}; an RDS IAM token is signed for one host name. "
            "Set HOST to the instance or proxy endpoint name."
        )
    user = settings_dict.get("USER")
    if not user:
        raise ValueError("USER is empty; set it to the database user mapped to the IAM identity.")
    port = int(settings_dict.get("PORT") or 5432)
    if region is None:
        match = re.search(_RDS_REGION, host.lower())
        region = match.group(1) if match else None
    client = _rds_client(region, profile)
    auth_logger = logging.getLogger("botocore.auth")
    if _quiet not in auth_logger.filters:
        auth_logger.addFilter(_quiet)
    _signing.active = True
    try:
        token: str = client.generate_db_auth_token(
            DBHostname=host, Port=port, DBUsername=str(user), Region=client.meta.region_name
        )
    finally:
        _signing.active = False
    return token

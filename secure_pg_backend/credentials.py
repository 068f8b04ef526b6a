"""The built-in password providers, for ``OPTIONS['password_provider']``.

Short-lived credentials (AWS RDS IAM tokens, Azure Entra ID tokens, Cloud SQL IAM
access tokens) expire, and rotated secrets change; a provider is asked for each new physical
connection (an answer with ``expires_at`` is reused until shortly before then)::

    "OPTIONS": {"password_provider": "secure_pg_backend.credentials.aws_rds_iam"}
    "OPTIONS": {"password_provider": functools.partial(aws_secrets_manager, secret_id="...")}

How a provider is named, allowed (E015) and called is the policy's (``policy``, its "password
provider" section); what it may return, the cache and the second chance after a rotation are
``provider``'s. This module only holds the providers the package ships, imported when a
setting names one.

Azure Entra ID and Cloud SQL IAM stay recipes (docs/operations.md): their tokens come from the
vendors' token services, which cannot be reached or faithfully served here, so a built-in would
ship untested the very parts that fail in production (the credential chain, the scope, the
token endpoint).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .provider import Credentials

__all__ = ["aws_rds_iam", "aws_secrets_manager"]

# -- built-in providers -----------------------------------------------------------

# Compiled on first use (re caches it): only the IAM provider needs it, not every start-up.
_RDS_REGION = r"\.([a-z]{2}(?:-[a-z]+)+-\d+)\.rds\.amazonaws\.com(?:\.cn)?$"
_client_lock = threading.Lock()
_signing = threading.local()


class _QuietWhileSigning(logging.Filter):
    """Drop botocore's debug records while this thread signs a token or reads a secret:
    botocore.auth logs the signature, botocore.parsers the response body (the secret).

    Thread-local, so botocore's logging for anything else in the process is unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_signing, "active", False)


_quiet = _QuietWhileSigning()


@contextmanager
def _quiet_botocore() -> Iterator[None]:
    # A logger's filters see only the records made on it (not its children's, propagated):
    # every botocore logger that exists gets the filter (they are created with the client).
    for name in list(logging.root.manager.loggerDict):
        if name == "botocore" or name.startswith("botocore."):
            logger = logging.getLogger(name)
            if _quiet not in logger.filters:
                logger.addFilter(_quiet)
    _signing.active = True
    try:
        yield
    finally:
        _signing.active = False


@functools.lru_cache(maxsize=16)
def _client(
    service: str, region: str | None, profile: str | None, endpoint_url: str | None = None
) -> Any:
    # Building a client loads the service model (slow); using it is not. One per arguments.
    import botocore.session

    with _client_lock:  # botocore sessions are not thread-safe while they build clients
        session = botocore.session.Session(profile=profile)
        region = region or session.get_config_variable("region")
        if not region:
            provider = "aws_rds_iam" if service == "rds" else "aws_secrets_manager"
            where = (
                "HOST is not an RDS endpoint name"
                if service == "rds"
                else "the secret id is not an ARN"
            )
            raise ValueError(
                f"no AWS region: {where} and botocore has no region configured. Set "
                f"AWS_DEFAULT_REGION, or use functools.partial({provider}, region=...)."
            )
        return session.create_client(service, region_name=region, endpoint_url=endpoint_url)


def _rds_client(region: str | None, profile: str | None) -> Any:
    return _client("rds", region, profile)


def _need_botocore(provider: str) -> None:
    try:
        import botocore  # noqa: F401
    except ImportError:
        raise ImproperlyConfigured(
            f"{provider} needs botocore: pip install 'secure-pg-backend[aws]'."
        ) from None


def aws_rds_iam(
    alias: str,
    settings_dict: Mapping[str, Any],
    *,
    region: str | None = None,
    profile: str | None = None,
    iam_host: str | None = None,
) -> str:
    """An RDS IAM authentication token for HOST, PORT and USER (valid 15 minutes).

    Signed locally by botocore (``pip install 'secure-pg-backend[aws]'``) with the usual
    AWS credential chain; no network call. The region is ``region``, else the one in the
    host name the token is signed for (``*.eu-west-1.rds.amazonaws.com``), else botocore's
    configured one. ``iam_host``: the name the token is signed for when HOST is another
    name for it (a CNAME, whose name is on the certificate) or for an RDS Proxy endpoint
    reached by another name; the server checks the token against its own endpoint name.
    Use ``functools.partial(aws_rds_iam, region=..., profile=..., iam_host=...)``.
    """
    _need_botocore("aws_rds_iam")
    host = str(iam_host if iam_host is not None else settings_dict.get("HOST") or "").strip()
    field = "iam_host" if iam_host is not None else "HOST"
    if not host or "," in host or host.startswith("/"):
        raise ValueError(
            f"{field} is {host!r}; an RDS IAM token is signed for one host name. "
            f"Set {field} to the instance or proxy endpoint name."
        )
    user = settings_dict.get("USER")
    if not user:
        raise ValueError("USER is empty; set it to the database user mapped to the IAM identity.")
    port = int(settings_dict.get("PORT") or 5432)
    if region is None:
        match = re.search(_RDS_REGION, host.lower())
        region = match.group(1) if match else None
    client = _rds_client(region, profile)
    auth_logger = logging.getLogger("botocore.auth")  # exists before the first signature
    if _quiet not in auth_logger.filters:
        auth_logger.addFilter(_quiet)
    with _quiet_botocore():
        token: str = client.generate_db_auth_token(
            DBHostname=host, Port=port, DBUsername=str(user), Region=client.meta.region_name
        )
    return token


# -- AWS Secrets Manager ----------------------------------------------------------------------
# The JSON RDS's managed rotation writes (and the rotation Lambdas' templates): {"engine":
# "postgres", "host": ..., "port": 5432, "dbname": ..., "username": ..., "password": ...}.
# Only ``username`` and ``password`` are used. ``host``, ``port`` and ``dbname`` are ignored on
# purpose: HOST is the name the TLS policy verifies the server's certificate against, judged
# before any I/O; a secret must not move the connection somewhere else after that.
SECRETS_TTL = 300.0  # seconds a secret is reused: secrets carry no expiry of their own
_ARN_REGION = re.compile(r"^arn:aws[a-z-]*:secretsmanager:([a-z0-9-]+):")


def aws_secrets_manager(
    alias: str,
    settings_dict: Mapping[str, Any],
    *,
    secret_id: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
    ttl: float = SECRETS_TTL,
    version_stage: str = "AWSCURRENT",
) -> Credentials:
    """The user and password of a Secrets Manager secret (``GetSecretValue``).

    ``secret_id``: the secret's name or ARN. The secret's string is the JSON RDS rotation
    writes; ``username`` (if present) becomes the user of the connection, ``password`` its
    password (``host``, ``port``, ``dbname`` are not used: HOST stays what the policy judged).
    The answer is reused for ``ttl`` seconds (less the cache's margin); a rotation between two
    reads is healed by the second chance (the server's 28P01 makes the backend read again).
    botocore's credential chain; the region is ``region``, else the ARN's, else botocore's.
    ``endpoint_url``: a VPC endpoint (or a test server). Use ``functools.partial``::

        functools.partial(aws_secrets_manager, secret_id="prod/orders/app")
    """
    _need_botocore("aws_secrets_manager")
    if not secret_id or not isinstance(secret_id, str):
        raise ValueError(
            "no secret_id: name the secret with "
            "functools.partial(aws_secrets_manager, secret_id='<name or ARN>')."
        )
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= 86400:
        raise ValueError(f"ttl is {ttl!r}; give the seconds a secret may be reused (1 to 86400).")
    if region is None:
        match = _ARN_REGION.match(secret_id)
        region = match.group(1) if match else None
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client("secretsmanager", region, profile, endpoint_url)
    try:
        with _quiet_botocore():
            response = client.get_secret_value(SecretId=secret_id, VersionStage=version_stage)
    except (BotoCoreError, ClientError) as exc:  # botocore's words name no secret value
        raise RuntimeError(
            f"reading the secret {secret_id!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    user, password = _secret_fields(response.get("SecretString"), secret_id)
    return Credentials(user, password, expires_at=time.time() + float(ttl))


def _secret_fields(text: object, secret_id: str) -> tuple[str | None, str]:
    """``username`` and ``password`` from the secret's JSON; errors never quote the secret."""
    shape = (
        f"the secret {secret_id!r} is not the JSON RDS rotation writes "
        '({"username": "...", "password": "..."})'
    )
    if not isinstance(text, str):
        raise ValueError(f"{shape}: it has no SecretString (a binary secret).")
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{shape}: its SecretString is not JSON.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{shape}: its SecretString is JSON but not an object.")
    password, user = data.get("password"), data.get("username")
    if not isinstance(password, str) or not password:
        raise ValueError(f"{shape}: it has no 'password' string.")
    if user is not None and (not isinstance(user, str) or not user):
        raise ValueError(f"{shape}: its 'username' is not a non-empty string.")
    return user, password

"""Passwords fetched per physical connection: ``OPTIONS['password_provider']``.

Short-lived credentials (AWS RDS IAM tokens, Azure Entra ID tokens, Cloud SQL IAM
access tokens) expire; Django computes connection parameters once per connect and its
pool freezes them at construction. A provider is called for every new physical
connection instead, after the TLS policy has passed::

    "OPTIONS": {"password_provider": "secure_pg_backend.credentials.aws_rds_iam"}

A provider is a callable taking ``(alias, settings_dict)`` and returning the password.
A string names one only where settings code vouches for it: a built-in provider's path,
or a path listed in ``settings.SECURE_PG_BACKEND_PASSWORD_PROVIDERS``. dj-database-url
copies a URL's query keys into OPTIONS, so any other string may come from a
``DATABASE_URL``, and a URL must never make the process import or call code; it is
refused (E015) before any import.

Its value goes straight to libpq: it is screened like a setting (a str, no control
characters: a NUL would cut off the TLS keywords after it), never stored in
``settings_dict``, logged, or put in an error message, and placed last in the
connection parameters.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .errors import InsecureConnectionError, Violation, location
from .policy import PASSWORD_PROVIDER, control_character

__all__ = [
    "CredentialProviderError",
    "Provider",
    "aws_rds_iam",
    "load_provider",
    "password_for",
    "pool_kwargs",
    "with_password",
]

FIELD = f"OPTIONS[{PASSWORD_PROVIDER!r}]"
# Settings code lists here the dotted paths of its own providers it lets OPTIONS name.
ALLOWED_SETTING = "SECURE_PG_BACKEND_PASSWORD_PROVIDERS"

Provider = Callable[[str, Mapping[str, Any]], str]


class CredentialProviderError(InsecureConnectionError):
    """The password provider raised or returned no usable password; nothing was sent.

    A subclass of ``InsecureConnectionError`` (so of Django's ``OperationalError``):
    the backend could not open the connection, and Django's pool hands it to waiting
    requests at once instead of letting them time out.
    """


class ProviderConfigurationError(ImproperlyConfigured):
    """The provider setting itself is unusable; the gate reports it as E015 before any I/O."""

    def __init__(self, alias: str, host: str | None, problem: str, fix: str) -> None:
        super().__init__(f"{location(alias, host)}: {problem} Fix: {fix}")
        self.problem, self.fix = problem, fix


def _configuration_error(alias: str, host: str | None, problem: str, fix: str) -> Exception:
    return ProviderConfigurationError(alias, host, problem, fix)


def provider_violation(alias: str, settings_dict: Mapping[str, Any]) -> Violation | None:
    """E015 when OPTIONS['password_provider'] cannot be used (for the gate and the checks)."""
    try:
        load_provider(alias, settings_dict)
    except ProviderConfigurationError as exc:
        return Violation("E015", exc.problem, exc.fix)
    return None


def provider_name(provider: object) -> str:
    """The dotted name errors show for a provider (a path as given, else module.qualname)."""
    if isinstance(provider, str):
        return provider
    if isinstance(provider, functools.partial):
        return f"functools.partial({provider_name(provider.func)}, ...)"
    module = getattr(provider, "__module__", None) or type(provider).__module__
    name = getattr(provider, "__qualname__", None) or type(provider).__qualname__
    return f"{module}.{name}"


@functools.lru_cache(maxsize=32)
def _import(path: str) -> Any:
    return import_string(path)


def _allowed_paths() -> tuple[str, ...]:
    from django.conf import settings

    listed = getattr(settings, ALLOWED_SETTING, ())
    return tuple(listed) if isinstance(listed, list | tuple | frozenset | set) else ()


def _named_provider(alias: str, host: str | None, path: str) -> Any:
    """The provider a string names; nothing is imported unless settings code allowed it."""
    if path in BUILTIN_PROVIDERS:
        return BUILTIN_PROVIDERS[path]
    if path not in _allowed_paths():
        # Never echo more than a name: the string may be anything a URL carried.
        shown = path if path.replace(".", "").replace("_", "").isalnum() else "a string"
        raise _configuration_error(
            alias,
            host,
            f"{FIELD} is {shown!r}, a dotted path settings code has not allowed; this "
            "backend imports nothing a DATABASE_URL can name (dj-database-url copies its "
            "query keys into OPTIONS).",
            f"in settings, set {FIELD} to the function itself, or add its dotted path to "
            f"settings.{ALLOWED_SETTING} (a list); built-in: "
            f"{', '.join(repr(name) for name in BUILTIN_PROVIDERS)}.",
        )
    try:
        return _import(path)
    except ImportError as exc:
        raise _configuration_error(
            alias,
            host,
            f"{FIELD} is {path!r}, which cannot be imported ({exc}).",
            f"list the dotted path of a function (alias, settings_dict) -> password in "
            f"settings.{ALLOWED_SETTING}, or set {FIELD} to the function itself.",
        ) from None


def load_provider(alias: str, settings_dict: Mapping[str, Any]) -> tuple[Provider, str] | None:
    """The configured provider and its name, or None; ImproperlyConfigured when unusable."""
    options: Mapping[str, Any] = settings_dict.get("OPTIONS") or {}
    value = options.get(PASSWORD_PROVIDER)
    if value is None:
        return None
    host = settings_dict.get("HOST") or None
    example = "'secure_pg_backend.credentials.aws_rds_iam'"
    provider = _named_provider(alias, host, value) if isinstance(value, str) else value
    if not callable(provider):
        raise _configuration_error(
            alias,
            host,
            f"{FIELD} is {provider_name(value)!r}, a {type(provider).__name__}, not a callable.",
            f"set it to a function (alias, settings_dict) -> password or its dotted path, "
            f"e.g. {example}.",
        )
    if settings_dict.get("PASSWORD"):
        raise _configuration_error(
            alias,
            host,
            f"both PASSWORD and {FIELD} are set; it is unclear which one should be used.",
            f"remove PASSWORD (the provider supplies it for every connection) or {FIELD}.",
        )
    return provider, provider_name(value)


def password_for(alias: str, settings_dict: Mapping[str, Any]) -> str | None:
    """Call the provider for one new physical connection; None when none is configured."""
    loaded = load_provider(alias, settings_dict)
    if loaded is None:
        return None
    provider, name = loaded
    host = settings_dict.get("HOST") or None
    where = location(alias, host)
    head = f"secure_pg_backend could not get a password for {where}: the password provider {name!r}"
    try:
        password = provider(alias, settings_dict)
    except Exception as exc:
        # The provider failed before producing a secret: its own message names the cause.
        detail = " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(".")
        fix = "check the provider's credentials and configuration."
        message = f"{head} raised {detail}. Fix: {fix}"
        raise CredentialProviderError(message, alias=alias, host=host) from exc
    problem = _unusable(password)
    if problem is not None:
        # Never show the value: a wrongly typed or malformed secret is still a secret.
        message = f"{head} ({FIELD}) returned {problem} Nothing was sent. Fix: {_FIX_VALUE}"
        raise CredentialProviderError(message, alias=alias, host=host)
    return password  # _unusable checked it is a str


_FIX_VALUE = "return the password or token itself, as a str without control characters."


def _unusable(password: object) -> str | None:
    """Why a provider's value cannot go to libpq, worded without the value; None if it can."""
    if not isinstance(password, str):
        return f"a {type(password).__name__} instead of a non-empty str."
    if not password:
        return "an empty string instead of a non-empty str."
    found = control_character(password)
    if found is not None:
        # libpq reads the connection string as a C string: a NUL would cut off every
        # keyword after the password, the forced TLS settings among them.
        return f"a value containing the control character {found}, which libpq cannot take."
    return None


def with_password(
    alias: str, settings_dict: Mapping[str, Any], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Connection parameters with a fresh password (unchanged without a provider).

    Without a provider the parameters are returned as they are (the gate never passes
    the provider key on): no copy on every new connection.
    """
    password = password_for(alias, settings_dict)
    if password is None:
        return params if isinstance(params, dict) else dict(params)
    # Appended, not replaced in place (a password libpq resolved from PGPASSWORD may sit
    # early in the parameters): nothing the provider returns comes before a TLS keyword.
    out = {k: v for k, v in params.items() if k not in (PASSWORD_PROVIDER, "password")}
    out["password"] = password
    return out


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def pool_kwargs(
    alias: str, settings_dict: Mapping[str, Any], params: dict[str, Any]
) -> dict[str, Any] | Callable[[], dict[str, Any]]:
    """``kwargs`` for psycopg_pool: a callable asking the provider for each new connection."""
    if load_provider(alias, settings_dict) is None:  # configuration errors surface here
        return params
    import psycopg_pool

    if _version(psycopg_pool.__version__) < (3, 3):  # the first to accept a callable kwargs
        raise _configuration_error(
            alias,
            settings_dict.get("HOST") or None,
            f"{FIELD} with OPTIONS['pool'] needs psycopg-pool 3.3 or newer (which asks for "
            f"the connection parameters for each new connection); {psycopg_pool.__version__} "
            "is installed.",
            "pip install 'psycopg-pool>=3.3'.",
        )

    def fresh_kwargs() -> dict[str, Any]:
        return with_password(alias, settings_dict, params)

    return fresh_kwargs


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


# Strings that name a provider without importing anything (defined in this module).
BUILTIN_PROVIDERS: dict[str, Provider] = {f"{__name__}.aws_rds_iam": aws_rds_iam}

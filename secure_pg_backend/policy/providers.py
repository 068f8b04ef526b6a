"""The password provider as a setting: named, allowed, loaded (E015). Judged with the
settings; calling it for each physical connection is ``provider``'s."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from django.utils.module_loading import import_string

from ..errors import ProviderConfigurationError, Violation
from .terms import PASSWORD_PROVIDER

__all__ = [
    "ALLOWED_SETTING",
    "BUILTIN_PROVIDERS",
    "FIELD",
    "Provider",
    "has_provider",
    "load_provider",
    "provider_name",
    "provider_violation",
]

# -- the password provider: a fresh password for each physical connection ----------------
# Short-lived credentials (IAM tokens) expire, and Django computes the connection parameters
# once per connect (its pool, once at construction): a provider is called for each new
# physical connection instead, after the policy has passed. A string names one only where
# settings code vouches for it (a built-in's path, or one listed in
# settings.SECURE_PG_BACKEND_PASSWORD_PROVIDERS): dj-database-url copies a URL's query keys
# into OPTIONS, and a URL must never make the process import or call code (E015, before any
# import). Its value is screened like a setting (a NUL would cut off the TLS keywords after
# it), never stored, logged or shown, and placed last in the connection parameters.
FIELD = f"OPTIONS[{PASSWORD_PROVIDER!r}]"
# Settings code lists here the dotted paths of its own providers it lets OPTIONS name.
ALLOWED_SETTING = "SECURE_PG_BACKEND_PASSWORD_PROVIDERS"

# It returns the password (a str) or ``provider.Credentials``.
Provider = Callable[[str, Mapping[str, Any]], object]
# Strings that name a provider without settings code listing them: this package's own.
BUILTIN_PROVIDERS = ("secure_pg_backend.credentials.aws_rds_iam",)


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
    if path not in BUILTIN_PROVIDERS and path not in _allowed_paths():
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


def has_provider(settings_dict: Mapping[str, Any]) -> bool:
    """Whether a provider is configured (cheap: a connection without one never imports
    ``provider``)."""
    options = settings_dict.get("OPTIONS") or {}
    return options.get(PASSWORD_PROVIDER) is not None

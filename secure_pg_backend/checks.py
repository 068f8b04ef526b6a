"""Offline system checks: every rule ``policy.evaluate`` applies, as ``manage.py check`` errors.

No network and no second copy of any rule: each ``Violation`` the connection path
would raise becomes one ``Error`` with id ``secure_pg_backend.<code>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error

from . import policy
from .errors import location, redact

__all__ = ["ENGINES", "check_databases"]

# Both spellings Django accepts for this backend's ENGINE.
ENGINES = frozenset({"secure_pg_backend", "secure_pg_backend.base"})


def check_databases(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    databases: dict[str, dict[str, Any]] = getattr(settings, "DATABASES", {})
    for alias, settings_dict in databases.items():
        if settings_dict.get("ENGINE") not in ENGINES:
            continue
        result = policy.evaluate(alias, settings_dict)
        where = location(alias, result.host)
        password = settings_dict.get("PASSWORD")
        for violation in result.violations:
            errors.append(
                Error(
                    redact(f"{where}: {violation.problem}", password),
                    hint=redact(violation.fix, password),
                    obj=f"DATABASES[{alias!r}]",
                    id=f"secure_pg_backend.{violation.code}",
                )
            )
    return errors

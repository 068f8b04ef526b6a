"""Offline system checks: every policy rule, as ``manage.py check`` errors.

No network and no second copy of any rule: each alias whose wrapper carries the
policy is judged by the same gate the connection uses (``policy_verdict``), and
each ``Violation`` becomes one ``Error`` with id ``secure_pg_backend.<code>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured

from .errors import check_id, location, redact, secret_values

__all__ = ["check_databases"]


def check_databases(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    from .base import VerifiedTLSMixin, standalone_wrapper

    errors: list[CheckMessage] = []
    databases: dict[str, dict[str, Any]] = getattr(settings, "DATABASES", {})
    for alias, settings_dict in databases.items():
        try:
            wrapper = standalone_wrapper(alias, settings_dict)
        except ImproperlyConfigured:  # an ENGINE that does not load: Django reports it
            continue
        if not isinstance(wrapper, VerifiedTLSMixin):
            continue
        verdict = wrapper.policy_verdict().now()  # the files libpq opens, as they are now
        where = location(alias, verdict.host)
        password = secret_values(wrapper.settings_dict)
        for violation in verdict.violations:
            errors.append(
                Error(
                    redact(f"{where}: {violation.problem}", password),
                    hint=redact(violation.fix, password),
                    obj=f"DATABASES[{alias!r}]",
                    id=check_id(violation.code),
                )
            )
    return errors

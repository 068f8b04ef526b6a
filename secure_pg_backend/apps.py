import importlib.util
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core import checks

__all__ = [
    "SecurePgBackendConfig",
]


class SecurePgBackendConfig(AppConfig):
    name = "secure_pg_backend"
    verbose_name = "Secure PostgreSQL backend"
    default = True

    def ready(self) -> None:
        from .base import verified_aliases

        # Tagged "security" (not "database"): these run offline on every `check`.
        checks.register(_check_databases, checks.Tags.security)
        # A PostgreSQL alias this policy does not cover: with `check --deploy` only, since
        # a stock alias can be deliberate in development (W003).
        checks.register(_check_deploy_aliases, checks.Tags.security, deploy=True)
        # Aliases whose own link goes without TLS by an opt-in (W004): a decision to review.
        checks.register(_check_deploy_plaintext, checks.Tags.security, deploy=True)
        # Prometheus metrics when prometheus_client is installed (extra [metrics]); without
        # it, the metrics module is not even imported.
        if importlib.util.find_spec("prometheus_client") is not None:
            from . import metrics

            metrics.install(verified_aliases)


def _check_databases(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    # The checks module is imported when checks run, not on every process start.
    from .checks import check_databases

    return check_databases(app_configs, **kwargs)


def _check_deploy_aliases(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    from .checks import check_deploy_aliases

    return check_deploy_aliases(app_configs, **kwargs)


def _check_deploy_plaintext(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    from .checks import check_deploy_plaintext

    return check_deploy_plaintext(app_configs, **kwargs)

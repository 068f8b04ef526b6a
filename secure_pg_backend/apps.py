from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core import checks


class SecurePgBackendConfig(AppConfig):
    name = "secure_pg_backend"
    verbose_name = "Secure PostgreSQL backend"
    default = True

    def ready(self) -> None:
        from . import metrics
        from .base import verified_aliases

        # Tagged "security" (not "database"): these run offline on every `check`.
        checks.register(_check_databases, checks.Tags.security)
        # Prometheus metrics when prometheus_client is installed (extra [metrics]).
        metrics.install(verified_aliases)


def _check_databases(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    # The checks module is imported when checks run, not on every process start.
    from .checks import check_databases

    return check_databases(app_configs, **kwargs)

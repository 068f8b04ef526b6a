from django.apps import AppConfig
from django.core import checks


class SecurePgBackendConfig(AppConfig):
    name = "secure_pg_backend"
    verbose_name = "Secure PostgreSQL backend"
    default = True

    def ready(self) -> None:
        from . import metrics
        from .base import verified_aliases
        from .checks import check_databases

        # Tagged "security" (not "database"): these run offline on every `check`.
        checks.register(check_databases, checks.Tags.security)
        # Prometheus metrics when prometheus_client is installed (extra [metrics]).
        metrics.install(verified_aliases())

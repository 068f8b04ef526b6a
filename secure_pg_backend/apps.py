from django.apps import AppConfig
from django.conf import settings
from django.core import checks


class SecurePgBackendConfig(AppConfig):
    name = "secure_pg_backend"
    verbose_name = "Secure PostgreSQL backend"
    default = True

    def ready(self) -> None:
        from . import metrics
        from .checks import check_databases

        # Tagged "security" (not "database"): these run offline on every `check`.
        checks.register(check_databases, checks.Tags.security)
        # Prometheus metrics when prometheus_client is installed (extra [metrics]).
        metrics.install(
            alias
            for alias, entry in settings.DATABASES.items()
            if str(entry.get("ENGINE", "")).startswith("secure_pg_backend")
        )

from django.apps import AppConfig
from django.core import checks


class SecurePgBackendConfig(AppConfig):
    name = "secure_pg_backend"
    verbose_name = "Secure PostgreSQL backend"
    default = True

    def ready(self) -> None:
        from .checks import check_databases

        # Tagged "security" (not "database"): these run offline on every `check`.
        checks.register(check_databases, checks.Tags.security)

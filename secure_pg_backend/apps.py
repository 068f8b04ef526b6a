from django.apps import AppConfig


class SecurePgBackendConfig(AppConfig):
    name = "secure_pg_backend"
    verbose_name = "Secure PostgreSQL backend"
    default = True

"""A third-party ENGINE built on Django's PostgreSQL wrapper without the policy's mixin (as a
monitoring or multi-tenancy package ships one): ``check --deploy`` must name it (W003)."""

from django.db.backends.postgresql import base as postgresql


class DatabaseWrapper(postgresql.DatabaseWrapper):
    pass

"""A user-side ENGINE built from the public mixin (as the README's recipe shows)."""

from django.db.backends.postgresql import base as postgresql

from secure_pg_backend.base import VerifiedTLSMixin


class DatabaseWrapper(VerifiedTLSMixin, postgresql.DatabaseWrapper):
    pass

"""The mixin listed after Django's wrapper (issue 27's second finding): none of the mixin's
connection code would run. The class must refuse to connect, and ``check`` name the mistake."""

from django.db.backends.postgresql import base as postgresql

from secure_pg_backend.base import VerifiedTLSMixin


class DatabaseWrapper(postgresql.DatabaseWrapper, VerifiedTLSMixin):
    pass

from django_prometheus.db.backends.postgresql import base as prometheus

from secure_pg_backend.base import VerifiedTLSMixin


# django-prometheus' wrapper is its DatabaseWrapperMixin (connection counters) over Django's
# postgresql wrapper, plus the cursor factory that counts queries on psycopg 3. The policy goes
# first, so it wraps all of that.
class DatabaseWrapper(VerifiedTLSMixin, prometheus.DatabaseWrapper):
    pass

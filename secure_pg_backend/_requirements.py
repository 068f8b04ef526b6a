"""Imported first by the package: one clear error when psycopg 3 or libpq >= 13 is missing.

Without it, a missing psycopg 3 surfaces as a ``ModuleNotFoundError`` from deep inside
(or as Django's "isn't an available database backend"), and an old libpq as libpq's
"invalid connection option" on the first connection.
"""

from .compat import require_libpq, require_psycopg

require_psycopg()
require_libpq()

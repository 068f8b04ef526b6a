"""A subclass that weakens what libpq gets (issue 27's first finding): the policy judged the
settings, then this method changes the result. The attempt pipeline must refuse it."""

from typing import Any

from secure_pg_backend.base import DatabaseWrapper as SecureWrapper


class DatabaseWrapper(SecureWrapper):
    weakened = {"sslmode": "require"}  # a test sets another change on a subclass

    def get_connection_params(self) -> dict[str, Any]:
        params = super().get_connection_params()
        params.update(self.weakened)
        return params

"""pytest plugin: a throwaway PostgreSQL with verified TLS for your project's test session.

Registered with the ``pytest11`` entry point, so installing ``secure-pg-backend[testing]`` is
enough. Nothing happens unless a test or fixture asks for one of these fixtures; the server
modules are imported only then.

- ``secure_pg_server``: the running server (``secure_pg_backend.testing.devserver.DevServer``, with
  ``.url`` for dj-database-url and ``.ca_path``), one per session (per xdist worker).
- ``secure_pg_database``: a ``DATABASES`` entry for it (ENGINE ``secure_pg_backend``).
- ``secure_pg_django_db``: points Django's ``default`` alias at it. With pytest-django, request
  it from ``django_db_modify_db_settings`` in your conftest.py and the test database is created
  there::

      @pytest.fixture(scope="session")
      def django_db_modify_db_settings(secure_pg_django_db):
          pass

The server binaries come from ``$PG_BIN`` (or Debian's layout, or PATH).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .devserver import DevServer

__all__ = ["point_django_at"]


@pytest.fixture(scope="session")
def secure_pg_server() -> Iterator[DevServer]:
    """A TLS PostgreSQL on 127.0.0.1 with its own CA, stopped and removed after the session."""
    from .devserver import DevServer

    with DevServer.start() as server:
        yield server


@pytest.fixture(scope="session")
def secure_pg_database(secure_pg_server: DevServer) -> dict[str, Any]:
    """A ``DATABASES`` entry for ``secure_pg_server`` (verify-full against its CA)."""
    return secure_pg_server.database_settings()


@pytest.fixture(scope="session")
def secure_pg_django_db(secure_pg_database: dict[str, Any]) -> dict[str, Any]:
    """Point Django's ``default`` alias at ``secure_pg_server``; returns the entry."""
    point_django_at(secure_pg_database)
    return secure_pg_database


def point_django_at(entry: dict[str, Any], alias: str = "default") -> None:
    """Replace ``settings.DATABASES[alias]`` in a running Django, as if it had been configured.

    Closes and forgets this thread's connection for the alias, so the next use connects to
    the new server. Call it before the test databases are set up.
    """
    from django.conf import settings
    from django.db import connections

    for existing in connections.all(initialized_only=True):
        if existing.alias == alias:
            existing.close()
            del connections[alias]
    # ConnectionHandler fills in Django's defaults (TIME_ZONE, CONN_MAX_AGE, TEST, ...).
    configured = connections.configure_settings(
        {**connections.settings, alias: copy.deepcopy(entry)}
    )[alias]
    connections.settings[alias] = configured
    settings.DATABASES[alias] = configured

"""Throwaway PostgreSQL servers with real TLS, for tests and local development.

``from secure_pg_backend.testing import TestCA, TLSPostgres`` (``servers``), PgBouncer in
front of one (``testing.pgbouncer``), the dev server (``python -m secure_pg_backend.testing``,
``testing.devserver``) and the pytest plugin (``testing.pytest_plugin``, registered with the
``pytest11`` entry point). Grouped here so the package's top level shows the backend.

The names are loaded on first use: the pytest plugin lives in this package, and a session
that never asks for a server must not import the server code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .servers import (
        APP_DB as APP_DB,
    )
    from .servers import (
        APP_PASSWORD as APP_PASSWORD,
    )
    from .servers import (
        APP_USER as APP_USER,
    )
    from .servers import (
        LEAF_VALIDITY as LEAF_VALIDITY,
    )
    from .servers import (
        SUPERUSER as SUPERUSER,
    )
    from .servers import (
        SUPERUSER_PASSWORD as SUPERUSER_PASSWORD,
    )
    from .servers import (
        LeafPair as LeafPair,
    )
    from .servers import (
        TestCA as TestCA,
    )
    from .servers import (
        TLSPostgres as TLSPostgres,
    )
    from .servers import (
        cleanup as cleanup,
    )
    from .servers import (
        find_pg_bin as find_pg_bin,
    )
    from .servers import (
        free_port as free_port,
    )

__all__ = ["LeafPair", "TLSPostgres", "TestCA", "cleanup", "find_pg_bin", "free_port"]

_SERVERS = frozenset(
    {*__all__, "APP_DB", "APP_PASSWORD", "APP_USER", "LEAF_VALIDITY", "SUPERUSER"}
    | {"SUPERUSER_PASSWORD"}
)


def __getattr__(name: str) -> Any:
    if name in _SERVERS:
        return getattr(importlib.import_module(f"{__name__}.servers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

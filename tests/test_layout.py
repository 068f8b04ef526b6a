"""The layout's promise (docs/development.md): one connection's path crosses six modules.

Measured, not read off the imports: the package modules whose functions run while a wrapper
opens, verifies and announces one connection with default settings.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from secure_pg_backend.testing import TLSPostgres

PATH = {"base", "policy", "libpq", "errors", "handshake", "signals"}
# Receivers of connection_verified (the app installs the metrics when prometheus_client is
# importable): observers of the path, not steps of it.
RECEIVERS = {"metrics"}


def _modules_run(action: Callable[[], object]) -> set[str]:
    seen: set[str] = set()

    def profile(frame: types.FrameType, event: str, arg: Any) -> None:
        name = frame.f_globals.get("__name__", "")
        if event == "call" and name.startswith("secure_pg_backend."):
            seen.add(name.removeprefix("secure_pg_backend."))

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return {name for name in seen if not name.startswith("testing")}


@pytest.fixture
def quiet_start_up_line() -> Iterator[None]:
    # The INFO line builds the report (tlsinfo) when emitted; the path is measured without it.
    logger = logging.getLogger("secure_pg_backend")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def test_one_connection_crosses_six_modules(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres, quiet_start_up_line: None
) -> None:
    wrapper = make_wrapper(good_server.database_settings())
    assert _modules_run(wrapper.ensure_connection) - RECEIVERS == PATH
    assert wrapper.connection is not None


def test_the_report_adds_only_tlsinfo(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(good_server.database_settings())
    wrapper.ensure_connection()
    assert _modules_run(lambda: wrapper.tls_info) - RECEIVERS <= PATH | {"tlsinfo"}

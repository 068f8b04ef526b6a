"""docs/errors.md shows what users really get: each row is produced again on real servers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from secure_pg_backend.testing import TestCA, TLSPostgres
from tests.conftest import SECRETS
from tests.support.error_table import (
    CASES,
    HEADER,
    NAMED,
    NOT_YET_VALID,
    WRONG_SSLPASSWORD,
    client_files,
    rows,
    self_signed,
)

PAGE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


@pytest.fixture
def servers(
    good_server: TLSPostgres,
    mitm_server: TLSPostgres,
    plain_server: TLSPostgres,
    expired_server: TLSPostgres,
    start_server: Callable[..., TLSPostgres],
    ca: TestCA,
    tmp_path: Path,
    django_db_blocker: Any,
) -> Any:
    mtls = start_server(ca.issue("localhost", "127.0.0.1"), trust=ca, client_ca=ca)
    future = start_server(ca.issue("localhost", "127.0.0.1", **NOT_YET_VALID), trust=ca)
    lone = start_server(self_signed("localhost", "127.0.0.1"), trust=ca)
    named = start_server(ca.issue(NAMED), trust=ca)
    client_files(ca, tmp_path)
    with django_db_blocker.unblock():
        yield {
            "good": good_server,
            "other-ca": mitm_server,
            "plain": plain_server,
            "expired": expired_server,
            "mtls": mtls,
            "future": future,
            "self-signed": lone,
            "named": named,
        }


def test_docs_error_table_matches_real_output(servers: dict[str, TLSPostgres], ca: TestCA) -> None:
    produced = list(rows(servers, str(ca.cert_path)))
    assert len(produced) == len(CASES)
    page = PAGE.read_text()
    assert page.startswith(HEADER), (
        "regenerate: python -m tests.support.error_table > docs/errors.md"
    )
    for row in produced:
        assert row in page, f"docs/errors.md is out of date; regenerate it. Missing:\n{row}"
        assert not any(secret in row for secret in (*SECRETS, WRONG_SSLPASSWORD))

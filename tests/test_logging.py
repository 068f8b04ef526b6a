"""The start-up log line: content, level per alias, structured fields, no secrets."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from secure_pg_backend.testing import TLSPostgres
from tests.conftest import assert_no_secret, leaf_certificate

Wrapper = Callable[..., Any]


def connect_records(caplog: pytest.LogCaptureFixture, alias: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"alias {alias!r} connected" in r.getMessage()]


def test_first_connection_per_alias_is_info_then_debug(
    make_wrapper: Wrapper, good_server: TLSPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="secure_pg_backend")
    a = make_wrapper(good_server.database_settings(), alias="alpha")
    b = make_wrapper(good_server.database_settings(), alias="beta")
    for _ in range(3):
        a.ensure_connection()
        a.close()
    b.ensure_connection()
    assert [r.levelname for r in connect_records(caplog, "alpha")] == ["INFO", "DEBUG", "DEBUG"]
    assert [r.levelname for r in connect_records(caplog, "beta")] == ["INFO"]


def test_log_line_carries_the_facts(
    make_wrapper: Wrapper, good_server: TLSPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    info = make_wrapper(good_server.database_settings(), alias="facts").tls_info
    (record,) = connect_records(caplog, "facts")
    message = record.getMessage()
    not_after = leaf_certificate(good_server).not_valid_after_utc
    for fact in (
        "127.0.0.1",
        str(good_server.port),
        "'app'",
        info.protocol,
        info.cipher,
        f"{info.key_bits}-bit",
        "sslmode=verify-full",
        good_server.root_cert,
        "OPTIONS['sslrootcert']",
        f"expires {not_after:%Y-%m-%d}, in ",
    ):
        assert fact and fact in message, fact
    # The same facts as structured fields, for JSON handlers.
    fields = {k: getattr(record, k) for k in vars(record) if k.startswith(("db_", "tls_"))}
    assert fields["db_alias"] == "facts"
    assert fields["db_port"] == good_server.port
    assert fields["tls_protocol"] == info.protocol
    assert fields["tls_cipher"] == info.cipher
    assert fields["tls_key_bits"] == info.key_bits
    assert fields["tls_cert_not_after"].startswith(f"{not_after:%Y-%m-%d}")
    json.dumps(fields)
    assert_no_secret(message, json.dumps(fields), repr(record.__dict__))


def test_no_work_when_the_logger_is_silent(
    make_wrapper: Wrapper, good_server: TLSPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    wrapper = make_wrapper(good_server.database_settings(), alias="quiet")
    first = wrapper.tls_info  # the first connection reads the expiry, without a full parse
    assert "_not_after" in vars(first) and "_peer_certificate" not in vars(first)
    wrapper.close()
    later = wrapper.tls_info
    assert len(connect_records(caplog, "quiet")) == 1
    # A DEBUG record nobody will see costs no certificate reading at all.
    assert "_not_after" not in vars(later) and "_peer_certificate" not in vars(later)

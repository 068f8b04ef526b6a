"""The connection path stays light (issue 9): the expiry comes from the session's OpenSSL, and
``cryptography`` is imported only when someone asks for the parsed certificate."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from secure_pg_backend import certificates
from secure_pg_backend.testing import TestCA, TLSPostgres
from tests.conftest import leaf_certificate

ROOT = Path(__file__).resolve().parent.parent
UTC = dt.timezone.utc


@pytest.mark.parametrize(
    "not_after",
    [
        dt.datetime(2021, 1, 1, tzinfo=UTC),  # UTCTime
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),  # last UTCTime year
        dt.datetime(2050, 1, 1, tzinfo=UTC),  # GeneralizedTime from 2050
        dt.datetime(3000, 6, 15, 12, 30, 5, tzinfo=UTC),
    ],
)
def test_not_after_is_read_by_openssl_exactly(ca: TestCA, not_after: dt.datetime) -> None:
    from cryptography import x509

    leaf = ca.issue("db.test", not_before=dt.datetime(2020, 1, 1, tzinfo=UTC), not_after=not_after)
    cert = x509.load_pem_x509_certificates(leaf.cert_chain_pem)[0]
    assert certificates._openssl_not_after(cert.public_bytes(Encoding.DER)) == not_after


@pytest.mark.parametrize(
    "der", [b"", b"\x30\x03\x02\x01\x01", os.urandom(64)], ids=["empty", "integer", "random"]
)
def test_not_after_of_something_that_is_not_a_certificate_is_none(der: bytes) -> None:
    assert certificates._openssl_not_after(der) is None


def test_tls_info_expiry_without_parsing_the_certificate(
    make_wrapper: Callable[..., Any], expiring_server: TLSPostgres
) -> None:
    info = make_wrapper(expiring_server.database_settings(), alias="expiring").tls_info
    assert info.not_after == leaf_certificate(expiring_server).not_valid_after_utc
    assert info.days_left() == 10 and info.expires_soon()
    assert "_peer_certificate" not in vars(info)  # nothing parsed so far
    assert info.peer_certificate is not None
    assert info.peer_certificate.not_after == info.not_after


def test_live_not_after_is_read_from_the_session(
    make_wrapper: Callable[..., Any], expiring_server: TLSPostgres
) -> None:
    wrapper = make_wrapper(expiring_server.database_settings(), alias="expiring")
    wrapper.ensure_connection()
    pgconn = wrapper.connection.pgconn
    expected = leaf_certificate(expiring_server).not_valid_after_utc
    assert certificates._session_not_after(pgconn.pgconn_ptr) == expected
    assert certificates.peer_not_after(pgconn) == expected
    wrapper.close()
    assert certificates.peer_not_after(pgconn) is None  # closed: nothing left to read


# Django's default logging (no LOGGING): what a worker boot or `manage.py` call pays. The base
# install, without prometheus_client (the metrics, installed, are the last test of this file).
DEFAULT_LOGGING_CHILD = """
import json, os, sys
sys.modules["prometheus_client"] = None
import django
from django.conf import settings
database = json.loads(os.environ["SPB_COLD_PATH"])
settings.configure(
    DATABASES={"default": database, "replica": database},
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "secure_pg_backend"],
    USE_TZ=True,
)
django.setup()
from django.db import connection, connections
print("wrappers after setup:", [c.alias for c in connections.all(initialized_only=True)])
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
# Each used only by what names it: the report, the checks, the metrics (prometheus_client
# installed), a refusal's wording and diagnosis, dbshell, a password provider.
light = (
    "secure_pg_backend.tlsinfo",
    "secure_pg_backend.checks",
    "secure_pg_backend.metrics",
    "secure_pg_backend.refusals",
    "secure_pg_backend.diagnose",
    "secure_pg_backend.psql_child",
    "secure_pg_backend.provider",
    "cryptography",
)
print("imported:", [name for name in light if name in sys.modules])
print("tls_info:", connection.tls_info.protocol)
print("imported:", [name for name in light if name in sys.modules])
"""


@pytest.mark.parametrize("which", ["good", "expiring"])
def test_first_connection_builds_no_report_unless_it_is_logged(
    good_server: TLSPostgres, expiring_server: TLSPostgres, which: str
) -> None:
    """The report (``TLSInfo``) and the checks are imported when used, not on every start;
    the expiry warning is still decided on the first connection, from the session."""
    server = expiring_server if which == "expiring" else good_server
    proc = subprocess.run(
        [sys.executable, "-c", DEFAULT_LOGGING_CHILD],
        env=dict(
            os.environ, PYTHONPATH=str(ROOT), SPB_COLD_PATH=json.dumps(server.database_settings())
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    wrappers, before, protocol, after = proc.stdout.splitlines()
    # Django's own apps build the default alias's wrapper; the others wait for their first use.
    assert wrappers == "wrappers after setup: ['default']"
    if which == "good":  # nothing to log at Django's default level: no report was built
        assert before == "imported: []" and proc.stderr == ""
    else:  # the warning is emitted, so its report was built (still no certificate parse)
        assert before == "imported: ['secure_pg_backend.tlsinfo']"
        assert "secure_pg_backend: database alias 'default'" in proc.stderr
        assert "server certificate expires" in proc.stderr
    assert protocol == "tls_info: TLSv1.3"
    assert after == "imported: ['secure_pg_backend.tlsinfo']"


CHILD = """
import json, logging, os, sys
import django
from django.conf import settings
config = json.loads(os.environ["SPB_COLD_PATH"])
settings.configure(
    DATABASES={"default": config["database"]},
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "secure_pg_backend"],
    USE_TZ=True,
)
django.setup()
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
logging.getLogger("secure_pg_backend").setLevel(config["level"])
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
print("cryptography imported:", "cryptography" in sys.modules)
connection.tls_info.peer_certificate
print("cryptography imported:", "cryptography" in sys.modules)
"""


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_first_connection_does_not_import_cryptography(
    good_server: TLSPostgres, expiring_server: TLSPostgres, level: str
) -> None:
    server = expiring_server if level == "WARNING" else good_server
    config = {"database": server.database_settings(), "level": level}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=dict(os.environ, PYTHONPATH=str(ROOT), SPB_COLD_PATH=json.dumps(config)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # The start-up line (INFO, or WARNING for the certificate expiring in 10 days) has the expiry.
    assert lines[0].startswith(f"{level} secure_pg_backend: database alias 'default'"), lines
    assert "server certificate expires" in lines[0]
    assert lines[1:] == ["cryptography imported: False", "cryptography imported: True"]


def test_cold_start_bench_keeps_its_contract(good_server: TLSPostgres) -> None:
    """bench/run.py calls ``measure(rounds)``; one round against our server checks the keys."""
    spec = importlib.util.spec_from_file_location("cold_start", ROOT / "bench" / "cold_start.py")
    assert spec is not None and spec.loader is not None
    cold_start = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cold_start)
    result = cold_start.measure_against(
        good_server.database_settings(), rounds=1, instructions=False
    )
    assert {"secure_ms_median", "stock_ms_median", "ratio", "rounds"} <= set(result)
    assert result["rounds"] == 1 and result["ratio"] > 0
    assert "cold start" in cold_start.human(result)


def test_metrics_read_the_checks_facts_not_the_report(good_server: TLSPostgres) -> None:
    """With prometheus_client importable the metrics record every connection, from the facts
    the post-handshake check read and the session's notAfter: no ``TLSInfo`` is built."""
    child = DEFAULT_LOGGING_CHILD.replace('sys.modules["prometheus_client"] = None\n', "")
    child += (
        "from prometheus_client import REGISTRY\n"
        "print('expiry:', REGISTRY.get_sample_value("
        "'secure_pg_backend_server_certificate_expiry_timestamp_seconds', "
        "{'alias': 'default', 'host': database['HOST']}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", child],
        env=dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            SPB_COLD_PATH=json.dumps(good_server.database_settings()),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    _, before, _, _, expiry = proc.stdout.splitlines()
    assert before == "imported: ['secure_pg_backend.metrics']"  # and still no report
    expected = leaf_certificate(good_server).not_valid_after_utc.timestamp()
    assert expiry == f"expiry: {expected}"

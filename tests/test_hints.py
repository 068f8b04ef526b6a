"""Hints by cause, for the setup at hand (issue 31): relative paths, poolers.

* A relative file setting passes ``check`` from the project directory and fails from ``/``:
  W005 says where it resolves now; the refusal from elsewhere says it was relative.
* PgBouncer without client TLS: the refusal names ``client_tls_sslmode`` beside ``ssl = on``.
* A known transaction pooler without ``DISABLE_SERVER_SIDE_CURSORS``: W006, from the host
  and port alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import CheckMessage, run_checks
from django.test import override_settings

from secure_pg_backend import InsecureConnectionError, hosting
from secure_pg_backend.errors import ConnectionFileError
from secure_pg_backend.testing import TestCA, TLSPostgres
from secure_pg_backend.testing.pgbouncer import PgBouncer
from tests.conftest import assert_no_secret

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def _checks(good: TLSPostgres, entry: dict[str, Any]) -> list[CheckMessage]:
    with override_settings(DATABASES={"default": good.database_settings(), "app": entry}):
        return [m for m in run_checks() if m.obj == "DATABASES['app']"]


@pytest.fixture
def project(tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory with certs/ca.pem in it, as the current directory."""
    (tmp_path / "certs").mkdir()
    shutil.copy(ca.cert_path, tmp_path / "certs" / "ca.pem")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_relative_sslrootcert_is_a_warning_naming_the_directory(
    good_server: TLSPostgres, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = good_server.database_settings(options={"sslrootcert": "certs/ca.pem"})
    (warning,) = _checks(good_server, entry)
    assert warning.id == "secure_pg_backend.W005"
    assert warning.msg.startswith(
        "host '127.0.0.1': OPTIONS['sslrootcert'] is 'certs/ca.pem', a "
        f"relative path: libpq opens it against the current directory, now {str(project)!r} "
        f"(so {str(project / 'certs/ca.pem')!r})"
    )
    assert (
        warning.hint
        == "use an absolute path, for example os.path.join(BASE_DIR, 'certs', 'ca.pem')."
    )

    # From elsewhere the file is missing: one error, which says the path was relative.
    monkeypatch.chdir("/")
    (error,) = _checks(good_server, entry)
    assert error.id == "secure_pg_backend.E006"
    assert "OPTIONS['sslrootcert'] is 'certs/ca.pem', which does not exist." in error.msg
    assert (
        "'certs/ca.pem' is a relative path: it resolves against the current directory, "
        in error.msg
    )
    assert "now '/' (so '/certs/ca.pem')" in error.msg


def test_every_relative_file_setting_is_named(good_server: TLSPostgres, project: Path) -> None:
    entry = good_server.database_settings(
        options={
            "sslrootcert": str(project / "certs/ca.pem"),
            "passfile": "pgpass",
            "sslcrl": "x.crl",
        }
    )
    found = sorted(m.msg.split(": ")[1].split(" is ")[0] for m in _checks(good_server, entry))
    assert found == ["OPTIONS['passfile']", "OPTIONS['sslcrl']"]


def test_a_relative_path_refusal_says_where_it_resolved(
    make_wrapper: Callable[..., Any],
    good_server: TLSPostgres,
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = good_server.database_settings(options={"sslrootcert": "certs/ca.pem"})
    make_wrapper(entry).ensure_connection()  # from the project directory: fine
    monkeypatch.chdir("/")
    with pytest.raises(ConnectionFileError) as caught:
        make_wrapper(entry).ensure_connection()
    assert "is a relative path: it resolves against the current directory, now '/'" in str(
        caught.value
    )


def test_a_relative_bundle_of_the_wrong_ca_is_named_with_its_directory(
    make_wrapper: Callable[..., Any], mitm_server: TLSPostgres, project: Path
) -> None:
    entry = mitm_server.database_settings(options={"sslrootcert": "certs/ca.pem"})
    with pytest.raises(InsecureConnectionError) as caught:
        make_wrapper(entry).ensure_connection()
    assert (
        f"Your root certificate file: OPTIONS['sslrootcert'] ('certs/ca.pem', a relative path, "
        f"resolved against {str(project)!r})."
    ) in str(caught.value)


def test_pgbouncer_without_client_tls_is_told_to_set_client_tls_sslmode(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres, ca: TestCA
) -> None:
    leaf = ca.issue("localhost", "127.0.0.1")
    settings = {"client_tls_sslmode": "disable"}
    with (
        PgBouncer(good_server, leaf, trust=ca, settings=settings) as bouncer,
        pytest.raises(InsecureConnectionError) as caught,
    ):
        make_wrapper(bouncer.database_settings()).ensure_connection()
    first = str(caught.value).splitlines()[0]
    assert caught.value.cause == "no_tls"
    assert "the server does not offer TLS." in first
    assert "PostgreSQL needs ssl = on with ssl_cert_file and ssl_key_file" in first
    assert (
        "PgBouncer needs client_tls_sslmode = require with client_tls_cert_file and "
        "client_tls_key_file (pgbouncer.ini; its default is disable)"
    ) in first
    assert_no_secret(str(caught.value))


def test_pgbouncer_on_its_default_port_is_named_first(
    make_wrapper: Callable[..., Any], good_server: TLSPostgres, ca: TestCA
) -> None:
    """On port 6432 the refusal adds that the fix is in pgbouncer.ini."""
    leaf = ca.issue("localhost", "127.0.0.1")
    settings = {"client_tls_sslmode": "disable"}
    try:
        bouncer = PgBouncer(good_server, leaf, trust=ca, settings=settings, port=6432).start()
    except RuntimeError:  # something else listens on 6432 here: nothing to show
        pytest.skip("port 6432 is taken on this machine")
    try:
        with pytest.raises(InsecureConnectionError) as caught:
            make_wrapper(bouncer.database_settings()).ensure_connection()
    finally:
        bouncer.stop()
    assert (
        "Port 6432 is PgBouncer's default: if that is what listens there, the fix is in "
        "pgbouncer.ini"
    ) in str(caught.value)


POOLERS = [
    ("aws-0-eu-central-1.pooler.supabase.com", "6543", "Supabase's shared pooler"),
    ("ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech", "5432", "Neon's pooled endpoint"),
    ("example.postgres.database.azure.com", "6432", "Azure Database for PostgreSQL's built-in"),
]


@pytest.mark.parametrize(("host", "port", "name"), POOLERS)
def test_a_transaction_pooler_without_disable_server_side_cursors_is_a_warning(
    good_server: TLSPostgres, host: str, port: str, name: str
) -> None:
    entry = {**good_server.database_settings(), "HOST": host, "PORT": port}
    (warning,) = _checks(good_server, entry)
    assert warning.id == "secure_pg_backend.W006"
    assert f"{host}:{port} is {name}" in warning.msg
    assert "DISABLE_SERVER_SIDE_CURSORS is not set" in warning.msg
    assert warning.hint is not None and "DISABLE_SERVER_SIDE_CURSORS'] = True" in warning.hint
    assert _checks(good_server, {**entry, "DISABLE_SERVER_SIDE_CURSORS": True}) == []


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("aws-0-eu-central-1.pooler.supabase.com", "5432"),  # session mode
        ("ep-cool-darkness-123456.us-east-2.aws.neon.tech", "5432"),  # direct
        ("example.postgres.database.azure.com", "5432"),  # the server itself
        ("db.example.com", "6543"),  # a port alone says nothing
    ],
)
def test_session_poolers_and_servers_are_not_warned_about(
    good_server: TLSPostgres, host: str, port: str
) -> None:
    assert (
        _checks(good_server, {**good_server.database_settings(), "HOST": host, "PORT": port}) == []
    )


def test_a_provider_ca_is_recognised_by_its_issuer() -> None:
    rds = hosting.by_issuer("CN=Amazon RDS us-east-1 Root CA RSA2048 G1,OU=Amazon RDS,O=Amazon")
    assert rds is not None and rds.bundle.endswith("/global/global-bundle.pem")
    assert hosting.by_issuer("CN=Testing CA") is None

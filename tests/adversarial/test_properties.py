"""Threat: a settings or environment combination nobody thought of that weakens the link.

Hypothesis generates DATABASES entries (OPTIONS with any mix of libpq keywords and values, every
HOST form) and libpq environment variables, and checks one invariant: the settings are refused
with ImproperlyConfigured (never leaking the password), or what reaches libpq is verify-full,
gssencmode=disable, TLS >= 1.2, a readable root certificate, no key log, and no Unix socket
without the opt-in. ``effective_hosts`` models where libpq would really connect (explicit host,
then the service entry, then hostaddr, then PGHOST, then its default socket).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import ConnectionHandler, OperationalError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_pg_backend import ConnectionFileError, libpq, pipeline, policy
from secure_pg_backend.testing import TestCA, TLSPostgres
from tests.conftest import examples

# -- fixed files the strategies point at (made once; hypothesis needs no fixtures) --
_FILES = Path(tempfile.mkdtemp(prefix="spb-props-"))
atexit.register(shutil.rmtree, _FILES, True)
CA_FILE = _FILES / "ca.pem"
CA_FILE.write_text(
    "-----BEGIN CERTIFICATE-----\nnot parsed by the policy\n-----END CERTIFICATE-----\n"
)
MISSING_FILE = _FILES / "missing.pem"
SERVICE_FILE = _FILES / "pg_service.conf"
SERVICES: dict[str, dict[str, str]] = {
    "tcp": {"host": "db.test", "sslmode": "disable", "gssencmode": "prefer"},
    "socket": {"host": "/var/run/postgresql", "dbname": "app"},
    "hostaddr-only": {"hostaddr": "127.0.0.1"},
    "weak-root": {"host": "db.test", "sslrootcert": str(MISSING_FILE)},
    "good-root": {"host": "db.test", "sslrootcert": str(CA_FILE)},
    "keylog": {"host": "db.test", "sslkeylogfile": str(_FILES / "keys.txt")},
    "requiressl": {"host": "db.test", "requiressl": "0"},
    "empty": {},
}
SERVICE_FILE.write_text(
    "".join(
        f"[{name}]\n" + "".join(f"{k}={v}\n" for k, v in entry.items())
        for name, entry in SERVICES.items()
    )
)
PASSWORD = "pw-Hyp0thesis-Secret-7a91"

MAYBE = st.none()  # "key absent" marker in st.one_of(...) below
hosts_one = st.sampled_from(
    [
        "db.test",
        "localhost",
        "127.0.0.1",
        "::1",
        "[::1]",
        "db-1.example.com",
        "/var/run/postgresql",
        "/tmp",
        "@abstract",
        "C:\\pg",
        "",
        " ",
        " /tmp",
    ]
)
tcp_hosts = st.sampled_from(["db.test", "localhost", "127.0.0.1", "db.test,127.0.0.1"])
host_values = st.one_of(
    tcp_hosts,  # a branch of its own, so a good share of examples get past the host rule
    hosts_one,
    st.lists(hosts_one, min_size=2, max_size=3).map(",".join),
    st.none(),
    st.text(max_size=12),
)
root_values = st.sampled_from(
    [str(CA_FILE), str(MISSING_FILE), str(_FILES), "system", "", " ", 123, None, CA_FILE]
)
protocols = st.sampled_from(["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "tlsv1.2", "", None, 12])
flags = st.sampled_from([True, False, "yes", "True", 1, 0, None, "false"])
OPTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "sslmode": st.sampled_from(
        [
            *("verify-full", "verify-ca", "require", "prefer", "allow", "disable"),
            *("VERIFY-FULL", " verify-full", "verify-full ", None, 1, True, PASSWORD),
        ]
    ),
    "gssencmode": st.sampled_from(["disable", "prefer", "require", "Disable", None, 0]),
    "ssl_min_protocol_version": protocols,
    "ssl_max_protocol_version": protocols,
    "sslnegotiation": st.sampled_from(["postgres", "direct", "bogus"]),
    "requiressl": st.sampled_from(["1", "0", 1, True]),
    "sslkeylogfile": st.just(str(_FILES / "keys.txt")),
    "service": st.sampled_from([*SERVICES, "no-such-service"]),
    "sslrootcert": root_values,
    "hostaddr": st.sampled_from(["127.0.0.1", "::1", ""]),
    "host": host_values,
    "target_session_attrs": st.sampled_from(["any", "read-write"]),
    "connect_timeout": st.sampled_from([3, "3"]),
    "allow_unix_socket": flags,
    "allow_legacy_ciphers": flags,
    "x-unknown": st.text(max_size=8),
}
SAFE_VALUES: dict[str, Any] = {
    "sslmode": "verify-full",
    "gssencmode": "disable",
    "ssl_min_protocol_version": "TLSv1.2",
    "ssl_max_protocol_version": "TLSv1.3",
    "sslrootcert": str(CA_FILE),
    "allow_unix_socket": False,
    "allow_legacy_ciphers": False,
}


def _option(key: str) -> st.SearchStrategy[Any]:
    """Half the time an accepted value, so that many examples get past the policy."""
    if key in SAFE_VALUES:
        return st.one_of(st.just(SAFE_VALUES[key]), OPTION_VALUES[key])
    return OPTION_VALUES[key]


options_strategy = st.tuples(
    st.sets(st.sampled_from(sorted(OPTION_VALUES)), max_size=5),
    st.sampled_from([True, True, True, False]),
).flatmap(
    # Usually with a root of trust (else almost every example is refused for that alone).
    lambda drawn: st.fixed_dictionaries(
        {key: _option(key) for key in drawn[0] | ({"sslrootcert"} if drawn[1] else set())}
    )
)
_environ_vars = st.fixed_dictionaries(
    {},
    optional={
        "PGSSLMODE": st.sampled_from(["disable", "require", "prefer"]),
        "PGGSSENCMODE": st.sampled_from(["prefer", "require"]),
        "PGSSLMINPROTOCOLVERSION": st.just("TLSv1"),
        "PGSSLROOTCERT": st.sampled_from([str(CA_FILE), str(MISSING_FILE), "system"]),
        "PGHOST": st.sampled_from(["/var/run/postgresql", "evil.test", ""]),
        "PGHOSTADDR": st.just("127.0.0.1"),
        "PGSERVICE": st.sampled_from([*SERVICES, "no-such-service"]),
        "SSL_CERT_FILE": st.sampled_from([str(CA_FILE), str(MISSING_FILE)]),
    },
)
# The service file matters only when libpq can find it: present in most examples.
environ_strategy = st.tuples(_environ_vars, st.sampled_from([True, True, True, False])).map(
    lambda drawn: {**drawn[0], "PGSERVICEFILE": str(SERVICE_FILE)} if drawn[1] else drawn[0]
)


entries = st.fixed_dictionaries(
    {
        "ENGINE": st.just("secure_pg_backend"),
        "HOST": host_values,
        "NAME": st.sampled_from(["app", "sslmode=disable host=/tmp"]),
        "USER": st.just("app"),
        "PASSWORD": st.just(PASSWORD),
        "PORT": st.sampled_from(["", "5432", "5432,5433"]),
        "OPTIONS": options_strategy,
    }
)
FAST = settings(
    max_examples=examples(1000),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- checking a result with libpq itself ----------------------------------------------
def assert_safe(params: Mapping[str, Any], decision: policy.Decision) -> None:
    """Read the final parameters back through libpq (same process environment) and check
    what it would use: the forced values, a root file, and no socket without the opt-in."""
    keywords = libpq.keywords()
    final = {k: str(v) for k, v in params.items() if k in keywords}
    resolved = {**libpq.resolve(final).values, "sslmode": final["sslmode"]}  # probe's own
    for key, value in decision.forced.items():
        assert (final[key], resolved.get(key, "")) == (value, value), key
    assert Path(final["sslrootcert"]).is_file()
    assert not resolved.get("sslkeylogfile")
    assert not set(params) & {"requiressl", *policy.BACKEND_OPTIONS}
    if not decision.allow_unix_socket:
        hosts = (resolved.get("host") or "").split(",")
        assert all(h and not policy.is_socket_host(h) for h in hosts), hosts


def _judge(entry: dict[str, Any], environ: dict[str, str]) -> Any:
    wrapper = ConnectionHandler({"default": {**entry, "OPTIONS": {**entry["OPTIONS"]}}})["default"]
    kept = {k: v for k, v in os.environ.items() if k not in libpq.environment_variables()}
    kept.pop("SSL_CERT_FILE", None)
    return wrapper, mock.patch.dict(os.environ, {**kept, **environ}, clear=True)


# -- properties ---------------------------------------------------------------------
@FAST
@given(entry=entries, environ=environ_strategy)
def test_policy_refuses_or_forces_verified_tls(
    entry: dict[str, Any], environ: dict[str, str]
) -> None:
    wrapper, environment = _judge(entry, environ)
    with environment:
        try:
            params = wrapper.get_connection_params()
        except ImproperlyConfigured as exc:
            text = str(exc)
            assert PASSWORD not in text and PASSWORD not in repr(exc)
            assert "Fix:" in text or "NAME or OPTIONS" in text
            return
        assert wrapper._decision is not None
        assert params["password"] == PASSWORD  # for libpq only: never in a message
        try:  # what every physical connection checks before libpq opens anything
            pipeline.check_files(wrapper._plan())
        except ConnectionFileError as exc:
            assert PASSWORD not in str(exc) and "Fix:" in str(exc)
            return
        assert_safe(params, wrapper._decision)


# -- the few combinations worth naming (examples of the properties, on real servers) --
@pytest.fixture(autouse=True)
def _network_allowed(django_db_blocker: Any) -> Iterator[None]:
    with django_db_blocker.unblock():
        yield


def test_service_entry_cannot_turn_on_the_key_log(good_server: TLSPostgres, tmp_path: Path) -> None:
    """Found by the property: PGSERVICE's entry could set sslkeylogfile (libpq 18)."""
    keys = tmp_path / "keys.txt"
    (tmp_path / "svc.conf").write_text(f"[leak]\nsslkeylogfile={keys}\n")
    env = {"PGSERVICEFILE": str(tmp_path / "svc.conf"), "PGSERVICE": "leak"}
    wrapper = ConnectionHandler({"default": good_server.database_settings()})["default"]
    with mock.patch.dict(os.environ, env), pytest.raises(ImproperlyConfigured) as caught:
        wrapper.ensure_connection()
    if "sslkeylogfile" in libpq.keywords():
        assert "sslkeylogfile" in str(caught.value) and "'leak'" in str(caught.value)
    else:  # libpq < 18 refuses the unknown key in the service file itself
        assert "syntax error in service file" in str(caught.value)
    assert not keys.exists()
    # Without the entry the same settings connect: the refusal was about the key log only.
    with mock.patch.dict(os.environ, {"PGSERVICEFILE": env["PGSERVICEFILE"]}):
        assert wrapper.tls_info.protocol == "TLSv1.3"
    wrapper.close()
    assert not keys.exists()


def test_explicit_empty_host_is_not_filled_from_the_service(
    good_server: TLSPostgres, tmp_path: Path
) -> None:
    """Found by the property: OPTIONS host="" made libpq use its default socket, not the
    service entry's TCP host that the policy had checked."""
    service_file = tmp_path / "svc.conf"
    service_file.write_text(f"[tcp]\nhost=127.0.0.1\nport={good_server.port}\n")
    entry = good_server.database_settings(HOST="", PORT="", options={"service": "tcp"})
    with mock.patch.dict(os.environ, {"PGSERVICEFILE": str(service_file)}):
        wrapper = ConnectionHandler({"default": entry})["default"]
        assert wrapper.tls_info.port == good_server.port  # the service's TCP host: fine
        wrapper.close()
        entry["OPTIONS"]["host"] = ""
        wrapper = ConnectionHandler({"default": entry})["default"]
        with pytest.raises(ImproperlyConfigured, match="Unix-domain socket"):
            wrapper.ensure_connection()
        assert wrapper.connection is None


def test_environment_cannot_lower_the_link(good_server: TLSPostgres, ca: TestCA) -> None:
    """Every libpq variable that would weaken the link, set at once, on a real server."""
    env = {
        "PGSSLMODE": "disable",
        "PGGSSENCMODE": "prefer",
        "PGSSLMINPROTOCOLVERSION": "TLSv1",
        "PGSSLROOTCERT": str(MISSING_FILE),
        "PGHOST": "/var/run/postgresql",
        "PGREQUIRESSL": "0",
    }
    wrapper = ConnectionHandler({"default": good_server.database_settings()})["default"]
    try:
        with mock.patch.dict(os.environ, env):
            info = wrapper.tls_info
            with wrapper.cursor() as cur:
                cur.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
                assert cur.fetchone() == (True,)
    finally:
        wrapper.close()
    assert (info.transport, info.sslmode, info.root_cert) == (
        "tls",
        "verify-full",
        ca.cert_path.as_posix(),
    )


def test_conninfo_in_name_is_just_a_name(good_server: TLSPostgres) -> None:
    """NAME is passed as one quoted value: it cannot smuggle sslmode or host into libpq."""
    entry = good_server.database_settings(NAME="sslmode=disable host=/tmp dbname=app")
    wrapper = ConnectionHandler({"default": entry})["default"]
    with pytest.raises(OperationalError, match='database "sslmode=disable host=/tmp dbname=app"'):
        wrapper.ensure_connection()

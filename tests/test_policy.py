"""Pure policy: settings in, forced libpq parameters or a refusal out (no server needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from secure_pg_backend import SecurePolicyError, policy
from secure_pg_backend.policy import Decision, LinkFacts

PASSWORD = "pw-Unit-4f1d9e"


@pytest.fixture
def root_cert(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home directory, so ~/.postgresql/root.crt and ~/.pg_service.conf are absent."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def entry(
    root_cert: str | None = None, host: str = "db.example.com", **options: Any
) -> dict[str, Any]:
    opts = dict(options)
    if root_cert is not None:
        opts.setdefault("sslrootcert", root_cert)
    return {
        "NAME": "app",
        "USER": "app",
        "PASSWORD": PASSWORD,
        "HOST": host,
        "PORT": "5432",
        "OPTIONS": opts,
    }


def codes(settings: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    return [v.code for v in policy.evaluate("default", settings, environ or {}).violations]


# -- sslmode ---------------------------------------------------------------------------------------
def test_absent_sslmode_means_verify_full(root_cert: str) -> None:
    decision = policy.enforce("default", entry(root_cert), {})
    assert decision.forced["sslmode"] == "verify-full"


def test_verify_full_is_accepted(root_cert: str) -> None:
    assert codes(entry(root_cert, sslmode="verify-full")) == []


@pytest.mark.parametrize(
    "value",
    [
        "disable",
        "allow",
        "prefer",
        "require",
        "verify-ca",
        "VERIFY-FULL",
        "verify-full ",
        " verify-full",
        "verify_full",
        "",
        "full",
        None,
        True,
        1,
    ],
)
def test_every_other_sslmode_is_refused(root_cert: str, value: object) -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        policy.enforce("reporting", entry(root_cert, sslmode=value), {})
    message = str(excinfo.value)
    assert "DATABASES['reporting']" in message
    assert "db.example.com" in message
    assert repr(value) in message
    assert "verify-full" in message  # the fix
    assert excinfo.value.violations[0].code == "E001"  # type: ignore[attr-defined]


def test_require_message_explains_the_threat(root_cert: str) -> None:
    with pytest.raises(SecurePolicyError, match="never checks the server's certificate"):
        policy.enforce("default", entry(root_cert, sslmode="require"), {})


# -- gssencmode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["prefer", "require", "allow", "", None])
def test_gssencmode_other_than_disable_is_refused(root_cert: str, value: object) -> None:
    with pytest.raises(SecurePolicyError, match="GSSAPI") as excinfo:
        policy.enforce("default", entry(root_cert, gssencmode=value), {})
    assert excinfo.value.violations[0].code == "E002"


def test_gssencmode_disable_is_accepted_and_always_sent(root_cert: str) -> None:
    assert (
        policy.enforce("default", entry(root_cert, gssencmode="disable"), {}).forced["gssencmode"]
        == "disable"
    )
    assert policy.enforce("default", entry(root_cert), {}).forced["gssencmode"] == "disable"


# -- protocol versions -----------------------------------------------------------------------------
def test_minimum_protocol_defaults_to_tls12(root_cert: str) -> None:
    assert policy.enforce("default", entry(root_cert), {}).min_protocol == "TLSv1.2"


def test_tls13_minimum_is_accepted(root_cert: str) -> None:
    decision = policy.enforce("default", entry(root_cert, ssl_min_protocol_version="TLSv1.3"), {})
    assert decision.forced["ssl_min_protocol_version"] == "TLSv1.3"


@pytest.mark.parametrize("value", ["TLSv1", "TLSv1.1", "tlsv1.2", "SSLv3", "", None, 1.2])
def test_weak_or_invalid_minimum_is_refused(root_cert: str, value: object) -> None:
    assert codes(entry(root_cert, ssl_min_protocol_version=value)) == ["E003"]


@pytest.mark.parametrize("value", ["TLSv1.1", "TLSv1", "bogus"])
def test_maximum_below_tls12_is_refused(root_cert: str, value: str) -> None:
    assert codes(entry(root_cert, ssl_max_protocol_version=value)) == ["E003"]


def test_maximum_below_chosen_minimum_is_refused(root_cert: str) -> None:
    settings = entry(
        root_cert, ssl_min_protocol_version="TLSv1.3", ssl_max_protocol_version="TLSv1.2"
    )
    assert codes(settings) == ["E003"]


# -- legacy and weakening keywords -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"), [("requiressl", "0"), ("requiressl", 1), ("sslkeylogfile", "/tmp/k")]
)
def test_weakening_keywords_are_refused(root_cert: str, key: str, value: object) -> None:
    with pytest.raises(SecurePolicyError, match=key) as excinfo:
        policy.enforce("default", entry(root_cert, **{key: value}), {})
    assert excinfo.value.violations[0].code == "E007"


# -- Unix sockets ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host", ["", "/var/run/postgresql", "@abstract", "db.example.com,/tmp", "db1,,db2", r"C:\pg"]
)
def test_socket_hosts_are_refused_by_default(root_cert: str, host: str) -> None:
    with pytest.raises(SecurePolicyError, match="allow_unix_socket") as excinfo:
        policy.enforce("default", entry(root_cert, host=host), {})
    assert excinfo.value.violations[0].code == "E004"


def test_empty_host_is_refused_even_when_pghost_is_tcp(root_cert: str) -> None:
    assert codes(entry(root_cert, host=""), {"PGHOST": "db.example.com"}) == ["E004"]


@pytest.mark.parametrize("host", ["db.example.com", "10.1.2.3", "::1", "a.example,b.example"])
def test_tcp_hosts_are_accepted(root_cert: str, host: str) -> None:
    assert policy.enforce("default", entry(root_cert, host=host), {}).hosts == tuple(
        host.split(",")
    )


def test_socket_opt_in_permits_sockets_but_keeps_tls_forced(root_cert: str) -> None:
    decision = policy.enforce(
        "default", entry(root_cert, host="/run/pg", allow_unix_socket=True), {}
    )
    assert decision.allow_unix_socket
    params = policy.apply(
        decision, {"host": "/run/pg", "allow_unix_socket": True, "sslmode": "verify-full"}
    )
    assert "allow_unix_socket" not in params
    assert params["sslmode"] == "verify-full"


def test_socket_opt_in_does_not_relax_tcp_tls(root_cert: str) -> None:
    settings = entry(root_cert, host="db.example.com", allow_unix_socket=True, sslmode="require")
    assert codes(settings) == ["E001"]


@pytest.mark.parametrize("value", ["yes", 1, "True", None])
def test_opt_ins_must_be_booleans(root_cert: str, value: object) -> None:
    assert codes(entry(root_cert, allow_unix_socket=value)) == ["E008"]
    assert codes(entry(root_cert, allow_legacy_ciphers=value)) == ["E008"]


def test_options_host_is_used_when_host_is_empty(root_cert: str) -> None:
    # Django passes OPTIONS['host'] to libpq when HOST is empty.
    assert (
        codes(
            entry(root_cert, host="")
            | {"OPTIONS": {"sslrootcert": root_cert, "host": "db.example.com"}}
        )
        == []
    )
    assert codes(
        entry(root_cert, host="") | {"OPTIONS": {"sslrootcert": root_cert, "host": "/tmp"}}
    ) == ["E004"]


# -- service files ---------------------------------------------------------------------------------
def write_service(tmp_path: Path, body: str) -> str:
    path = tmp_path / "pg_service.conf"
    path.write_text(body)
    return str(path)


def test_service_host_is_resolved_up_front(tmp_path: Path, root_cert: str) -> None:
    env = {
        "PGSERVICEFILE": write_service(
            tmp_path, "[svc]\nhost=/var/run/postgresql\nsslmode=disable\n"
        )
    }
    settings = entry(root_cert, host="", service="svc")
    assert codes(settings, env) == ["E004"]


def test_service_tcp_host_is_accepted_and_weak_sslmode_there_is_overridden(
    tmp_path: Path, root_cert: str
) -> None:
    env = {
        "PGSERVICEFILE": write_service(tmp_path, "[svc]\nhost=db.example.com\nsslmode=disable\n")
    }
    decision = policy.enforce("default", entry(root_cert, host="", service="svc"), env)
    assert decision.hosts == ("db.example.com",)
    assert decision.forced["sslmode"] == "verify-full"


def test_service_root_certificate_counts_as_root_of_trust(
    tmp_path: Path, root_cert: str, home: Path
) -> None:
    env = {
        "PGSERVICEFILE": write_service(
            tmp_path, f"[svc]\nhost=db.example.com\nsslrootcert={root_cert}\n"
        )
    }
    decision = policy.enforce("default", entry(None, host="", service="svc"), env)
    assert decision.root_cert == root_cert
    assert "pg_service.conf" in decision.root_cert_source


# -- root of trust ---------------------------------------------------------------------------------
def test_no_root_of_trust_is_refused_with_remedies(home: Path) -> None:
    with pytest.raises(SecurePolicyError) as excinfo:
        policy.enforce("default", entry(None), {})
    message = str(excinfo.value)
    assert "sslrootcert" in message and "'system'" in message and "PGSSLROOTCERT" in message
    assert excinfo.value.violations[0].code == "E005"


def test_pgsslrootcert_is_a_root_of_trust(home: Path, root_cert: str) -> None:
    decision = policy.enforce("default", entry(None), {"PGSSLROOTCERT": root_cert})
    assert (decision.root_cert, decision.root_cert_source) == (root_cert, "PGSSLROOTCERT")


def test_home_root_crt_is_a_root_of_trust(home: Path) -> None:
    (home / ".postgresql").mkdir()
    (home / ".postgresql" / "root.crt").write_text("x")
    decision = policy.enforce("default", entry(None), {})
    assert decision.root_cert == str(home / ".postgresql" / "root.crt")
    assert decision.forced["sslrootcert"] == decision.root_cert


def test_options_root_cert_wins_over_environment(root_cert: str, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_text("x")
    decision = policy.enforce("default", entry(root_cert), {"PGSSLROOTCERT": str(other)})
    assert decision.root_cert == root_cert


def test_missing_root_cert_file_is_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(SecurePolicyError, match=r"sslrootcert.*does not exist") as excinfo:
        policy.enforce("default", entry(missing), {})
    assert excinfo.value.violations[0].code == "E006"


def test_directory_as_root_cert_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurePolicyError, match=r"sslrootcert.*directory"):
        policy.enforce("default", entry(str(tmp_path)), {})


def test_unreadable_root_cert_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root reads any mode; a path through a regular file is unreadable for everyone
        blocker = tmp_path / "file"
        blocker.write_text("x")
        path = str(blocker / "ca.pem")
    else:
        locked = tmp_path / "locked.pem"
        locked.write_text("x")
        locked.chmod(0)
        path = str(locked)
    with pytest.raises(SecurePolicyError, match="sslrootcert") as excinfo:
        policy.enforce("default", entry(path), {})
    assert excinfo.value.violations[0].code == "E006"


@pytest.mark.parametrize("value", ["", "  ", 42, None])
def test_root_cert_must_be_a_path(value: object) -> None:
    assert codes(entry(None, sslrootcert=value)) == ["E006"]


def test_system_resolves_to_a_real_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("x")
    decision = policy.enforce("default", entry("system"), {"SSL_CERT_FILE": str(bundle)})
    assert decision.root_cert == str(bundle)
    assert decision.root_cert_source == "system (SSL_CERT_FILE)"


def test_system_without_override_uses_a_platform_file() -> None:
    decision = policy.enforce("default", entry("system"), {})
    assert os.path.isfile(decision.root_cert)
    assert decision.root_cert_source.startswith("system (")


def test_system_with_broken_ssl_cert_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurePolicyError, match="SSL_CERT_FILE"):
        policy.enforce("default", entry("system"), {"SSL_CERT_FILE": str(tmp_path / "missing.pem")})


# -- all violations at once, and secrets -----------------------------------------------------------
def test_every_violation_is_reported_together(home: Path) -> None:
    settings = entry(None, host="/tmp", sslmode="prefer", gssencmode="prefer", requiressl="1")
    assert sorted(codes(settings)) == ["E001", "E002", "E004", "E005", "E007"]


def test_password_is_redacted_from_messages(root_cert: str) -> None:
    # A value that quotes the password (a mistake users make) must not echo it back.
    with pytest.raises(SecurePolicyError) as excinfo:
        policy.enforce("default", entry(root_cert, sslmode=f"require {PASSWORD}"), {})
    assert PASSWORD not in str(excinfo.value)
    assert "********" in str(excinfo.value)


# -- apply: what libpq receives --------------------------------------------------------------------
def test_apply_forces_policy_and_passes_everything_else_through(root_cert: str) -> None:
    decision = policy.enforce("default", entry(root_cert), {})
    params = policy.apply(
        decision,
        {
            "dbname": "app",
            "sslcert": "/c.pem",
            "sslkey": "/k.pem",
            "channel_binding": "require",
            "sslnegotiation": "direct",
            "target_session_attrs": "read-write",
            "allow_legacy_ciphers": False,
        },
    )
    assert params["sslmode"] == "verify-full"
    assert params["gssencmode"] == "disable"
    assert params["ssl_min_protocol_version"] == "TLSv1.2"
    assert params["sslrootcert"] == root_cert
    assert params["channel_binding"] == "require" and params["sslnegotiation"] == "direct"
    assert "allow_legacy_ciphers" not in params


def test_libpq_environment_for_psql(root_cert: str) -> None:
    env = policy.libpq_environment(policy.enforce("default", entry(root_cert), {}))
    assert env == {
        "PGSSLMODE": "verify-full",
        "PGGSSENCMODE": "disable",
        "PGSSLMINPROTOCOLVERSION": "TLSv1.2",
        "PGSSLROOTCERT": root_cert,
    }


# -- the post-handshake rule -----------------------------------------------------------------------
DECISION = Decision(alias="default", hosts=("db",), root_cert="/ca.pem", root_cert_source="x")


def facts(**kw: Any) -> LinkFacts:
    base: dict[str, Any] = {
        "host": "db",
        "ssl_in_use": True,
        "protocol": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
    }
    base.update(kw)
    return LinkFacts(**base)


def test_link_tls13_passes() -> None:
    assert policy.check_link(DECISION, facts()) is None


def test_link_without_tls_fails() -> None:
    problem = policy.check_link(DECISION, facts(ssl_in_use=False, protocol=None, cipher=None))
    assert problem is not None and "not using TLS" in problem[0]


def test_link_over_socket_needs_opt_in() -> None:
    socket_facts = facts(host="/run/pg", ssl_in_use=False, protocol=None, cipher=None)
    assert policy.check_link(DECISION, socket_facts) is not None
    opted_in = Decision(**{**DECISION.__dict__, "allow_unix_socket": True})
    assert policy.check_link(opted_in, socket_facts) is None


def test_link_gssapi_fails() -> None:
    problem = policy.check_link(DECISION, facts(used_gssapi=True))
    assert problem is not None and "GSSAPI" in problem[0]


def test_link_below_minimum_fails() -> None:
    strict = Decision(**{**DECISION.__dict__, "min_protocol": "TLSv1.3"})
    problem = policy.check_link(
        strict, facts(protocol="TLSv1.2", cipher="ECDHE-RSA-AES128-GCM-SHA256")
    )
    assert problem is not None and "below the minimum TLSv1.3" in problem[0]


# -- reusing a decision -----------------------------------------------------------------------
def test_fingerprint_changes_with_every_input(root_cert: str) -> None:
    settings = entry(root_cert)
    key = policy.fingerprint(settings, {})
    assert key == policy.fingerprint(entry(root_cert), {})
    assert key != policy.fingerprint(entry(root_cert, sslmode="require"), {})
    assert key != policy.fingerprint(entry(root_cert, host="other.example.com"), {})
    for name in policy.ENVIRONMENT_INPUTS:
        assert key != policy.fingerprint(settings, {name: "x"}), name


def test_no_fingerprint_when_a_service_file_is_involved(root_cert: str) -> None:
    # The service file's contents are an input too, so such decisions are never reused.
    assert policy.fingerprint(entry(root_cert, service="svc"), {}) is None
    assert policy.fingerprint(entry(root_cert), {"PGSERVICE": "svc"}) is None

"""The policy: settings in, forced libpq parameters or a refusal out.

The settings-level tests go through the real gate (Django's parameter building and
libpq's own resolution, no server and no network); the rule-level tests call the pure
rule functions with hand-made ``Request``/``LinkFacts``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.core.exceptions import ImproperlyConfigured

from secure_pg_backend import SecurePolicyError, files, handshake, libpq, policy
from secure_pg_backend.base import standalone_wrapper
from secure_pg_backend.handshake import LinkFacts
from secure_pg_backend.policy import Decision
from secure_pg_backend.policy import rules as policy_rules

PASSWORD = "pw-Unit-4f1d9e"


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path) -> Iterator[None]:
    """No libpq variable from the machine, and an empty home (no ~/.pg_service.conf)."""
    home = tmp_path / "clean-home"
    home.mkdir()
    kept = {k: v for k, v in os.environ.items() if k not in libpq.environment_variables()}
    kept.pop("SSL_CERT_FILE", None)
    with mock.patch.dict(os.environ, {**kept, "HOME": str(home)}, clear=True):
        yield


@pytest.fixture
def root_cert(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


@pytest.fixture
def home() -> Path:
    """The (empty) home directory of the clean environment."""
    return Path(os.environ["HOME"])


def entry(
    root_cert: str | None = None, host: str = "db.example.com", **options: Any
) -> dict[str, Any]:
    opts = dict(options)
    if root_cert is not None:
        opts.setdefault("sslrootcert", root_cert)
    return {
        "ENGINE": "secure_pg_backend",
        "NAME": "app",
        "USER": "app",
        "PASSWORD": PASSWORD,
        "HOST": host,
        "PORT": "5432",
        "OPTIONS": opts,
    }


def judge(
    settings: dict[str, Any], environ: dict[str, str] | None = None, alias: str = "default"
) -> policy.Verdict:
    """The verdict with the files' current state, as the system checks report it."""
    with mock.patch.dict(os.environ, environ or {}):
        return standalone_wrapper(alias, settings).policy_verdict().now()  # type: ignore[no-any-return]


def enforce(
    settings: dict[str, Any], environ: dict[str, str] | None = None, alias: str = "default"
) -> Decision:
    verdict = judge(settings, environ, alias)
    verdict.raise_if_refused(settings.get("PASSWORD"))
    assert verdict.decision is not None
    return verdict.decision


def codes(settings: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    return [v.code for v in judge(settings, environ).violations]


# -- sslmode ---------------------------------------------------------------------------------------
def test_absent_sslmode_means_verify_full(root_cert: str) -> None:
    decision = enforce(entry(root_cert), {})
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
        enforce(entry(root_cert, sslmode=value), {}, alias="reporting")
    message = str(excinfo.value)
    assert "DATABASES['reporting']" in message
    assert "db.example.com" in message
    assert repr(value) in message
    assert "verify-full" in message  # the fix
    assert excinfo.value.violations[0].code == "E001"  # type: ignore[attr-defined]


def test_require_message_explains_the_threat(root_cert: str) -> None:
    with pytest.raises(SecurePolicyError, match="never checks the server's certificate"):
        enforce(entry(root_cert, sslmode="require"), {})


# -- gssencmode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["prefer", "require", "allow", "", None])
def test_gssencmode_other_than_disable_is_refused(root_cert: str, value: object) -> None:
    with pytest.raises(SecurePolicyError, match="GSSAPI") as excinfo:
        enforce(entry(root_cert, gssencmode=value), {})
    assert excinfo.value.violations[0].code == "E002"


def test_gssencmode_disable_is_accepted_and_always_sent(root_cert: str) -> None:
    assert enforce(entry(root_cert, gssencmode="disable"), {}).forced["gssencmode"] == "disable"
    assert enforce(entry(root_cert), {}).forced["gssencmode"] == "disable"


# -- protocol versions -----------------------------------------------------------------------------
def test_minimum_protocol_defaults_to_tls12(root_cert: str) -> None:
    assert enforce(entry(root_cert), {}).min_protocol == "TLSv1.2"


def test_tls13_minimum_is_accepted(root_cert: str) -> None:
    decision = enforce(entry(root_cert, ssl_min_protocol_version="TLSv1.3"), {})
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
        enforce(entry(root_cert, **{key: value}), {})
    assert excinfo.value.violations[0].code == "E007"


# -- Unix sockets ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host", ["", "/var/run/postgresql", "@abstract", "db.example.com,/tmp", "db1,,db2", r"C:\pg"]
)
def test_socket_hosts_are_refused_by_default(root_cert: str, host: str) -> None:
    with pytest.raises(SecurePolicyError, match="allow_unix_socket") as excinfo:
        enforce(entry(root_cert, host=host), {})
    assert excinfo.value.violations[0].code == "E004"


def test_empty_host_takes_pghost_as_libpq_does_and_makes_it_explicit(root_cert: str) -> None:
    # Facts, not names: libpq would connect to PGHOST over TCP, verified; the gate then
    # passes that host explicitly, so nothing can change it between judging and connecting.
    verdict = judge(entry(root_cert, host=""), {"PGHOST": "db.example.com"})
    assert verdict.violations == ()
    assert verdict.params is not None and verdict.params["host"] == "db.example.com"
    assert codes(entry(root_cert, host=""), {"PGHOST": "/var/run/postgresql"}) == ["E004"]
    assert codes(entry(root_cert, host="")) == ["E004"]


@pytest.mark.parametrize("host", ["db.example.com", "10.1.2.3", "::1", "a.example,b.example"])
def test_tcp_hosts_are_accepted(root_cert: str, host: str) -> None:
    assert enforce(entry(root_cert, host=host), {}).hosts == tuple(host.split(","))


def test_socket_opt_in_permits_sockets_but_keeps_tls_forced(root_cert: str) -> None:
    verdict = judge(entry(root_cert, host="/run/pg", allow_unix_socket=True))
    assert verdict.decision is not None and verdict.decision.allow_unix_socket
    assert verdict.params is not None
    assert "allow_unix_socket" not in verdict.params
    assert verdict.params["sslmode"] == "verify-full"


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
    decision = enforce(entry(root_cert, host="", service="svc"), env)
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
    decision = enforce(entry(None, host="", service="svc"), env)
    assert decision.root_cert == root_cert
    assert "pg_service.conf" in decision.root_cert_source


# -- root of trust ---------------------------------------------------------------------------------
def test_no_root_of_trust_is_refused_with_remedies(home: Path) -> None:
    with pytest.raises(SecurePolicyError) as excinfo:
        enforce(entry(None), {})
    message = str(excinfo.value)
    assert "sslrootcert" in message and "'system'" in message and "PGSSLROOTCERT" in message
    assert excinfo.value.violations[0].code == "E005"


def test_pgsslrootcert_is_a_root_of_trust(home: Path, root_cert: str) -> None:
    decision = enforce(entry(None), {"PGSSLROOTCERT": root_cert})
    assert (decision.root_cert, decision.root_cert_source) == (root_cert, "PGSSLROOTCERT")


def test_home_root_crt_is_a_root_of_trust(home: Path) -> None:
    (home / ".postgresql").mkdir()
    (home / ".postgresql" / "root.crt").write_text("x")
    decision = enforce(entry(None), {})
    assert decision.root_cert == str(home / ".postgresql" / "root.crt")
    assert decision.forced["sslrootcert"] == decision.root_cert


def test_options_root_cert_wins_over_environment(root_cert: str, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_text("x")
    decision = enforce(entry(root_cert), {"PGSSLROOTCERT": str(other)})
    assert decision.root_cert == root_cert


def test_missing_root_cert_file_is_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(SecurePolicyError, match=r"sslrootcert.*does not exist") as excinfo:
        enforce(entry(missing), {})
    assert excinfo.value.violations[0].code == "E006"


def test_directory_as_root_cert_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurePolicyError, match=r"sslrootcert.*directory"):
        enforce(entry(str(tmp_path)), {})


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
        enforce(entry(path), {})
    assert excinfo.value.violations[0].code == "E006"


@pytest.mark.parametrize("value", ["", "  ", 42])
def test_root_cert_must_be_a_path(value: object) -> None:
    assert codes(entry(None, sslrootcert=value)) == ["E006"]


def test_root_cert_none_means_unset(home: Path) -> None:
    assert codes(entry(None, sslrootcert=None)) == ["E005"]


def test_system_resolves_to_a_real_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("x")
    decision = enforce(entry("system"), {"SSL_CERT_FILE": str(bundle)})
    assert decision.root_cert == str(bundle)
    assert decision.root_cert_source == "system (SSL_CERT_FILE)"


def test_system_without_override_uses_a_platform_file() -> None:
    decision = enforce(entry("system"), {})
    assert os.path.isfile(decision.root_cert)
    assert decision.root_cert_source.startswith("system (")


def test_system_with_broken_ssl_cert_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurePolicyError, match="SSL_CERT_FILE"):
        enforce(entry("system"), {"SSL_CERT_FILE": str(tmp_path / "missing.pem")})


# -- all violations at once, and secrets -----------------------------------------------------------
def test_every_violation_is_reported_together(home: Path) -> None:
    settings = entry(None, host="/tmp", sslmode="prefer", gssencmode="prefer", requiressl="1")
    assert sorted(codes(settings)) == ["E001", "E002", "E004", "E005", "E007"]


def test_password_is_redacted_from_messages(root_cert: str) -> None:
    # A value that quotes the password (a mistake users make) must not echo it back.
    with pytest.raises(SecurePolicyError) as excinfo:
        enforce(entry(root_cert, sslmode=f"require {PASSWORD}"), {})
    assert PASSWORD not in str(excinfo.value)
    assert "********" in str(excinfo.value)


# -- the parameters libpq receives -----------------------------------------------------------
def test_final_parameters_force_policy_and_pass_everything_else_through(root_cert: str) -> None:
    settings = entry(
        root_cert,
        sslcert="/c.pem",
        sslkey="/k.pem",
        channel_binding="require",
        target_session_attrs="read-write",
        allow_legacy_ciphers=False,
    )
    direct = "sslnegotiation" in libpq.keywords()  # libpq 17+ (C/Python builds may be older)
    if direct:
        settings["OPTIONS"]["sslnegotiation"] = "direct"
    params = judge(settings).params
    assert params is not None
    assert params["sslmode"] == "verify-full"
    assert params["gssencmode"] == "disable"
    assert params["ssl_min_protocol_version"] == "TLSv1.2"
    assert params["sslrootcert"] == root_cert
    assert params["channel_binding"] == "require"
    assert params.get("sslnegotiation") == ("direct" if direct else None)
    assert params["host"] == "db.example.com" and params["dbname"] == "app"
    assert "allow_legacy_ciphers" not in params
    if "sslkeylogfile" in libpq.keywords():
        assert params["sslkeylogfile"] == ""  # sent empty: no service file can turn it on


def test_assembled_string_is_read_back_by_libpq(root_cert: str) -> None:
    decision = enforce(entry(root_cert))
    parsed = libpq.parse(libpq.conninfo(decision.forced))
    assert policy.e009_assembled(decision, parsed) is None
    tampered = {**parsed, "sslmode": "require"}
    violation = policy.e009_assembled(decision, tampered)
    assert violation is not None and violation.code == "E009" and "'require'" in violation.problem


# -- the post-handshake rule -----------------------------------------------------------------------
def decision(**changes: Any) -> Decision:
    fields: dict[str, Any] = {
        "alias": "default",
        "hosts": ("db",),
        "root_cert": "/ca.pem",
        "root_cert_source": "x",
    }
    return Decision(**{**fields, **changes})


DECISION = decision()


def facts(**kw: Any) -> LinkFacts:
    base: dict[str, Any] = {
        "host": "db",
        "ssl_in_use": True,
        "protocol": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "effective": DECISION.forced,  # libpq used what the policy forced
    }
    base.update(kw)
    return LinkFacts(**base)


def test_link_tls13_passes() -> None:
    assert handshake.check_link(DECISION, facts()) is None


def test_link_without_tls_fails() -> None:
    problem = handshake.check_link(DECISION, facts(ssl_in_use=False, protocol=None, cipher=None))
    assert problem is not None and "not using TLS" in problem[1]


def test_link_over_socket_needs_opt_in() -> None:
    socket_facts = facts(
        host="/run/pg", ssl_in_use=False, protocol=None, cipher=None, unix_socket=True
    )
    assert handshake.check_link(DECISION, socket_facts) is not None
    opted_in = decision(allow_unix_socket=True)
    assert handshake.check_link(opted_in, socket_facts) is None


def test_link_gssapi_fails() -> None:
    problem = handshake.check_link(DECISION, facts(used_gssapi=True))
    assert problem is not None and "GSSAPI" in problem[1]


def test_link_below_minimum_fails() -> None:
    strict = decision(min_protocol="TLSv1.3")
    problem = handshake.check_link(
        strict,
        facts(protocol="TLSv1.2", cipher="ECDHE-RSA-AES128-GCM-SHA256", effective=strict.forced),
    )
    assert problem is not None and "below the minimum TLSv1.3" in problem[1]


def test_link_transport_is_the_socket_family_not_the_host_name() -> None:
    # A TCP host name on a Unix socket (or the reverse) is judged by the family.
    over_socket = facts(
        host="db.example.com", ssl_in_use=False, protocol=None, cipher=None, unix_socket=True
    )
    problem = handshake.check_link(DECISION, over_socket)
    assert problem is not None and "Unix-domain socket" in problem[1]


def test_link_effective_settings_must_equal_the_decision() -> None:
    forced = dict(DECISION.forced)
    assert handshake.check_link(DECISION, facts(effective=forced)) is None
    for key, bad in (
        ("sslmode", "require"),
        ("sslrootcert", "/other.pem"),
        ("gssencmode", "prefer"),
    ):
        problem = handshake.check_link(DECISION, facts(effective={**forced, key: bad}))
        assert problem is not None and key in problem[1] and repr(bad) in problem[1]


def test_link_key_log_must_be_off() -> None:
    keylog_off = decision(keylog_keyword=True)
    forced = dict(keylog_off.forced)
    assert handshake.check_link(keylog_off, facts(effective=forced)) is None
    problem = handshake.check_link(
        keylog_off, facts(effective={**forced, "sslkeylogfile": "/tmp/k"})
    )
    assert problem is not None and "sslkeylogfile" in problem[1]


def test_link_direct_negotiation_needs_alpn_postgresql() -> None:
    direct = {**DECISION.forced, "sslnegotiation": "direct"}
    assert handshake.check_link(DECISION, facts(effective=direct, alpn="postgresql")) is None
    for alpn in (None, "http/1.1"):
        problem = handshake.check_link(DECISION, facts(effective=direct, alpn=alpn))
        assert problem is not None and "ALPN" in problem[1]


# -- rules on what libpq resolved (pure) ----------------------------------------------------------
def request(**resolved: str) -> policy.Request:
    return policy.Request(alias="default", explicit={}, resolved=resolved)


@pytest.mark.parametrize(
    ("resolved", "code"),
    [
        ({"host": "a,b", "hostaddr": "10.0.0.1"}, "E012"),  # lists differ in length
        ({"hostaddr": "10.0.0.1"}, "E012"),  # an address without a name to verify
        ({"host": "", "hostaddr": "10.0.0.1"}, "E012"),
        ({"host": "db,", "hostaddr": "10.0.0.1,10.0.0.2"}, "E012"),
        ({"host": "/tmp", "hostaddr": "10.0.0.1"}, "E012"),
        ({"host": "db1,,db2"}, "E004"),  # the empty element is libpq's default socket
        ({"host": "db1,/tmp"}, "E004"),
        ({}, "E004"),
    ],
)
def test_host_list_rules(resolved: dict[str, str], code: str) -> None:
    req = request(**resolved)
    violations = [
        v for rule in (policy_rules.e012_host_lists, policy_rules.e004_socket) if (v := rule(req))
    ]
    assert [v.code for v in violations][:1] == [code]


def test_matching_host_and_address_lists_pass() -> None:
    req = request(host="db1.example.com,db2.example.com", hostaddr="10.0.0.1,10.0.0.2")
    assert policy_rules.e012_host_lists(req) is None and policy_rules.e004_socket(req) is None


def test_root_certificate_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    req = request(sslrootcert=str(fifo))
    (violation,) = files.check_files(policy_rules.file_needs(req, policy.root_of_trust(req)))
    assert violation.code == "E006" and "FIFO" in violation.problem  # would block if opened


def test_the_default_passfile_is_a_file_need_only_without_a_password(
    root_cert: str, home: Path
) -> None:
    """libpq reads ~/.pgpass only when no password is given; then a directory there is
    refused."""
    pgpass = home / ".pgpass"
    pgpass.mkdir()

    def needs(settings: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
        with mock.patch.dict(os.environ, environ or {}):
            verdict = standalone_wrapper("default", settings).policy_verdict()
        return [need.path for need in verdict.files]

    assert str(pgpass) not in needs(entry(root_cert))
    assert codes(entry(root_cert)) == []
    no_password = {**entry(root_cert), "PASSWORD": ""}
    assert str(pgpass) in needs(no_password)
    assert codes(no_password) == ["E016"]
    assert str(pgpass) not in needs(no_password, {"PGPASSWORD": "x"})
    assert str(pgpass) in needs(entry(root_cert, passfile=str(pgpass)))  # named: checked


@pytest.mark.timeout(60)
def test_a_fifo_at_the_default_passfile_is_refused_not_waited_on(
    root_cert: str, home: Path
) -> None:
    """libpq opens its password file before checking what it is; resolving the settings
    without a password used to wait there for a writer, for ever."""
    os.mkfifo(home / ".pgpass")
    no_password = {**entry(root_cert), "PASSWORD": ""}
    assert codes(no_password) == ["E016"]
    verdict = judge(no_password)
    assert "is not a regular file (a FIFO, socket or device)" in verdict.violations[0].problem
    with_service_passfile = home / ".pg_service.conf"
    with_service_passfile.write_text(f"[svc]\nhost=db.example.com\npassfile={home}/pw\n")
    (home / "pw").write_text("*:*:*:*:secret\n")
    os.chmod(home / "pw", 0o600)
    service = {**no_password, "OPTIONS": {"sslrootcert": root_cert, "service": "svc"}}
    assert str(home / "pw") in [
        n.path for n in standalone_wrapper("s", service).policy_verdict().files
    ]


def test_files_below_a_missing_directory_are_missing_and_the_others_still_judged(
    tmp_path: Path,
) -> None:
    gone, here = tmp_path / "gone", tmp_path / "here"
    here.mkdir()
    os.mkfifo(here / "root.crl")
    needs = (
        files.FileNeed("E016", "a", str(gone / "postgresql.crt")),
        files.FileNeed("E006", "b", str(gone / "root.crt"), required=True),
        files.FileNeed("E016", "c", str(here / "postgresql.crt")),
        files.FileNeed("E016", "d", str(here / "root.crl")),
    )
    found = [(need.origin, problem) for need, problem in files.file_problems(needs)]
    assert found == [
        ("b", files.MISSING),
        ("d", "is not a regular file (a FIFO, socket or device)"),
    ]


def _watched(tmp_path: Path) -> tuple[files.Watch, Path, Path, Path]:
    gone, here = tmp_path / "gone", tmp_path / "here"
    here.mkdir()
    root = here / "root.crt"
    root.write_text("-----BEGIN CERTIFICATE-----\n")
    key = here / "postgresql.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o600)
    needs = (
        files.FileNeed("E006", "sslrootcert", str(root), required=True),
        files.FileNeed("E018", "sslkey", str(key), kind=files.KEY_WITHOUT_PASSPHRASE),
        files.FileNeed("E016", "sslcrl", str(here / "root.crl")),
        files.FileNeed("E016", "sslcert", str(gone / "postgresql.crt")),
    )
    watch = files.Watch(needs)
    assert watch.problems() == []
    return watch, root, key, gone


def test_a_watch_judges_the_files_again_only_when_stat_says_one_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, root, _key, _gone = _watched(tmp_path)
    judged: list[object] = []
    real = files.file_problems
    monkeypatch.setattr(files, "file_problems", lambda needs: judged.append(needs) or real(needs))
    assert watch.problems() is files.UNCHANGED and judged == []  # looked at, not judged
    root.write_text("-----BEGIN CERTIFICATE-----\nrenewed\n")
    assert watch.problems() == [] and len(judged) == 1  # changed: judged (and fine)
    assert watch.problems() is files.UNCHANGED and len(judged) == 1


@pytest.mark.parametrize("change", ["chmod key", "fifo root", "fifo crl", "fifo below gone"])
def test_a_watch_sees_every_change_the_rules_judge(tmp_path: Path, change: str) -> None:
    """After a clean judgment, a key made readable by others, a root replaced by a FIFO, an
    absent file that appears as one, one below a directory that was missing: each refused."""
    watch, root, key, gone = _watched(tmp_path)
    if change == "chmod key":
        key.chmod(0o644)
        expected = ("sslkey", files.LOOSE_KEY)
    elif change == "fifo root":
        root.unlink()
        os.mkfifo(root)
        expected = ("sslrootcert", "is not a regular file")
    elif change == "fifo crl":
        os.mkfifo(root.parent / "root.crl")
        expected = ("sslcrl", "is not a regular file")
    else:
        gone.mkdir()
        os.mkfifo(gone / "postgresql.crt")
        expected = ("sslcert", "is not a regular file")
    (found,) = [(need.origin, problem) for need, problem in watch.problems()]
    assert found[0] == expected[0] and found[1].startswith(expected[1]), found


# -- reusing a verdict -----------------------------------------------------------------------------
def test_verdict_is_reused_while_inputs_are_unchanged(root_cert: str) -> None:
    wrapper = standalone_wrapper("default", entry(root_cert))
    first = wrapper.policy_verdict()
    assert wrapper.policy_verdict() is first
    with mock.patch.dict(os.environ, {"PGHOSTADDR": "10.0.0.9"}):
        assert wrapper.policy_verdict() is not first  # any libpq variable is an input
    wrapper.settings_dict["OPTIONS"]["sslmode"] = "require"
    assert [v.code for v in wrapper.policy_verdict().violations] == ["E001"]


def test_verdict_outlives_a_change_elsewhere_in_the_environment(root_cert: str) -> None:
    """The variables libpq reads are compared by name (``libpq.EnvironmentWatch``): a variable
    libpq does not read keeps the verdict, and one it reads, set after that, is seen."""
    wrapper = standalone_wrapper("default", entry(root_cert))
    first = wrapper.policy_verdict()
    with mock.patch.dict(os.environ, {"SPB_NOT_LIBPQS": "1"}):
        assert wrapper.policy_verdict() is first
        os.environ["SPB_NOT_LIBPQS"] = "2"
        assert wrapper.policy_verdict() is first
        os.environ["PGSSLCRL"] = "/nowhere/root.crl"
        changed = wrapper.policy_verdict()
        assert changed is not first
        assert wrapper.policy_verdict() is changed
    assert wrapper.policy_verdict() is not changed  # PGSSLCRL gone again


def test_verdict_follows_a_setting_replaced_or_removed(root_cert: str) -> None:
    """The settings are kept as copies (OPTIONS too): a value replaced, an option removed, the
    password changed, each is a new verdict; the same values again are not."""
    wrapper = standalone_wrapper("default", entry(root_cert))
    first = wrapper.policy_verdict()
    wrapper.settings_dict["OPTIONS"] = dict(wrapper.settings_dict["OPTIONS"])  # equal, new
    assert wrapper.policy_verdict() is first
    wrapper.settings_dict["PASSWORD"] = "rotated"
    second = wrapper.policy_verdict()
    assert second is not first
    del wrapper.settings_dict["OPTIONS"]["sslrootcert"]
    third = wrapper.policy_verdict()
    assert third is not second
    assert [v.code for v in third.violations] == [
        v.code
        for v in standalone_wrapper("fresh", wrapper.settings_dict).policy_verdict().violations
    ]


def test_verdict_follows_an_option_changed_in_place(root_cert: str) -> None:
    """A container among the options (the pool's, say) edited in place is a new input."""
    wrapper = standalone_wrapper("default", entry(root_cert, pool={"min_size": 1}))
    first = wrapper.policy_verdict()
    assert wrapper.policy_verdict() is first
    wrapper.settings_dict["OPTIONS"]["pool"]["min_size"] = 2
    assert wrapper.policy_verdict() is not first


def test_verdict_is_not_reused_when_a_service_file_is_involved(
    root_cert: str, tmp_path: Path
) -> None:
    service = tmp_path / "svc.conf"
    service.write_text("[svc]\nhost=db.example.com\n")
    with mock.patch.dict(os.environ, {"PGSERVICEFILE": str(service)}):
        wrapper = standalone_wrapper("default", entry(root_cert, host="", service="svc"))
        first = wrapper.policy_verdict()
        assert first.violations == ()
        service.write_text("[svc]\nhost=/var/run/postgresql\n")  # the file is an input too
        assert [v.code for v in wrapper.policy_verdict().violations] == ["E004"]

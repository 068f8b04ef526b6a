"""``OPTIONS['allow_local_proxy']``: plaintext TCP to a sidecar on loopback that does the
verified TLS itself (Cloud SQL Auth Proxy, AlloyDB Auth Proxy, pgproxy). The policy accepts one
literal loopback address only, before any I/O; the link check confirms the socket's peer."""

from __future__ import annotations

import json
import logging
from io import StringIO
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.db import connections
from django.test.utils import override_settings

from secure_pg_backend import handshake
from secure_pg_backend.base import standalone_wrapper
from secure_pg_backend.checks import check_deploy_plaintext
from secure_pg_backend.errors import InsecureConnectionError, SecurePolicyError
from secure_pg_backend.testing import TLSPostgres
from tests.conftest import TCPRecorder, assert_no_secret

PROXY = {"allow_local_proxy": True}


def entry(host: str, port: int = 5432, **options: Any) -> dict[str, Any]:
    return {
        "ENGINE": "secure_pg_backend",
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "proxy-Pw-1",
        "HOST": host,
        "PORT": str(port),
        "OPTIONS": {**PROXY, **options},
    }


def verdict(settings_dict: dict[str, Any]) -> Any:
    return standalone_wrapper("sidecar", settings_dict).policy_verdict()


# -- the policy, before any I/O --------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "options"),
    [
        ("127.0.0.1", {}),
        ("127.0.0.2", {}),
        ("::1", {}),
        ("localhost", {"hostaddr": "127.0.0.1"}),
        ("127.0.0.1", {"hostaddr": "127.0.0.1"}),
    ],
)
def test_one_loopback_address_is_accepted(host: str, options: dict[str, Any]) -> None:
    found = verdict(entry(host, **options))
    assert found.violations == () and found.decision is not None
    params = found.params
    assert (params["sslmode"], params["gssencmode"]) == ("disable", "disable")
    assert "sslrootcert" not in found.decision.forced
    assert found.decision.direct_key is None  # no direct TLS: there is no TLS on this leg
    # No root of trust is asked for (E005): the sidecar verifies the server.
    assert all(need.code not in ("E005", "E006") for need in found.files)


@pytest.mark.parametrize(
    ("host", "options", "said"),
    [
        ("10.1.2.3", {}, "'10.1.2.3', not a literal loopback address"),
        ("db.example.com", {}, "'db.example.com', not a literal loopback address"),
        ("localhost", {}, "'localhost', not a literal loopback address"),  # a name, not pinned
        ("0.0.0.0", {}, "not a literal loopback address"),
        ("::1%lo", {}, "not a literal loopback address"),
        ("127.0.0.1,127.0.0.2", {}, "lists 2 hosts"),
        ("localhost", {"hostaddr": "10.0.0.1"}, "'10.0.0.1', not a loopback address"),
        ("db.example.com", {"hostaddr": "127.0.0.1"}, "only 'localhost' or the loopback"),
        ("/var/run/postgresql", {}, "a Unix-domain socket"),
    ],
)
def test_anything_else_is_refused_by_the_policy(
    host: str, options: dict[str, Any], said: str
) -> None:
    found = verdict(entry(host, **options))
    assert found.decision is None
    (e019,) = [v for v in found.violations if v.code == "E019"]
    assert said in e019.problem and "allow_local_proxy" in e019.problem
    assert "127.0.0.1" in e019.fix


def test_the_opt_in_must_be_a_boolean() -> None:
    found = verdict(entry("127.0.0.1", allow_local_proxy="yes"))
    assert [v.code for v in found.violations] == ["E008"]


def test_refused_before_any_traffic(make_wrapper: Any, tcp_recorder: TCPRecorder) -> None:
    # 'localhost' resolves to this machine, but a name is not pinned: refused, nothing sent.
    wrapper = make_wrapper(entry("localhost", tcp_recorder.port), alias="named_proxy")
    with pytest.raises(SecurePolicyError, match=r"E019|allow_local_proxy") as e:
        wrapper.ensure_connection()
    assert "secure_pg_backend.E019" in str(e.value) or "E019" in repr(e.value.violations)
    assert "proxy-Pw-1" not in str(e.value)
    remote = make_wrapper(entry("10.1.2.3", 5432), alias="remote_proxy")
    with pytest.raises(SecurePolicyError, match="not a literal loopback address"):
        remote.ensure_connection()  # raised by the gate: libpq is never called
    assert tcp_recorder.accepted == 0


def test_the_link_check_wants_a_loopback_peer() -> None:
    decision = verdict(entry("127.0.0.1")).decision
    effective = {"sslmode": "disable", "gssencmode": "disable"}

    def facts(peer: str | None, unix: bool = False) -> handshake.LinkFacts:
        return handshake.LinkFacts(
            "127.0.0.1", False, None, None, False, unix, effective, peer=peer
        )

    for peer in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert handshake.check_link(decision, facts(peer)) is None, peer
    for peer in ("10.0.0.1", "192.0.2.7", None):
        problem = handshake.check_link(decision, facts(peer))
        assert problem is not None and "not a loopback address" in problem[1], peer
    problem = handshake.check_link(decision, facts(None, unix=True))
    assert problem is not None and "Unix-domain socket" in problem[1]


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_deploy_check_names_every_alias_without_tls_on_its_own_link() -> None:
    databases = {
        "default": {"ENGINE": "django.db.backends.dummy"},
        "sidecar": entry("127.0.0.1"),
        "local": {**entry("/run/postgresql"), "OPTIONS": {"allow_unix_socket": True}},
        "verified": {**entry("db.example.com"), "OPTIONS": {}},
    }
    with override_settings(DATABASES=databases):
        found = [m for m in run_checks(include_deployment_checks=True) if m.id.endswith("W004")]
        assert not [m for m in run_checks() if m.id.endswith("W004")]  # with --deploy only
        assert check_deploy_plaintext(None) == found
    assert [(w.id, w.obj) for w in found] == [
        ("secure_pg_backend.W004", "DATABASES['sidecar']"),
        ("secure_pg_backend.W004", "DATABASES['local']"),
    ]
    assert "allow_local_proxy" in found[0].msg and "allow_unix_socket" in found[1].msg
    assert all("proxy-Pw-1" not in w.msg for w in found)


# -- a real plaintext server on loopback, standing in for the sidecar ------------------------
@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pool"])
def test_a_loopback_plaintext_server_is_reached_only_with_the_opt_in(
    pooled: bool,
    plain_server: TLSPostgres,
    make_wrapper: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="secure_pg_backend")
    options: dict[str, Any] = {"pool": {"min_size": 1, "timeout": 10}} if pooled else {}
    without = make_wrapper(plain_server.database_settings(options=options), alias="no_opt_in")
    with pytest.raises(InsecureConnectionError, match="does not offer TLS"):
        without.ensure_connection()

    settings = plain_server.database_settings(options={**PROXY, **options})
    settings["OPTIONS"].pop("sslrootcert")  # no root of trust is needed on this leg
    wrapper = make_wrapper(settings, alias="sidecar")
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert cursor.fetchone()[0] is False  # the server saw plaintext: it was really reached
    info = wrapper.tls_info
    assert info.transport == "local-proxy" and not info.tls
    assert (info.sslmode, info.gssencmode, info.user) == ("disable", "disable", "app")
    line = next(r.getMessage() for r in caplog.records if "connected to" in r.getMessage())
    assert "WITHOUT TLS to a local proxy" in line and "allow_local_proxy" in line
    assert "root certificate" not in line
    assert "the encryption to the server is the proxy's" in info.summary()
    assert_no_secret(caplog.text, repr(info), json.dumps(info.as_dict()))


def test_localhost_pinned_by_hostaddr_and_dbtls(plain_server: TLSPostgres, aliases: Any) -> None:
    settings = plain_server.database_settings(
        host="localhost", options={**PROXY, "hostaddr": "127.0.0.1"}
    )
    settings["OPTIONS"].pop("sslrootcert")
    aliases(sidecar_dbtls=settings)
    assert connections["sidecar_dbtls"].tls_info.transport == "local-proxy"
    out = StringIO()
    call_command("dbtls", "--database", "sidecar_dbtls", stdout=out)
    assert out.getvalue().startswith("sidecar_dbtls: local proxy at localhost:")
    assert "the encryption to the server is the proxy's" in out.getvalue()
    as_json = StringIO()
    call_command("dbtls", "--database", "sidecar_dbtls", "--json", stdout=as_json)
    assert json.loads(as_json.getvalue())["sidecar_dbtls"]["transport"] == "local-proxy"

"""Core checks against each PostgreSQL server major version (14-18).

Which servers: ``SPB_PG_VERSIONS`` (for example ``"14 18"``; ``make test-servers`` runs all five),
each from ``PG_BIN_<MAJOR>`` if set, otherwise from ``scripts/pg-binaries MAJOR`` (PyPI builds,
cached in .cache/pg). Unset: the server this machine has (``secure_pg_backend.testing``'s usual
choice, ``$PG_BIN`` first). Every version gets the same checks: verified TLS equal to what the
server reports in pg_stat_ssl, the ``tls_info`` fields, refusal of an untrusted CA and of a wrong
host name, and ``sslnegotiation=direct``: ALPN ``postgresql`` on 17+, a refusal (never plaintext)
before 17, which cannot speak it; without the setting, direct TLS from the second connection on
17+ and the SSLRequest before (tests/test_direct_tls.py has the rest of that default).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.db.utils import OperationalError

from secure_pg_backend import InsecureConnectionError, handshake, libpq
from secure_pg_backend.testing import TestCA, TLSPostgres, find_pg_bin
from tests.conftest import refused_by_old_libpq

pytestmark = pytest.mark.needs_server  # one PostgreSQL per version (module fixtures)

Wrapper = Callable[..., Any]
REPO = Path(__file__).resolve().parent.parent
DIRECT_SSL_SINCE = 17


def major_of(pg_bin: Path) -> int:
    out = subprocess.run(
        [str(pg_bin / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    assert match, f"unexpected `postgres --version` output: {out!r}"
    return int(match.group(1))


def bin_dir(major: int) -> Path:
    env = os.environ.get(f"PG_BIN_{major}")
    if env:
        return Path(env)
    out = subprocess.run(
        [str(REPO / "scripts" / "pg-binaries"), str(major)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"scripts/pg-binaries {major} failed:\n{out.stderr}")
    return Path(out.stdout.strip())


def server_bins() -> list[Any]:
    wanted = [int(major) for major in os.environ.get("SPB_PG_VERSIONS", "").split()]
    found = {major: bin_dir(major) for major in wanted} if wanted else {0: find_pg_bin()}
    params = []
    for major, path in found.items():
        actual = major_of(path)
        if major and actual != major:
            raise RuntimeError(f"{path} holds PostgreSQL {actual}, not {major} (PG_BIN_{major}?)")
        params.append(pytest.param((actual, path), id=f"pg{actual}"))
    return params


@dataclass
class Server:
    major: int
    pg: TLSPostgres


@pytest.fixture(scope="module", params=server_bins())
def server(request: pytest.FixtureRequest, ca: TestCA) -> Iterator[Server]:
    major, pg_bin = request.param
    pg = TLSPostgres(ca.issue("localhost", "127.0.0.1", "db.test"), trust=ca, pg_bin=pg_bin)
    with pg:
        yield Server(major, pg)


def stat_ssl(wrapper: Any) -> tuple[Any, ...]:
    with wrapper.cursor() as cursor:
        cursor.execute(
            "select ssl, version, cipher, bits, current_setting('server_version_num')::int"
            " from pg_stat_ssl where pid = pg_backend_pid()"
        )
        row = cursor.fetchone()
    assert row is not None
    return tuple(row)


def test_verified_tls_matches_pg_stat_ssl(make_wrapper: Wrapper, server: Server) -> None:
    wrapper = make_wrapper(server.pg.database_settings())
    ssl, version, cipher, bits, version_num = stat_ssl(wrapper)
    info = wrapper.tls_info
    assert version_num // 10000 == server.major
    assert ssl is True
    assert (info.protocol, info.cipher, info.key_bits) == (version, cipher, bits)


def test_tls_info_fields(make_wrapper: Wrapper, server: Server) -> None:
    info = make_wrapper(server.pg.database_settings()).tls_info
    assert (info.transport, info.sslmode, info.library) == ("tls", "verify-full", "OpenSSL")
    assert (info.host, info.port, info.database) == ("127.0.0.1", server.pg.port, "app")
    assert info.protocol in {"TLSv1.2", "TLSv1.3"} and info.compression is False
    # libpq 17+ always offers ALPN; servers select it from 17 on, also in classic negotiation.
    assert info.alpn == ("postgresql" if server.major >= DIRECT_SSL_SINCE else None)
    assert info.root_cert == server.pg.root_cert
    assert info.peer_certificate is not None
    assert "IP:127.0.0.1" in info.peer_certificate.subject_alt_names


def test_untrusted_ca_is_refused(make_wrapper: Wrapper, server: Server) -> None:
    other = TestCA()
    settings = server.pg.database_settings(options={"sslrootcert": str(other.cert_path)})
    with pytest.raises(InsecureConnectionError, match="certificate verify failed"):
        make_wrapper(settings).ensure_connection()


def test_wrong_host_name_is_refused(make_wrapper: Wrapper, server: Server) -> None:
    settings = server.pg.database_settings(host="evil.test", options={"hostaddr": "127.0.0.1"})
    with pytest.raises(InsecureConnectionError, match="does not match host name"):
        make_wrapper(settings).ensure_connection()


def test_direct_negotiation(make_wrapper: Wrapper, server: Server) -> None:
    wrapper = make_wrapper(server.pg.database_settings(options={"sslnegotiation": "direct"}))
    if refused_by_old_libpq(wrapper, "sslnegotiation"):  # a libpq 15 client (C/Python builds)
        return
    if server.major < DIRECT_SSL_SINCE:
        # The server reads the ClientHello as a malformed startup packet and hangs up; libpq
        # must not fall back to anything else.
        with pytest.raises(OperationalError, match="SSL error"):
            wrapper.ensure_connection()
        return
    ssl, version, *_ = stat_ssl(wrapper)
    info = wrapper.tls_info
    assert (ssl, version) == (True, info.protocol)
    assert info.alpn == "postgresql"


def test_direct_tls_by_default_from_the_second_connection(
    make_wrapper: Wrapper, server: Server
) -> None:
    handshake.forget_direct()  # this module's other tests taught it this endpoint already
    wrapper = make_wrapper(server.pg.database_settings())
    used = []
    for _ in range(2):
        wrapper.ensure_connection()
        used.append(wrapper.tls_info.sslnegotiation)
        wrapper.close()
    direct = server.major >= DIRECT_SSL_SINCE and "sslnegotiation" in libpq.keywords()
    assert used == ["postgres", "direct" if direct else "postgres"]

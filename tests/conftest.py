"""Real PostgreSQL servers with real TLS, from a throwaway CA made at test time.

Django's settings (and so ``DATABASES['default']``) must exist before pytest-django sets
Django up, so ``pytest_configure`` describes the main server (CA, certificate, port) without
starting it; it starts on first use, like every other server, and lives for the session. A
test that uses a server says so through its fixtures (``good_server``, ``db``, ...) or the
``needs_server`` marker; ``--no-servers`` (``make test-fast``) runs only the others and makes
any attempt to start PostgreSQL fail loudly, so a test missing its marker shows up there
instead of being dropped from the full run, which ignores the marker.
"""

from __future__ import annotations

import atexit
import copy
import datetime as dt
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.utils import ConnectionHandler

from secure_pg_backend import retry as retries
from secure_pg_backend import signals
from secure_pg_backend.testing import (
    APP_PASSWORD,
    SUPERUSER_PASSWORD,
    TestCA,
    TLSPostgres,
    find_pg_bin,
    free_port,
)

SECRETS = (APP_PASSWORD, SUPERUSER_PASSWORD)

pytest_plugins = ["pytester"]  # tests/test_pytest_plugin.py runs a user's project

_servers: list[TLSPostgres] = []
_state: dict[str, Any] = {}


def _start(server: TLSPostgres) -> TLSPostgres:
    server.start()
    _servers.append(server)
    return server


def _stop_all() -> None:
    while _servers:
        _servers.pop().stop()


# Fixtures that start a PostgreSQL server (or need the main one). A test using one of them, or
# marked django_db, is a `needs_server` test. pytest-django's database fixtures all go through
# django_db_setup. A module whose own fixtures start servers marks itself (pytestmark).
SERVER_FIXTURES = frozenset(
    {
        "good_server",
        "mitm_server",
        "plain_server",
        "expired_server",
        "expiring_server",
        "start_server",
        "aliases",
        "django_db_setup",
    }
)
# pytest-timeout: a test that starts servers or processes and hangs fails instead of holding
# the run (and its servers) forever. Generous: a busy 2-core machine is slow, not hung.
SERVER_TEST_TIMEOUT = 600

NO_SERVERS_HELP = (
    "run only the tests that need no PostgreSQL server (make test-fast); starting one fails"
)


LONG_HELP = (
    "also run the long scenarios (pytest.mark.long: the HA cluster, the 30-s outage, the storm;"
    " make test-long); deselected otherwise"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-servers", action="store_true", help=NO_SERVERS_HELP)
    parser.addoption("--long", action="store_true", help=LONG_HELP)


def _forbid_servers() -> None:
    """Make every PostgreSQL start fail, in this process and in the processes it spawns.

    Here TLSPostgres.start raises; in child processes, secure_pg_backend.testing finds
    ``$PG_BIN/initdb`` and ``$PG_BIN/pg_ctl``: scripts that say which marker is missing and
    exit 1.
    """
    stub_dir = Path(tempfile.mkdtemp(prefix="spb-no-servers-"))
    stub_dir.chmod(0o755)  # as root, testing.py runs initdb as the postgres user
    atexit.register(shutil.rmtree, stub_dir, ignore_errors=True)
    message = (
        "--no-servers (make test-fast): this test starts PostgreSQL; "
        "mark it needs_server (pytest.mark.needs_server) or request a server fixture"
    )
    real = find_pg_bin()
    for name in ("initdb", "pg_ctl", "postgres"):
        stub = stub_dir / name
        # `postgres --version` only reports (test_server_versions asks it while collecting).
        version = (
            f'[ "$1" = --version ] && exec "{real / name}" "$@"\n' if name == "postgres" else ""
        )
        stub.write_text(f"#!/bin/sh\n{version}echo '{message}' >&2\nexit 1\n")
        stub.chmod(0o755)
    os.environ["PG_BIN"] = str(stub_dir)

    def refuse(self: TLSPostgres) -> TLSPostgres:
        raise RuntimeError(message)

    TLSPostgres.start = refuse  # type: ignore[method-assign]


def examples(full: int) -> int:
    """How many examples a property test tries: ``full``, a tenth in the fast loop.

    The fast loop (--no-servers) is for seconds-long edit-test cycles; the full run, which
    every change goes through, explores the whole budget.
    """
    return max(full // 10, 1) if _state.get("no_servers") else full


# Printed first by every run, so that a new release of a dependency that breaks the suite is
# named in the run's first lines (CI installs the newest releases pyproject allows).
KEY_PACKAGES = (
    "Django",
    "psycopg",
    "psycopg-binary",
    "psycopg-c",
    "psycopg-pool",
    "cryptography",
    "trustme",
    "dj-database-url",
    "botocore",
    "prometheus-client",
)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Written even with -q (which hides pytest's report header); once, not per xdist worker.
    if hasattr(session.config, "workerinput"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in dependency_versions():
            reporter.write_line(line)


def dependency_versions() -> list[str]:
    from importlib import metadata

    import psycopg

    found = []
    for name in KEY_PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    libpq = psycopg.pq.version()
    return [
        "secure_pg_backend dependencies: " + ", ".join(found),
        f"psycopg implementation: {psycopg.pq.__impl__}, libpq {libpq // 10000}.{libpq % 10000}",
    ]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_server: starts PostgreSQL (deselected by --no-servers / make test-fast)"
    )
    config.addinivalue_line(
        "markers", "long: a long scenario, run by make test-long (pytest --long) only"
    )
    if config.getoption("no_servers"):
        _state["no_servers"] = True
        _forbid_servers()
    if settings.configured:
        return
    ca = TestCA()
    # Also accepts plaintext TCP (pg_hba "host" lines): if the backend ever let
    # libpq fall back, tests against this server would see a non-TLS link.
    # Not started here: its port is only reserved (free_port), see good_server.
    good = TLSPostgres(
        ca.issue("localhost", "127.0.0.1", "db.test"), trust=ca, allow_plaintext=True
    )
    atexit.register(_stop_all)
    _state.update(ca=ca, good=good)
    settings.configure(
        DATABASES={"default": good.database_settings()},
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "secure_pg_backend",
            "tests.testapp",
        ],
        USE_TZ=True,
        SECRET_KEY="tests-not-secret",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        ROOT_URLCONF="tests.testapp.urls",
        MIDDLEWARE=[],
        ALLOWED_HOSTS=["*"],
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    _stop_all()


def needs_server(item: pytest.Item) -> bool:
    return bool(
        item.get_closest_marker("needs_server")
        or item.get_closest_marker("django_db")
        or SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    # The long scenarios take minutes: their own target runs them (make test-long, which CI runs
    # after make test), every other run deselects them (reported as deselected, not skipped).
    if not config.getoption("long"):
        long = [item for item in items if item.get_closest_marker("long")]
        if long:
            config.hook.pytest_deselected(items=long)
            items[:] = [item for item in items if not item.get_closest_marker("long")]
    for item in items:
        if needs_server(item):
            item.add_marker(pytest.mark.needs_server)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(SERVER_TEST_TIMEOUT))
            dropped.append(item)
        else:
            keep.append(item)
    if config.getoption("no_servers") and dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# -- servers ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def ca() -> TestCA:
    return _state["ca"]  # type: ignore[no-any-return]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def good_server() -> TLSPostgres:
    """TLS with a leaf for localhost, 127.0.0.1 and db.test (reachable via hostaddr).

    The server behind ``DATABASES['default']``, started on first use. Its port was reserved
    when the settings were written; if something took it since, it moves to a free one and
    ``DATABASES['default']`` (the very dict Django's connections read) follows.
    """
    good: TLSPostgres = _state["good"]
    if not good.running:
        if not _port_free(good.port):
            good.port = free_port()
            fresh = good.database_settings()
            entry = settings.DATABASES["default"]  # in place: Django may have filled defaults in
            entry["PORT"] = fresh["PORT"]
            entry["TEST"]["NAME"] = fresh["TEST"]["NAME"]
        _start(good)
    return good


@pytest.fixture(scope="session")
def django_db_setup(good_server: TLSPostgres, django_db_setup: None) -> None:
    """pytest-django's test database, created on the main server (started first)."""


def _lazy(name: str, make: Callable[[], TLSPostgres]) -> TLSPostgres:
    if name not in _state:
        _state[name] = _start(make())
    return _state[name]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def mitm_server(ca: TestCA) -> TLSPostgres:
    """A machine-in-the-middle: valid-looking leaf for localhost, from another CA."""
    return _lazy("mitm", lambda: TLSPostgres(TestCA().issue("localhost", "127.0.0.1"), trust=ca))


@pytest.fixture(scope="session")
def plain_server(ca: TestCA) -> TLSPostgres:
    """``ssl = off``: only plaintext."""
    return _lazy("plain", lambda: TLSPostgres(None, trust=ca, ssl=False))


@pytest.fixture(scope="session")
def expired_server(ca: TestCA) -> TLSPostgres:
    """A leaf from the trusted CA that expired in 2021."""
    leaf = ca.issue(
        "localhost",
        "127.0.0.1",
        not_before=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc),
    )
    return _lazy("expired", lambda: TLSPostgres(leaf, trust=ca))


@pytest.fixture(scope="session")
def expiring_server(ca: TestCA) -> TLSPostgres:
    """A leaf from the trusted CA that expires in 10 days."""
    now = dt.datetime.now(dt.timezone.utc)
    leaf = ca.issue(
        "localhost",
        "127.0.0.1",
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=10, hours=1),
    )
    return _lazy("expiring", lambda: TLSPostgres(leaf, trust=ca))


@pytest.fixture
def start_server() -> Iterator[Callable[..., TLSPostgres]]:
    """Start a server for one test only (for tests that restart or reconfigure it)."""
    started: list[TLSPostgres] = []

    def start(*args: Any, **kwargs: Any) -> TLSPostgres:
        server = TLSPostgres(*args, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- Django connections outside settings.DATABASES ------------------------------
@pytest.fixture
def make_wrapper(django_db_blocker: Any) -> Iterator[Callable[..., Any]]:
    """Build a DatabaseWrapper for a settings dict, as Django would; closed afterwards.

    These connections are outside settings.DATABASES (and pytest-django's test
    database), so database access is unblocked for the test that uses them.
    """
    made: list[Any] = []

    def make(settings_dict: dict[str, Any], alias: str = "secure") -> Any:
        # ConnectionHandler fills in Django's defaults (TIME_ZONE, CONN_MAX_AGE, ...).
        handler = ConnectionHandler(
            {"default": {"ENGINE": "django.db.backends.dummy"}, alias: settings_dict}
        )
        wrapper = handler[alias]
        made.append(wrapper)
        return wrapper

    with django_db_blocker.unblock():
        yield make
    for wrapper in made:
        try:
            wrapper.close()
            if wrapper.pool is not None:
                wrapper.close_pool()
        except Exception:
            pass


def leaf_certificate(server: TLSPostgres) -> x509.Certificate:
    assert server.leaf is not None
    return x509.load_pem_x509_certificates(server.leaf.cert_chain_pem)[0]


@pytest.fixture
def aliases(good_server: TLSPostgres, django_db_blocker: Any) -> Iterator[Callable[..., None]]:
    """Add aliases to django.db.connections for one test (as if they were in DATABASES)."""
    added: list[str] = []

    def add(**entries: dict[str, Any]) -> None:
        default = connections.settings["default"]
        configured = connections.configure_settings(copy.deepcopy({"default": default, **entries}))
        connections.settings.update({alias: configured[alias] for alias in entries})
        added.extend(entries)

    with django_db_blocker.unblock():
        yield add
        for alias in added:
            if hasattr(connections._connections, alias):
                connections[alias].close()
                delattr(connections._connections, alias)
            del connections.settings[alias]
        connections["default"].close()


@pytest.fixture(autouse=True)
def _fresh_announcements() -> None:
    signals.reset_announced()
    # Every breaker closed, the retry bucket full: what one test's outage left behind (an
    # open breaker, tokens spent) must not change the next test's connects.
    retries.reset()


# -- network observation ---------------------------------------------------------
class TCPRecorder:
    """A loopback listener that counts connection attempts (and accepts nothing else)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def tcp_recorder() -> Iterator[TCPRecorder]:
    recorder = TCPRecorder()
    yield recorder
    recorder.close()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, "a password leaked into output"


def refused_by_old_libpq(wrapper: Any, keyword: str) -> bool:
    """On a libpq too old for ``keyword`` (C/Python builds), the clear refusal is the result.

    Tests of a newer libpq keyword call this first and stop when it returns True: the
    settings are refused before connecting, naming the key and the libpq it needs.
    """
    import psycopg

    from secure_pg_backend.compat import NEWER_KEYWORDS

    if psycopg.pq.version() >= NEWER_KEYWORDS[keyword]:
        return False
    with pytest.raises(ImproperlyConfigured, match=rf"OPTIONS\['{keyword}'\] needs libpq"):
        wrapper.ensure_connection()
    return True


def connect_or_hang(wrapper: Any, seconds: float) -> BaseException | None:
    """Connect ``wrapper`` in a daemon thread; the exception it raised, or None if it
    connected. Fails the test if the attempt is still running after ``seconds`` (a hang)."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            wrapper.ensure_connection()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the connection attempt hung for {seconds} s"
    return outcome[0]

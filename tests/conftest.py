"""Real PostgreSQL servers with real TLS, from a throwaway CA made at test time.

The main server is started in ``pytest_configure`` because Django's settings
(and so ``DATABASES['default']``) must exist before pytest-django sets Django
up. Other servers start on first use and live for the session.
"""

from __future__ import annotations

import atexit
import copy
import datetime as dt
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from django.conf import settings
from django.db import connections
from django.db.utils import ConnectionHandler

from secure_pg_backend import logs
from secure_pg_backend.testing import APP_PASSWORD, SUPERUSER_PASSWORD, TestCA, TLSPostgres

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


def pytest_configure(config: pytest.Config) -> None:
    if settings.configured:
        return
    ca = TestCA()
    # Also accepts plaintext TCP (pg_hba "host" lines): if the backend ever let
    # libpq fall back, tests against this server would see a non-TLS link.
    good = _start(
        TLSPostgres(ca.issue("localhost", "127.0.0.1", "db.test"), trust=ca, allow_plaintext=True)
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


# -- servers ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def ca() -> TestCA:
    return _state["ca"]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def good_server() -> TLSPostgres:
    """TLS with a leaf for localhost, 127.0.0.1 and db.test (reachable via hostaddr)."""
    return _state["good"]  # type: ignore[no-any-return]


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
def aliases(django_db_blocker: Any) -> Iterator[Callable[..., None]]:
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
    logs.reset()


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

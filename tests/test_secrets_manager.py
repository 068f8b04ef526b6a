"""The built-in AWS Secrets Manager provider against a real Secrets Manager API: moto's server
mode, a separate process on loopback, spoken to over HTTP by botocore as AWS would be. Rotation
is simulated as the rotation Lambdas do it (``PutSecretValue`` to AWSPENDING, then
``UpdateSecretVersionStage`` moving AWSCURRENT); moto's ``RotateSecret`` needs a Lambda runtime.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from django.db import connections

from secure_pg_backend import credentials, provider, signals
from secure_pg_backend.errors import CredentialProviderError
from secure_pg_backend.testing import TLSPostgres
from secure_pg_backend.testing.servers import free_port
from tests.conftest import assert_no_secret

pytestmark = pytest.mark.needs_server  # a moto server process (and PostgreSQL)
pytest.importorskip("moto.server", reason="moto[server] is in the test extra")

REGION = "eu-west-1"
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDSPBMOTOEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "spb/moto/secret/key/for/loopback/only00",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/nonexistent/spb-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/spb-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's Secrets Manager, served on 127.0.0.1 by its own process for this module."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_ENV.items():
        monkeypatch.setenv(name, value)
    credentials._client.cache_clear()
    provider.forget()
    yield
    credentials._client.cache_clear()
    provider.forget()


class Secret:
    """One secret on the moto server, rotated the way rotation Lambdas do."""

    def __init__(self, url: str, value: Mapping[str, Any]) -> None:
        import botocore.session

        self.client = botocore.session.Session().create_client(
            "secretsmanager", region_name=REGION, endpoint_url=url
        )
        self.name = f"spb/test/{uuid.uuid4().hex[:10]}"
        created = self.client.create_secret(Name=self.name, SecretString=json.dumps(value))
        self.arn: str = created["ARN"]
        self.version: str = created["VersionId"]

    def rotate(self, value: Mapping[str, Any]) -> None:
        pending = self.client.put_secret_value(
            SecretId=self.name, SecretString=json.dumps(value), VersionStages=["AWSPENDING"]
        )["VersionId"]
        self.client.update_secret_version_stage(
            SecretId=self.name,
            VersionStage="AWSCURRENT",
            MoveToVersionId=pending,
            RemoveFromVersionId=self.version,
        )
        self.version = pending


def rds_shape(user: str, password: str, **extra: Any) -> dict[str, Any]:
    return {
        "engine": "postgres",
        "host": "db.elsewhere.example",
        "port": 6543,
        "dbname": "other",
        "username": user,
        "password": password,
        **extra,
    }


class Counted:
    """The built-in provider, counting GetSecretValue calls (a plain function wrapper)."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.calls = 0
        self.lock = threading.Lock()

    def provider(self) -> Callable[[str, Mapping[str, Any]], Any]:
        def fn(alias: str, settings_dict: Mapping[str, Any]) -> Any:
            with self.lock:
                self.calls += 1
            return self.inner(alias, settings_dict)

        return fn


# -- the provider on its own ------------------------------------------------------------------
def test_reads_username_and_password_and_ignores_the_rest(
    moto_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = Secret(moto_url, rds_shape("blue_app", "blue-Pw-7"))
    caplog.set_level(logging.DEBUG)  # botocore logs response bodies at DEBUG
    read = functools.partial(
        credentials.aws_secrets_manager, secret_id=secret.arn, endpoint_url=moto_url, ttl=120
    )
    before = time.time()
    answer = read("default", {"HOST": "db.test", "OPTIONS": {}})
    assert (answer.user, answer.password) == ("blue_app", "blue-Pw-7")
    assert isinstance(answer.expires_at, float)
    assert before + 120 <= answer.expires_at <= time.time() + 120
    assert "blue-Pw-7" not in caplog.text and "blue-Pw-7" not in repr(answer)
    # The region comes from the ARN (no region given) as well as from the configuration.
    by_name = functools.partial(
        credentials.aws_secrets_manager, secret_id=secret.name, endpoint_url=moto_url
    )
    assert by_name("default", {}).password == "blue-Pw-7"


@pytest.mark.parametrize(
    ("stored", "needle"),
    [
        (None, "ResourceNotFoundException"),
        ("not json: hidden-Pw-1", "its SecretString is not JSON"),
        (json.dumps(["hidden-Pw-1"]), "JSON but not an object"),
        (json.dumps({"username": "u", "pass": "hidden-Pw-1"}), "has no 'password' string"),
        (json.dumps({"username": 5, "password": "hidden-Pw-1"}), "'username' is not a non-empty"),
    ],
)
def test_unusable_secrets_name_the_alias_and_secret_never_its_value(
    moto_url: str, stored: str | None, needle: str, caplog: pytest.LogCaptureFixture
) -> None:
    import botocore.session

    name = f"spb/bad/{uuid.uuid4().hex[:8]}"
    if stored is not None:
        client = botocore.session.Session().create_client(
            "secretsmanager", region_name=REGION, endpoint_url=moto_url
        )
        client.create_secret(Name=name, SecretString=stored)
    caplog.set_level(logging.DEBUG)
    fn = functools.partial(credentials.aws_secrets_manager, secret_id=name, endpoint_url=moto_url)
    settings = {"HOST": "db.test", "USER": "app", "OPTIONS": {"password_provider": fn}}
    with pytest.raises(CredentialProviderError, match=needle) as e:
        provider.credentials_for("orders", settings)
    message = str(e.value)
    assert "DATABASES['orders'] (host 'db.test')" in message and name in message
    assert "hidden-Pw-1" not in message + caplog.text


def test_secret_id_and_ttl_are_checked() -> None:
    with pytest.raises(ValueError, match="no secret_id"):
        credentials.aws_secrets_manager("default", {})
    with pytest.raises(ValueError, match="ttl is 0"):
        credentials.aws_secrets_manager("default", {}, secret_id="x", ttl=0)


# -- on a real PostgreSQL server --------------------------------------------------------------
class Roles:
    """Login roles for the test, dropped afterwards."""

    def __init__(self, server: TLSPostgres) -> None:
        self.server = server
        self.names: list[str] = []

    def create(self) -> tuple[str, str]:
        name, password = f"sm_{uuid.uuid4().hex[:10]}", f"sm-Pw-{uuid.uuid4().hex}"
        self.server.admin_sql(
            f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
            f"GRANT ALL ON DATABASE app TO {name}",
        )
        self.names.append(name)
        return name, password

    def set_password(self, name: str) -> str:
        password = f"sm-Pw-{uuid.uuid4().hex}"
        self.server.admin_sql(f"ALTER ROLE {name} PASSWORD '{password}'")
        return password

    def drop(self) -> None:
        for name in self.names:
            self.server.admin_sql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'",
                f"REVOKE ALL ON DATABASE app FROM {name}",
                f"DROP ROLE {name}",
            )


@pytest.fixture
def roles(good_server: TLSPostgres) -> Iterator[Roles]:
    made = Roles(good_server)
    yield made
    made.drop()


@pytest.fixture
def retries() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def record(sender: object, **kwargs: Any) -> None:
        seen.append(kwargs)

    signals.connection_retried.connect(record, weak=False, dispatch_uid="test_secrets_manager")
    yield seen
    signals.connection_retried.disconnect(dispatch_uid="test_secrets_manager")


def who(alias: str) -> str:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT current_user")
        return str(cursor.fetchone()[0])


def test_a_single_user_rotation_is_healed_by_the_second_chance(
    moto_url: str,
    good_server: TLSPostgres,
    roles: Roles,
    aliases: Any,
    retries: list[dict[str, Any]],
) -> None:
    name, password = roles.create()
    secret = Secret(moto_url, rds_shape(name, password))
    counted = Counted(
        functools.partial(
            credentials.aws_secrets_manager, secret_id=secret.arn, endpoint_url=moto_url
        )
    )
    aliases(
        sm_single=good_server.database_settings(
            PASSWORD="", options={"password_provider": counted.provider()}
        )
    )
    assert who("sm_single") == name
    connections["sm_single"].close()
    assert who("sm_single") == name and counted.calls == 1  # cached for the ttl (300 s)
    connections["sm_single"].close()
    # The rotation: the server's password and the secret change; the cache still holds the old.
    secret.rotate(rds_shape(name, roles.set_password(name)))
    assert who("sm_single") == name
    assert counted.calls == 2 and [r["cause"] for r in retries] == ["rotated"]


def test_rotation_to_a_new_user_under_load_fails_no_request(
    moto_url: str,
    good_server: TLSPostgres,
    roles: Roles,
    aliases: Any,
    retries: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """4 threads on a pool; mid-run the secret moves to a new user (alternating users), and the
    old user's password is then changed, so new connections with the cached old answer are
    refused: every one of them must heal within its own connect."""
    blue, blue_password = roles.create()
    green, green_password = roles.create()
    secret = Secret(moto_url, rds_shape(blue, blue_password))
    counted = Counted(
        functools.partial(
            credentials.aws_secrets_manager, secret_id=secret.arn, endpoint_url=moto_url
        )
    )
    pool = {"min_size": 2, "max_size": 4, "timeout": 20}
    aliases(
        sm_load=good_server.database_settings(
            PASSWORD="", options={"password_provider": counted.provider(), "pool": pool}
        )
    )
    threads_count, seconds = 4, 6.0
    users: dict[str, int] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    rotated_at = threading.Event()

    def work() -> None:
        while time.monotonic() < stop and len(failures) < 5:
            try:
                user = who("sm_load")
                with lock:
                    users[user] = users.get(user, 0) + 1
            except BaseException as exc:
                with lock:
                    failures.append(exc)
            finally:
                connections.close_all()  # back to the pool

    threads = [threading.Thread(target=work) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    time.sleep(seconds / 3)
    secret.rotate(rds_shape(green, green_password))  # AWSCURRENT is green now
    roles.set_password(blue)  # the old user's password is gone: cached answers are stale
    rotated_at.set()
    for _ in range(3):  # the pool replaces its connections while requests keep coming
        connections["sm_load"].pool.drain()
        time.sleep(seconds / 9)
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:3]
    assert users.get(blue, 0) > 0 and users.get(green, 0) > 0, users
    assert {r["cause"] for r in retries} <= {"rotated"} and retries
    with capsys.disabled():  # the numbers, for the record
        print(
            f"\nSecrets Manager rotation under load: {sum(users.values())} requests by "
            f"{threads_count} threads in {seconds:.0f} s, 0 failed; as {blue!r} "
            f"{users[blue]}, as {green!r} {users[green]}; GetSecretValue calls "
            f"{counted.calls}; second chances {len(retries)}"
        )
    assert_no_secret(*(r["message"] for r in retries))
    for r in retries:
        assert blue_password not in r["message"] and green_password not in r["message"]

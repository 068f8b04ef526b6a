"""Fork safety (issue 12): a connection or pool opened before a fork is never used by the child.

Each child opens its own verified TLS connection (``pg_stat_ssl`` shows one backend per
process) and the parent's connection keeps working, because the child dropped the inherited
one without writing to it (a close would have sent a Terminate on the parent's session).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import quote, urlencode
from urllib.request import urlopen

import pytest
from django.db import connections

from secure_pg_backend.testing import APP_DB, APP_PASSWORD, APP_USER, TLSPostgres, free_port

CHILDREN = 2
APP_NAME = "spb-fork-test"

# Forking a process that has threads (the pool's) is the scenario under test (Python 3.12+ warns).
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")


def backend_facts(alias: str) -> dict[str, Any]:
    """This process's view: its backend, and the server's record of that backend's TLS."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pid, ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        pid, ssl, version = cursor.fetchone()
    info = connections[alias].tls_info
    return {"pid": os.getpid(), "backend": pid, "ssl": ssl, "version": version, "tls": info.tls}


@contextmanager
def forked_children(alias: str, count: int) -> Iterator[list[dict[str, Any]]]:
    """Fork ``count`` children that each run a query and report; they exit when we leave."""
    children: list[tuple[int, int, int]] = []  # (pid, read end of report, write end of "go")
    for _ in range(count):
        report_r, report_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                os.close(report_r)
                os.close(go_w)
                os.write(report_w, json.dumps(backend_facts(alias)).encode())
                os.close(report_w)
                os.read(go_r, 1)  # keep the connection open until the parent has looked
                status = 0
            finally:
                os._exit(status)
        os.close(report_w)
        os.close(go_r)
        children.append((pid, report_r, go_w))
    try:
        yield [json.loads(read_all(fd, timeout=30)) for _, fd, _ in children]
    finally:
        for _, report_r, go_w in children:
            os.close(report_r)
            os.write(go_w, b"x")  # not EOF: a later child holds a copy of this pipe's end
            os.close(go_w)
        for pid, _, _ in children:
            reap(pid)


def read_all(fd: int, timeout: float) -> bytes:
    deadline, data = time.monotonic() + timeout, b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                assert data, "the child reported nothing (it failed; see its stderr)"
                return data
            data += chunk
    raise AssertionError("a forked child did not report within the time limit")


def reap(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("a forked child did not exit")


def server_backends(server: TLSPostgres) -> dict[int, bool]:
    """Backend pid -> TLS, for every connection of this test, as the server sees them."""
    rows = server.admin_sql(
        "SELECT a.pid, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
        f"WHERE a.application_name = '{APP_NAME}'"
    )
    return dict(rows)


def settings_for(server: TLSPostgres, **options: Any) -> dict[str, Any]:
    return server.database_settings(options={"application_name": APP_NAME, **options})


def test_each_child_opens_its_own_verified_connection(
    aliases: Callable[..., None], good_server: TLSPostgres
) -> None:
    aliases(forked=settings_for(good_server))
    parent = backend_facts("forked")
    with forked_children("forked", CHILDREN) as children:
        seen = server_backends(good_server)
    backends = [child["backend"] for child in children]
    assert len(set(backends)) == CHILDREN and parent["backend"] not in backends
    assert all(
        child["ssl"] and child["tls"] and child["pid"] != parent["pid"] for child in children
    )
    # One backend per process, all TLS: the parent's and one per child.
    assert seen == {parent["backend"]: True, **dict.fromkeys(backends, True)}
    # The parent's session survived its children: same backend, still answering.
    assert backend_facts("forked")["backend"] == parent["backend"]


def test_each_child_builds_its_own_pool(
    aliases: Callable[..., None], good_server: TLSPostgres
) -> None:
    aliases(pooled_fork=settings_for(good_server, pool={"min_size": 2, "max_size": 2}))
    backend_facts("pooled_fork")
    parent_pool = connections["pooled_fork"].pool
    connections["pooled_fork"].close()  # back to the pool
    parent_pool.wait(timeout=10)  # both pooled connections open and idle
    backend_facts("pooled_fork")  # one of them checked out across the fork, one idle
    parent_backends = set(server_backends(good_server))
    assert len(parent_backends) == 2
    with forked_children("pooled_fork", CHILDREN) as children:
        seen = server_backends(good_server)
    child_backends = {child["backend"] for child in children}
    assert len(child_backends) == CHILDREN and not child_backends & parent_backends
    assert all(child["ssl"] and child["tls"] for child in children)
    # The parent's pooled connections are all still there, each child added its own, all TLS.
    assert parent_backends | child_backends <= set(seen) and all(seen.values())
    # Both of the parent's pooled sessions still answer, on the same backends.
    connections["pooled_fork"].close()
    assert connections["pooled_fork"].pool is parent_pool
    with parent_pool.connection() as first, parent_pool.connection() as second:
        answered = {
            conn.execute("SELECT pg_backend_pid()").fetchone()[0] for conn in (first, second)
        }  # type: ignore[index]
    assert answered == parent_backends


@pytest.mark.parametrize("pooled", [False, True], ids=["connection", "pool"])
def test_the_child_never_writes_to_the_inherited_session(
    aliases: Callable[..., None], good_server: TLSPostgres, pooled: bool
) -> None:
    """Even a child that closes everything (as Django's docs suggest) leaves the parent alone."""
    options = {"pool": {"min_size": 1, "max_size": 2}} if pooled else {}
    aliases(closing=settings_for(good_server, **options))
    parent = backend_facts("closing")
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            connections.close_all()
            if pooled:
                connections["closing"].close_pool()
            status = 0
        finally:
            os._exit(status)
    reap(pid)
    assert backend_facts("closing")["backend"] == parent["backend"]


# -- gunicorn --preload, sync workers, the example project, over HTTP ----------------------
ROOT = Path(__file__).resolve().parent.parent


def database_url(server: TLSPostgres, app_name: str) -> str:
    query = urlencode(
        {"sslmode": "verify-full", "sslrootcert": server.root_cert, "application_name": app_name}
    )
    return f"postgres://{APP_USER}:{quote(APP_PASSWORD)}@localhost:{server.port}/{APP_DB}?{query}"


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except HTTPError as error:
        return error.code, error.read()


@contextmanager
def gunicorn(server: TLSPostgres, app_name: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), DATABASE_URL=database_url(server, app_name))
    args = ["--preload", "--workers", "2", "--worker-class", "sync", "--bind", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *args, "--graceful-timeout", "5", APP],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                get(f"{base}/backend/", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        assert proc.poll() is None, "gunicorn did not start"
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


APP = "tests.support.gunicorn_app:application"


@pytest.mark.slow
def test_gunicorn_preload_workers_open_their_own_connections(good_server: TLSPostgres) -> None:
    with gunicorn(good_server, "spb-gunicorn-test") as (base, proc):
        # The example project's page, through Django's request cycle (which closes the
        # request's connection at the end: a worker still holding the master's would close it).
        for _ in range(4):
            status, body = get(f"{base}/tls/?format=json")
            assert status == 200, body
            assert json.loads(body)["default"]["protocol"].startswith("TLSv1.")
        # Two concurrent requests keep both sync workers busy at once.
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(get, [f"{base}/backend/?hold=0.5"] * 2))
        facts = [json.loads(body) for status, body in replies if status == 200]
        assert len(facts) == 2, replies
        seen = dict(
            good_server.admin_sql(
                "SELECT a.pid, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                "WHERE a.application_name = 'spb-gunicorn-test'"
            )
        )
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=15)
    preload = facts[0]["preload_backend"]
    workers = {f["worker"] for f in facts}
    backends = {f["backend"] for f in facts}
    assert len(workers) == 2 and facts[0]["preload_pid"] not in workers
    assert len(backends) == 2 and preload not in backends
    assert all(f["ssl"] for f in facts)
    # The master's connection outlived every request, and each worker's is its own, all TLS.
    assert seen.get(preload) is True and all(seen.get(b) is True for b in backends)
    assert proc.returncode == 0 and "Traceback" not in output, output

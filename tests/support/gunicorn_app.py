"""The example project as a ``gunicorn --preload`` app that uses the database before the fork.

Importing this module (in gunicorn's master) runs a query, as an app that warms up or reads
configuration from the database at import would; the connection is open when the workers
are forked. ``/backend/`` reports, from a worker, which server backend serves it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from django.db import connection

from example_project.wsgi import application as django_application

with connection.cursor() as cursor:
    cursor.execute("SELECT pg_backend_pid()")
    PRELOAD_BACKEND = cursor.fetchone()[0]
    PRELOAD_PID = os.getpid()


def backend(environ: dict[str, Any]) -> bytes:
    hold = float(parse_qs(environ.get("QUERY_STRING", "")).get("hold", ["0"])[0])
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        pid, ssl = cursor.fetchone()
    time.sleep(hold)  # keeps this (sync) worker busy, so a concurrent request goes elsewhere
    facts = {"worker": os.getpid(), "backend": pid, "ssl": ssl}
    facts.update(preload_backend=PRELOAD_BACKEND, preload_pid=PRELOAD_PID)
    return json.dumps(facts).encode()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/backend/":
        body = backend(environ)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    return django_application(environ, start_response)  # type: ignore[no-any-return]

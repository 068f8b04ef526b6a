"""Offline system checks: every policy rule, as ``manage.py check`` errors.

No network and no second copy of any rule: each alias whose wrapper carries the
policy is judged by the same gate the connection uses (``policy_verdict``), and
each ``Violation`` becomes one ``Error`` with id ``secure_pg_backend.<code>``.

With ``--deploy``, also every alias the policy does not reach although it speaks
PostgreSQL (W003): a stock ``postgresql``/``postgis`` ENGINE left over next to this one,
or a third-party wrapper without the mixin; and every alias whose own link goes without TLS
by an opt-in (W004: ``allow_local_proxy``, ``allow_unix_socket``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import load_backend

from .checkids import CHECKS, check_id
from .errors import InsecureConnectionError, SecurePolicyError, location, redact, secret_values

if TYPE_CHECKING:
    from .policy import Verdict

__all__ = [
    "check_databases",
    "check_deploy_aliases",
    "check_deploy_plaintext",
    "w005_relative_paths",
    "w006_transaction_pooler",
]

_POSTGIS_MODULE = "django.contrib.gis.db.backends.postgis.base"


def check_databases(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    from .aliases import standalone_wrapper
    from .base import VerifiedTLSMixin

    errors: list[CheckMessage] = []
    databases: dict[str, dict[str, Any]] = getattr(settings, "DATABASES", {})
    for alias, settings_dict in databases.items():
        try:
            wrapper = standalone_wrapper(alias, settings_dict)
        except ImproperlyConfigured:  # an ENGINE that does not load: Django reports it
            continue
        if not isinstance(wrapper, VerifiedTLSMixin):
            continue
        if wrapper.misassembled:  # Django's methods come first: the policy cannot run at all
            error = SecurePolicyError.misassembled(alias, wrapper.misassembled)
            (violation,) = error.violations
            errors.append(
                Error(
                    f"{location(alias, None)}: {violation.problem}",
                    hint=violation.fix,
                    obj=f"DATABASES[{alias!r}]",
                    id=check_id(violation.code),
                )
            )
            continue
        judged = wrapper.policy_verdict()
        verdict = judged.now()  # the files libpq opens, as they are now
        # Django prints the object, DATABASES['alias'], before each message: the message names
        # the host, not the alias again.
        where = f"host {verdict.host!r}: " if verdict.host else ""
        password = secret_values(wrapper.settings_dict)
        if not verdict.violations:
            errors.extend(_final_parameters(wrapper, alias))
        for violation in verdict.violations:
            errors.append(
                Error(
                    redact(f"{where}{violation.problem}", password),
                    hint=redact(violation.fix, password),
                    obj=f"DATABASES[{alias!r}]",
                    id=check_id(violation.code),
                )
            )
        warnings = [
            *w005_relative_paths(judged, verdict),
            *w006_transaction_pooler(wrapper.settings_dict, judged),
        ]
        errors += [
            Warning(
                redact(f"{where}{problem}", password),
                hint=redact(fix, password),
                obj=f"DATABASES[{alias!r}]",
                id=check_id(code),
            )
            for code, problem, fix in warnings
        ]
    return errors


def _final_parameters(wrapper: Any, alias: str) -> list[CheckMessage]:
    """E009 for what a subclass's ``get_connection_params`` makes of the judged parameters:
    the attempt pipeline's own judgment (``pipeline.judge``), without connecting."""
    from . import pipeline

    try:
        params = wrapper.get_connection_params()
        pipeline.judge(wrapper._plan(), params)
    except InsecureConnectionError as exc:
        return [Error(str(exc), obj=f"DATABASES[{alias!r}]", id=check_id("E009"))]
    except SecurePolicyError:  # reported above, from the same verdict
        return []
    return []


def w005_relative_paths(judged: Verdict, now: Verdict) -> list[tuple[str, str, str]]:
    """W005: each file setting given as a relative path, with where it resolves now. A path
    already reported as an error (missing, unusable) is not repeated: its error says it."""
    decision = judged.decision
    needs = decision.files if decision is not None else judged.files
    reported = " ".join(v.problem for v in now.violations)
    found = []
    for need in needs:
        if os.path.isabs(need.path) or repr(need.path) in reported:
            continue
        cwd = os.getcwd()
        found.append(
            (
                "W005",
                f"{need.origin} is {need.path!r}, a relative path: libpq opens it against the "
                f"current directory, now {cwd!r} (so {os.path.join(cwd, need.path)!r}), and "
                "a service manager, a container's working directory or a cron job starts "
                "Django elsewhere.",
                CHECKS["W005"].fix,
            )
        )
    return found


def w006_transaction_pooler(
    settings_dict: Mapping[str, Any], judged: Verdict
) -> list[tuple[str, str, str]]:
    """W006: a known transaction-mode pooler (by host and port, no round trip) while Django
    may open server-side cursors, which a transaction pooler cannot keep."""
    if settings_dict.get("DISABLE_SERVER_SIDE_CURSORS") or judged.decision is None:
        return []
    from .hosting import transaction_pooler

    params = judged.params or {}
    ports = [p.strip() for p in str(params.get("port") or "5432").split(",")]
    found = []
    for index, host in enumerate(judged.decision.hosts):
        port = ports[index] if index < len(ports) else ports[0]
        pooler = transaction_pooler(host, port)
        if pooler is not None:
            found.append(
                (
                    "W006",
                    f"{host}:{port} is {pooler}, and DISABLE_SERVER_SIDE_CURSORS is not set: "
                    "a server-side cursor (QuerySet.iterator()) outlives the transaction the "
                    'pooler lends a server connection for, and fails with cursor "_django_curs_'
                    '…" does not exist.',
                    CHECKS["W006"].fix,
                )
            )
    return found


def check_deploy_aliases(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[CheckMessage]:
    """W003: each alias whose wrapper class is Django's PostgreSQL one (or derived from it)
    but not ``VerifiedTLSMixin``. Judged by the class the ENGINE loads, not by its name; the
    class is not instantiated, so nothing connects."""
    from django.db.backends.postgresql.base import DatabaseWrapper as PostgresWrapper

    from .base import VerifiedTLSMixin

    entry = CHECKS["W003"]
    warnings: list[CheckMessage] = []
    databases: dict[str, dict[str, Any]] = getattr(settings, "DATABASES", {})
    for alias, settings_dict in databases.items():
        engine = settings_dict.get("ENGINE")
        if not isinstance(engine, str) or not engine:
            continue
        try:
            wrapper = load_backend(engine).DatabaseWrapper
        except (ImproperlyConfigured, AttributeError):  # Django reports an ENGINE that fails
            continue
        if not isinstance(wrapper, type) or not issubclass(wrapper, PostgresWrapper):
            continue
        if issubclass(wrapper, VerifiedTLSMixin):
            continue
        options = settings_dict.get("OPTIONS") or {}
        sslmode = options.get("sslmode") if isinstance(options, dict) else None
        if isinstance(sslmode, str):
            mode = f"its OPTIONS['sslmode'] is {sslmode!r}"
        else:
            mode = (
                "it sets no sslmode: libpq's default (PGSSLMODE, else 'prefer') can fall back "
                "to plaintext"
            )
        message = (  # Django prints DATABASES['alias'] (the object) first
            f"ENGINE {engine!r} ({_class_name(wrapper)}) is a "
            "PostgreSQL backend without secure_pg_backend's policy: its connections are not "
            "held to verified TLS (verify-full, a root of trust, the live link checked); "
            f"{mode}."
        )
        warnings.append(
            Warning(
                redact(message, secret_values(settings_dict)),
                hint=_fix(wrapper, PostgresWrapper),
                obj=f"DATABASES[{alias!r}]",
                id=entry.id,
            )
        )
    return warnings


_PLAINTEXT_OPT_INS = {
    "allow_local_proxy": "plaintext TCP to a local proxy that does the TLS to the server",
    "allow_unix_socket": "a Unix-domain socket without TLS",
}


def check_deploy_plaintext(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[CheckMessage]:
    """W004: each alias of this backend that relies on an opt-in without TLS on its own link.

    Read from the settings as written (no wrapper, no connection): an opt-in that the policy
    refuses anyway is reported by its own error too.
    """
    entry = CHECKS["W004"]
    warnings: list[CheckMessage] = []
    databases: dict[str, dict[str, Any]] = getattr(settings, "DATABASES", {})
    for alias, settings_dict in databases.items():
        options = settings_dict.get("OPTIONS") or {}
        if not isinstance(options, dict) or not _ours(settings_dict):
            continue
        used = [key for key in _PLAINTEXT_OPT_INS if options.get(key) is True]
        if not used:
            continue
        what = "; ".join(f"OPTIONS[{key!r}] = True ({_PLAINTEXT_OPT_INS[key]})" for key in used)
        where = location(alias, settings_dict.get("HOST") or None)
        warnings.append(
            Warning(
                redact(
                    f"{where} relies on {what}: the password and the data cross this "
                    "machine without TLS, protected only by who else can reach that port or "
                    "socket.",
                    secret_values(settings_dict),
                ),
                hint=entry.fix,
                obj=f"DATABASES[{alias!r}]",
                id=entry.id,
            )
        )
    return warnings


def _ours(settings_dict: dict[str, Any]) -> bool:
    """Whether the ENGINE's wrapper carries this policy (by class, as W003 judges)."""
    from .base import VerifiedTLSMixin

    engine = settings_dict.get("ENGINE")
    if not isinstance(engine, str) or not engine:
        return False
    try:
        wrapper = load_backend(engine).DatabaseWrapper
    except (ImproperlyConfigured, AttributeError):
        return False
    return isinstance(wrapper, type) and issubclass(wrapper, VerifiedTLSMixin)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fix(wrapper: type, stock: type) -> str:
    # A PostGIS wrapper was loaded with its module: judged by the class, never by importing
    # GeoDjango (and GDAL) for an alias that does not use it.
    postgis = sys.modules.get(_POSTGIS_MODULE)
    stock_postgis = getattr(postgis, "DatabaseWrapper", None)
    if wrapper is stock:
        return "Set its ENGINE to 'secure_pg_backend'."
    if wrapper is stock_postgis:
        return "Set its ENGINE to 'secure_pg_backend.postgis'."
    base = (
        "secure_pg_backend.postgis"
        if stock_postgis and issubclass(wrapper, stock_postgis)
        else "secure_pg_backend"
    )
    return (
        f"Compose the policy into this wrapper: class DatabaseWrapper(VerifiedTLSMixin, "
        f"{_class_name(wrapper)}) with VerifiedTLSMixin from secure_pg_backend.base, first in "
        f"the bases; or, without its features, set ENGINE to {base!r}."
    )

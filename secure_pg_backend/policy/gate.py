"""The gate: one alias's settings to the keywords for ``psycopg.connect``, or a refusal.

Judged once per settings (the wrapper caches it while the settings and the environment libpq
reads are unchanged), before any network I/O; the attempt pipeline judges the final
parameters again at every connect (``pipeline.judge``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .. import libpq
from ..errors import Violation
from ..files import check_files, service_file_needs
from .providers import provider_violation
from .rules import evaluate
from .screening import screen
from .terms import BACKEND_OPTIONS, DEFAULT_CONNECT_TIMEOUT, Decision, Request, Verdict

__all__ = [
    "e009_assembled",
    "final_parameters",
    "judge",
]


def final_parameters(
    decision: Decision, req: Request, compiled: Mapping[str, str | None]
) -> dict[str, str]:
    """The keywords handed to libpq: everything it resolved that matters, made explicit.

    Values from the environment or a service file are passed explicitly too (where
    they differ from libpq's compiled default), so the connection libpq makes is the
    one judged here: nothing is left for it to look up again that could differ.
    """
    params = {
        key: value
        for key, value in req.resolved.items()
        if key in req.explicit or value != compiled.get(key)
    }
    if "service" in req.explicit:
        params["service"] = req.explicit["service"]
    # libpq waits for ever by default: an address that accepts TCP and never answers
    # would hold a request (and a pool worker) for minutes. An explicit value, 0 too, wins.
    params.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    params.update(decision.forced)
    return params


def e009_assembled(decision: Decision, parsed: Mapping[str, str]) -> Violation | None:
    """The assembled connection string, read back by libpq's parser, carries the policy."""
    for key, value in decision.forced.items():
        if parsed.get(key, "") != value:
            return Violation(
                "E009",
                f"libpq would read {key}={parsed.get(key)!r} from the connection string "
                f"instead of {value!r}.",
                "remove the setting that changes it; only exact libpq keywords are accepted.",
            )
    return None


# -- the gate: one alias's settings to the keywords for psycopg.connect, or a refusal ----------
# The exact parameters psycopg will hand libpq, judged before any network I/O. Input: one
# DATABASES entry and the parameters Django's ``get_connection_params`` built from it. Steps:
# screen keys and characters (``screen``); let libpq resolve the libpq keywords (service file,
# environment, defaults) without I/O; apply the rules to what libpq resolved; make every
# resolved value explicit, add the forced keywords, and read the string psycopg will assemble
# back through libpq's own parser. The result is the keyword dict for ``psycopg.connect`` or a
# ``SecurePolicyError``.


def _as_text(value: Any) -> str:
    # What psycopg's make_conninfo sends for a value (it calls str()).
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _origins(settings_dict: Mapping[str, Any]) -> dict[str, str]:
    fields = {"host": "HOST", "port": "PORT", "dbname": "NAME", "user": "USER"}
    return {key: field for key, field in fields.items() if settings_dict.get(field)}


def _request(
    alias: str,
    settings_dict: Mapping[str, Any],
    explicit: dict[str, str],
    resolved: Mapping[str, str],
) -> Request:
    return Request(
        alias=alias,
        explicit=explicit,
        resolved=resolved,
        options=settings_dict.get("OPTIONS") or {},
        environ=os.environ,
        keywords=libpq.keywords(),
        origins=_origins(settings_dict),
        envvars=libpq.keyword_variables(),
    )


def judge(alias: str, settings_dict: Mapping[str, Any], conn_params: Mapping[str, Any]) -> Verdict:
    """Decide for one connection; never raises for a policy reason (see ``Verdict``)."""
    screened = screen(settings_dict, libpq.keywords(), libpq.secret_keywords())
    provider = provider_violation(alias, settings_dict)
    if provider is not None:
        screened.append(provider)
    if screened:
        return Verdict(alias, settings_dict.get("HOST") or None, tuple(screened))
    keywords = libpq.keywords()
    explicit = {k: _as_text(v) for k, v in conn_params.items() if k in keywords and v is not None}
    # libpq reads a named service's files while resolving, holding the GIL: a FIFO there
    # would freeze the process, so they are looked at first (and never cached, see base).
    service = explicit.get("service") or os.environ.get("PGSERVICE")
    blocked = check_files(service_file_needs(service, os.environ))
    if blocked:
        return Verdict(alias, settings_dict.get("HOST") or None, file_violations=blocked)
    resolution = libpq.resolve(explicit)
    if resolution.error and not resolution.values:  # nothing resolved: libpq's reason only
        return Verdict(
            alias, settings_dict.get("HOST") or None, (_libpq_refused(resolution.error),)
        )
    request = _request(alias, settings_dict, explicit, resolution.values)
    evaluation = evaluate(request)
    violations = evaluation.violations
    if resolution.error and not violations:
        violations = (_libpq_refused(resolution.error),)
    if violations or evaluation.decision is None:
        return Verdict(alias, evaluation.host, violations, files=evaluation.files)
    decision = evaluation.decision
    final = final_parameters(decision, request, libpq.compiled_defaults())
    assembled = e009_assembled(decision, libpq.parse(libpq.conninfo(final)))
    if assembled is not None:
        return Verdict(alias, evaluation.host, (assembled,))
    others = {
        k: v for k, v in conn_params.items() if k not in keywords and k not in BACKEND_OPTIONS
    }
    return Verdict(alias, evaluation.host, (), decision, {**final, **others})


def _libpq_refused(message: str) -> Violation:
    return Violation("E013", f"libpq cannot use these parameters: {message}.")

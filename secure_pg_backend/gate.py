"""The gate: the exact parameters psycopg will hand libpq, judged before any network I/O.

Input: one DATABASES entry and the parameters Django's ``get_connection_params``
built from it. Steps: screen keys and characters (``inputs``); let libpq resolve the
libpq keywords (service file, environment, defaults) without I/O; apply the policy
to what libpq resolved; make every resolved value explicit, add the forced keywords,
and read the string psycopg will assemble back through libpq's own parser. The
result is the keyword dict for ``psycopg.connect`` or a ``SecurePolicyError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import credentials, inputs, libpq, policy
from .errors import SecurePolicyError, Violation
from .policy import Decision


class Verdict(policy.Evaluation):
    """The gate's answer: the policy's evaluation, plus the parameters for psycopg.connect
    when the connection is allowed."""

    __slots__ = ("params",)

    def __init__(
        self,
        alias: str,
        host: str | None,
        violations: tuple[Violation, ...] = (),
        decision: Decision | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(alias, host, violations, decision)
        self.params = params

    def raise_if_refused(self, password: object = None) -> None:
        if self.decision is None:
            raise SecurePolicyError(self.alias, self.host, self.violations, password=password)


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
) -> policy.Request:
    return policy.Request(
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
    screened = inputs.screen(settings_dict, libpq.keywords())
    provider = credentials.provider_violation(alias, settings_dict)
    if provider is not None:
        screened.append(provider)
    if screened:
        return Verdict(alias, settings_dict.get("HOST") or None, tuple(screened))
    keywords = libpq.keywords()
    explicit = {k: _as_text(v) for k, v in conn_params.items() if k in keywords and v is not None}
    resolution = libpq.resolve(explicit)
    if resolution.error and not resolution.values:  # nothing resolved: libpq's reason only
        return Verdict(
            alias, settings_dict.get("HOST") or None, (_libpq_refused(resolution.error),)
        )
    request = _request(alias, settings_dict, explicit, resolution.values)
    evaluation = policy.evaluate(request)
    violations = evaluation.violations
    if resolution.error and not violations:
        violations = (_libpq_refused(resolution.error),)
    if violations or evaluation.decision is None:
        return Verdict(alias, evaluation.host, violations)
    decision = evaluation.decision
    final = policy.final_parameters(decision, request, libpq.compiled_defaults())
    assembled = policy.e009_assembled(decision, libpq.parse(libpq.conninfo(final)))
    if assembled is not None:
        return Verdict(alias, evaluation.host, (assembled,))
    others = {
        k: v
        for k, v in conn_params.items()
        if k not in keywords and k not in policy.BACKEND_OPTIONS
    }
    return Verdict(alias, evaluation.host, (), decision, {**final, **others})


def _libpq_refused(message: str) -> Violation:
    return Violation(
        "E013",
        f"libpq cannot use these parameters: {message}.",
        "correct the setting libpq names (a service name must exist in pg_service.conf; "
        "host, hostaddr and port lists must have matching lengths).",
    )

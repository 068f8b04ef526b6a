"""The gate: the exact parameters psycopg will hand libpq, judged before any network I/O.

Input: one DATABASES entry and the parameters Django's ``get_connection_params``
built from it. Steps: screen keys and characters (``policy.screen``); let libpq resolve the
libpq keywords (service file, environment, defaults) without I/O; apply the policy
to what libpq resolved; make every resolved value explicit, add the forced keywords,
and read the string psycopg will assemble back through libpq's own parser. The
result is the keyword dict for ``psycopg.connect`` or a ``SecurePolicyError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import credentials, libpq, policy
from .errors import SecurePolicyError, Violation
from .policy import Decision


class Verdict(policy.Evaluation):
    """The gate's answer: the policy's evaluation, plus the parameters for psycopg.connect
    when the connection is allowed.

    ``violations`` are about the configuration and may be cached with it. The state of the
    files libpq opens is not part of it: ``file_violations`` holds what the gate found
    before resolving a service (service files), and ``check_files`` looks again, at every
    physical connection.
    """

    __slots__ = ("file_violations", "params")

    def __init__(
        self,
        alias: str,
        host: str | None,
        violations: tuple[Violation, ...] = (),
        decision: Decision | None = None,
        params: Mapping[str, Any] | None = None,
        file_violations: tuple[Violation, ...] = (),
        files: tuple[policy.FileNeed, ...] = (),
    ) -> None:
        super().__init__(alias, host, violations, decision, files)
        self.params = params
        self.file_violations = file_violations

    def check_files(self) -> tuple[Violation, ...]:
        """The file rules, now: ``stat`` only, never cached."""
        return self.file_violations or policy.check_files(self.files)

    def now(self) -> Verdict:
        """This verdict with the files' current state: what the checks and dbshell report."""
        files = self.check_files()
        if not files:
            return self
        return Verdict(self.alias, self.host, self.violations + files)

    def raise_if_refused(self, password: object = None) -> None:
        """Offline callers (dbshell): refuse on the configuration and the files alike."""
        verdict = self.now()
        if verdict.decision is None:
            raise SecurePolicyError(self.alias, self.host, verdict.violations, password=password)


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
    screened = policy.screen(settings_dict, libpq.keywords(), libpq.secret_keywords())
    provider = credentials.provider_violation(alias, settings_dict)
    if provider is not None:
        screened.append(provider)
    if screened:
        return Verdict(alias, settings_dict.get("HOST") or None, tuple(screened))
    keywords = libpq.keywords()
    explicit = {k: _as_text(v) for k, v in conn_params.items() if k in keywords and v is not None}
    # libpq reads a named service's files while resolving, holding the GIL: a FIFO there
    # would freeze the process, so they are looked at first (and never cached, see base).
    service = explicit.get("service") or os.environ.get("PGSERVICE")
    blocked = policy.check_files(policy.service_file_needs(service, os.environ))
    if blocked:
        return Verdict(alias, settings_dict.get("HOST") or None, file_violations=blocked)
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
        return Verdict(alias, evaluation.host, violations, files=evaluation.files)
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
    return Violation("E013", f"libpq cannot use these parameters: {message}.")

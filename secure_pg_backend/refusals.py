"""From a failed attempt to what the caller is told: the refusal, worded for a terminal, with
what the server presented (``diagnose``, only after libpq refused) and the hints for this setup;
and ``explanation``, one check id or refusal cause in words (``python -m secure_pg_backend
explain``, ``manage.py dbtls --explain``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .causes import BY_NAME, PGBOUNCER_PORT, REFUSAL, Cause, attempts, cause_of, classify
from .certificates import certificate_text
from .checkids import CHECKS, EXPLAIN, PREFIX, CheckId
from .errors import InsecureConnectionError, link_message, redact, relative_note

__all__ = ["explain", "explanation", "explanation_index"]


def _plain(markdown: str) -> str:
    # The meanings are Markdown for docs/checks.md; a terminal gets them without code marks.
    return markdown.replace("`", "")


def _refusal_causes() -> tuple[Cause, ...]:
    """The refusals a connection attempt can end in (``InsecureConnectionError.cause``), each
    with its problem and fix: E010's causes."""
    return tuple(BY_NAME.values())


def _where(entry: CheckId) -> str:
    if entry.online:
        return "manage.py check --database ALIAS (and before migrate); it connects"
    if entry.deploy:
        return "manage.py check --deploy"
    return (
        "every manage.py check, offline; opening a connection with these settings is refused "
        "the same way"
    )


def explanation(name: str) -> str:
    """What a check id (``E010``, ``secure_pg_backend.E010``, ``e010``) or a refusal cause
    (``untrusted``) means and how to fix it; a ``LookupError`` saying what exists otherwise."""
    key = name.strip()
    if key.lower().startswith(PREFIX):
        key = key[len(PREFIX) :]
    entry = CHECKS.get(key.upper())
    if entry is not None:
        lines = [
            f"{entry.id}: {entry.kind}",
            f"Reported by: {_where(entry)}.",
            f"What it means: {_plain(entry.meaning)}.",
            f"Fix: {entry.fix}",
        ]
        if entry.code == "E010":
            lines.append(f"The refusal names one of these causes ({EXPLAIN} CAUSE for one):")
            lines += [
                f"  {cause.name}: {cause.problem} Fix: {cause.fix}" for cause in _refusal_causes()
            ]
        return "\n".join(lines) + "\n"
    for cause in _refusal_causes():
        if cause.name == key.lower():
            return (
                f"{cause.name} (a refusal: {CHECKS['E010'].id} in manage.py check --database)\n"
                f"What it means: {cause.problem}\nFix: {cause.fix}\n"
            )
    import difflib  # only for a name that is not known: not on every process start

    known = [*CHECKS, *(cause.name for cause in _refusal_causes())]
    close = difflib.get_close_matches(key.upper() if key[:1].isupper() else key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise LookupError(
        f"{name!r} is neither a check id nor a refusal cause of secure_pg_backend{hint}; "
        f"'{EXPLAIN}' lists them all."
    )


def explanation_index() -> str:
    """Every check id and refusal cause, one line each."""
    width = len(PREFIX) + 4
    lines = [f"{c.id:<{width}}  {c.kind:<16}  {_plain(c.meaning)}" for c in CHECKS.values()]
    lines += [
        f"{cause.name:<{width}}  {'refusal (E010)':<16}  {cause.problem}"
        for cause in _refusal_causes()
    ]
    return "\n".join(lines) + "\n"


def explain(
    exc: BaseException,
    alias: str,
    host: str | None,
    secrets: object = None,
    *,
    decision: Any = None,  # policy.Decision: the hosts, the root of trust, the way in
    params: Mapping[str, Any] | None = None,  # the parameters the attempt was given
) -> InsecureConnectionError | None:
    """A refusal, as an error naming the alias, the host, what is wrong and the fix, then the
    details: the certificate the server presented (``diagnose``, only here, after libpq
    refused), hints for this setup, libpq's words.

    None for everything else: the caller raises the original exception, as stock does.
    """
    if isinstance(exc, InsecureConnectionError):
        return exc
    cause = classify(exc)
    if cause is None or cause.kind != REFUSAL:
        return None
    text = str(exc)
    problem, fix, details = cause.problem, cause.fix, []
    found = _diagnosis(text, cause, decision, params)
    if found is not None:
        problem, fix = found.problem or problem, found.fix or fix
        details.extend(found.details)
    details += _hints(text, cause, decision, details)
    details.append(f"libpq said: {' '.join(text.split())}.")
    message = link_message(alias, host, problem, fix, details)
    # Each line escaped on its own: libpq's words and the certificate's names are the peer's
    # (a newline there is escaped), the line breaks between the details are this message's.
    safe = "\n".join(certificate_text(line) for line in redact(message, secrets).split("\n"))
    return InsecureConnectionError(safe, alias=alias, host=host, cause=cause.name)


def _diagnosis(text: str, cause: Cause, decision: Any, params: Mapping[str, Any] | None) -> Any:
    """What the certificate says (a ``diagnose.Diagnosis``), or None when there is nothing to
    look at; never an error: the refusal is raised whatever happens here."""
    if cause.name not in ("untrusted", "hostname") or decision is None:
        return None
    segment = next((s for s in attempts(text) if cause_of(s) is cause), text)
    try:
        from . import diagnose  # only after a refusal: the success path never imports it

        return diagnose.diagnose(segment, cause.name, decision, params or {})
    except Exception as exc:  # a bug in the diagnosis must not hide the refusal
        import logging  # only when the diagnosis itself failed

        logging.getLogger("secure_pg_backend").debug("diagnosing the refusal failed: %r", exc)
        return None


def _hints(text: str, cause: Cause, decision: Any, details: Sequence[str]) -> list[str]:
    """What this setup adds to a cause's fix: where a relative root file resolved; a
    PgBouncer on its default port."""
    hints = []
    root = getattr(decision, "root_cert", "") or ""
    if cause.name in ("untrusted", "root_file", "hostname") and not any(
        "relative path" in line for line in details
    ):
        note = relative_note(root)
        if note:
            hints.append(f"The root certificate file{note}")
    if cause.name == "no_tls" and f"port {PGBOUNCER_PORT} " in text.replace("failed", " "):
        hints.append(
            f"Port {PGBOUNCER_PORT} is PgBouncer's default: if that is what listens there, "
            "the fix is in pgbouncer.ini (client_tls_sslmode, client_tls_cert_file, "
            "client_tls_key_file), not in postgresql.conf."
        )
    return hints

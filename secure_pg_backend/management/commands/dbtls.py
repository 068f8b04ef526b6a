"""``manage.py dbtls``: psql's SSL banner for every alias; exit 0 only if all are verified TLS.

Meant for humans and for readiness/startup probes: the exit status says whether
every selected alias connected under the policy, stderr says why one did not.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from ...base import VerifiedTLSMixin, verified_aliases
from ...certificates import certificate_text
from ...errors import InsecureConnectionError, redact, secret_values, without_alias
from ...refusals import explanation, explanation_index
from ...retry import attempt_once
from ...tlsinfo import TLSInfo
from ...validation import failure_cause

__all__ = [
    "Command",
]


class Command(BaseCommand):
    help = (
        "Connect every database alias that uses secure_pg_backend (or only --database) and "
        "show the negotiated TLS. Exits non-zero if any alias did not connect under the policy."
    )
    requires_system_checks: list[str] = []  # a probe must not fail on unrelated checks

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            help="Only this alias (repeatable). Default: every alias using secure_pg_backend.",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print a JSON object keyed by alias."
        )
        parser.add_argument(
            "--explain",
            nargs="?",
            const="",
            metavar="ID",
            help=(
                "Connect nothing; print what a check id (E010) or refusal cause (untrusted) "
                "means and its fix, or every one without ID (as python -m secure_pg_backend "
                "explain)."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["explain"] is not None:
            self._explain(options["explain"])
            return
        ours = verified_aliases()
        selected: list[str] = options["databases"] or ours
        for alias in selected:
            if alias not in connections:
                raise CommandError(
                    f"Database alias {alias!r} is not in DATABASES (aliases: "
                    f"{', '.join(connections)}); fix --database."
                )
            if alias not in ours:
                raise CommandError(
                    f"Database alias {alias!r} does not use the secure_pg_backend ENGINE "
                    f"(aliases that do: {', '.join(ours) or 'none'}); fix --database or "
                    "set its ENGINE to 'secure_pg_backend'."
                )
        if not selected:
            raise CommandError(
                "No database alias uses the secure_pg_backend ENGINE; set "
                "DATABASES[alias]['ENGINE'] = 'secure_pg_backend'."
            )

        report: dict[str, dict[str, Any]] = {}
        failed: list[str] = []
        for alias in selected:
            info, error = self._probe(alias)
            if info is not None:
                report[alias] = info.as_dict()
                if not options["json"]:
                    self.stdout.write(info.status_line())
            else:
                cause, message = error
                failed.append(f"{alias} ({cause})")
                report[alias] = {"error": message, "cause": cause}
                self.stderr.write(f"{alias}: FAILED ({cause}): {message}")
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, sort_keys=True))
        if failed:
            raise CommandError(
                f"{len(failed)} of {len(selected)} database aliases failed: {', '.join(failed)}",
                returncode=1,
            )

    def _explain(self, name: str) -> None:
        try:
            text = explanation(name) if name else explanation_index()
        except LookupError as exc:
            raise CommandError(exc.args[0], returncode=2) from None
        self.stdout.write(text, ending="")

    def _probe(self, alias: str) -> tuple[TLSInfo | None, tuple[str, str]]:
        wrapper = connections[alias]
        assert isinstance(wrapper, VerifiedTLSMixin)  # handle() selected only these
        opened_here = wrapper.connection is None
        try:
            with attempt_once():  # a probe reports the state now; its orchestrator retries
                return wrapper.tls_info, ("", "")
        except (DatabaseError, ImproperlyConfigured) as exc:
            cause = failure_cause(exc)
            # Its lines kept (a refusal's details are indented below its first line), each
            # on one line; the alias named once, by the label this command puts before it.
            lines = (" ".join(line.split()) for line in str(exc).split("\n"))
            text = "\n  ".join(line for line in lines if line)
            host = getattr(exc, "host", None)
            if host is not None or isinstance(exc, InsecureConnectionError):
                text = without_alias(text, alias, host)
            text = redact(text, secret_values(wrapper.settings_dict))
            # libpq may quote a certificate: each line escaped (the line breaks are ours)
            return None, (cause, "\n".join(certificate_text(x) for x in text.split("\n")))
        finally:
            # Leave a connection the caller already had (e.g. call_command in a request) open.
            if opened_here:
                wrapper.close()

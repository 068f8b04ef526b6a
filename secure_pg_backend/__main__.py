"""``python -m secure_pg_backend explain [ID]``: what a check id or refusal means, and its fix.

Messages name this command instead of a documentation page: the wheel ships no docs. The
text comes from the table every message is made from (``checkids.CHECKS`` and the refusal
causes), so no Django settings are needed: it works before any project is configured.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .checkids import EXPLAIN
from .refusals import explanation, explanation_index

__all__ = [
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m secure_pg_backend",
        description="The secure_pg_backend Django database backend's command-line help.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    explain = commands.add_parser(
        "explain",
        help="what a check id (E010, secure_pg_backend.E010) or refusal cause means, and the fix",
        description=(
            "Print what a check id or refusal cause means and how to fix it; "
            "without one, list them all, one line each."
        ),
    )
    explain.add_argument("id", nargs="?", help="E010, secure_pg_backend.E010, e010 or untrusted")
    args = parser.parse_args(argv)
    if args.id is None:
        sys.stdout.write(explanation_index())
        return 0
    try:
        sys.stdout.write(explanation(args.id))
    except LookupError as exc:
        sys.stderr.write(f"{EXPLAIN}: {exc.args[0]}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Screening: which keys and characters a DATABASES entry may hold at all (E009, E011),
before anything reads it. Pure functions; the libpq keyword list is passed in."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ..compat import NEWER_KEYWORDS, too_new_violation
from ..errors import Violation, option_name
from .terms import (
    BACKEND_OPTIONS,
    WEAKENING_KEYWORDS,
)

__all__ = [
    "DJANGO_OPTIONS",
    "FIELDS",
    "POOL_BYPASSES",
    "PSYCOPG_ARGUMENTS",
    "allowed_keys",
    "control_character",
    "screen",
]

# -- screening: allowed keys and characters (E009, E011), before anything reads the entry ----
# psycopg escapes values but not keys, and libpq skips whitespace around a key and lets
# a later duplicate win, so ``" sslmode"`` would override ``"sslmode"``. libpq also
# receives the connection string as a C string, so a NUL byte in any value cuts off
# everything after it, the forced keywords included. Hence an allowlist: every OPTIONS
# key is exactly a libpq keyword (libpq's own list), a psycopg or Django connection
# argument, or one of this backend's; no field holds a control character. Pure
# functions; the libpq keyword list is passed in (``screen``, the gate's first step).

# Arguments of psycopg.Connection.connect that are not libpq keywords.
PSYCOPG_ARGUMENTS = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)
# OPTIONS keys Django's postgresql backend reads and removes before connecting.
DJANGO_OPTIONS = frozenset({"pool", "server_side_binding", "isolation_level", "assume_role"})
# Pool arguments that would bypass the parameters judged here.
POOL_BYPASSES = frozenset({"conninfo", "kwargs"})
FIELDS = ("HOST", "PORT", "NAME", "USER", "PASSWORD")

_SCALARS = (str, bytes, int, float, os.PathLike)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def allowed_keys(keywords: frozenset[str]) -> frozenset[str]:
    # Weakening keywords pass here so the policy refuses them with the specific reason
    # (E007), even where this libpq does not know them.
    return keywords | PSYCOPG_ARGUMENTS | DJANGO_OPTIONS | BACKEND_OPTIONS | set(WEAKENING_KEYWORDS)


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, os.PathLike):
        return str(os.fspath(value))
    return None


def control_character(value: Any) -> str | None:
    """The first control character in a text value, as its repr (for messages), or None."""
    text = _text(value)
    match = _CONTROL.search(text) if text is not None else None
    return repr(match.group()) if match else None


def _character_violation(name: str, value: Any, secret: bool) -> Violation | None:
    found = control_character(value)
    if found is None:
        return None
    shown = "" if secret else f" ({value!r})"
    return Violation(
        "E011",
        f"{name}{shown} contains the control character {found}; libpq reads values as C "
        "strings, so a NUL would cut off the TLS settings that follow it.",
        f"remove the character from {name}.",
    )


def _shape_violation(
    name: str, key: Any, value: Any, keywords: frozenset[str], secret: bool
) -> Violation | None:
    # psycopg would send str() of anything; a list (a repeated DATABASE_URL query key, as
    # dj-database-url returns it) would reach libpq as "[5, 5]".
    if key not in keywords or value is None or isinstance(value, _SCALARS):
        return None
    return Violation(
        "E011",
        f"{name} is a {type(value).__name__}{'' if secret else f' ({value!r})'}; libpq takes "
        "exactly one value.",
        f"give {name} one value (in a DATABASE_URL: the query key once).",
    )


def _nested(prefix: str, options: Mapping[Any, Any]) -> Iterator[tuple[str, Any, Any]]:
    for key, value in options.items():
        yield f"{prefix}[{key!r}]", key, value


def _key_violation(name: str, key: Any, allowed: frozenset[str]) -> Violation | None:
    if isinstance(key, str) and key in allowed:
        return None
    if isinstance(key, str) and key in NEWER_KEYWORDS:  # a real keyword, for a newer libpq
        return too_new_violation(name, key)
    if key == "conninfo":
        return Violation(
            "E009",
            f"{name} is not accepted: a connection string would reach libpq unchecked.",
            "give each libpq keyword as its own OPTIONS key (host, port, sslrootcert, ...).",
        )
    guess = difflib.get_close_matches(str(key).strip().lower(), sorted(allowed), n=1)
    suggestion = f"did you mean {guess[0]!r}?" if guess else "see libpq's parameter list"
    fix = f"use the exact keyword ({suggestion}) or remove it."
    if isinstance(key, str) and key != key.strip():
        fix += " In a DATABASE_URL, '+' and '%20' in a query key decode to spaces."
    return Violation(
        "E009",
        f"{name} is not a libpq keyword, a psycopg or Django connection argument, or an "
        "option of this backend; libpq would skip the whitespace around a key and let a "
        "later duplicate override the TLS settings.",
        fix,
    )


def _pool_violations(pool: Any) -> Iterator[Violation | None]:
    if not isinstance(pool, Mapping):
        return
    for name, key, value in _nested("OPTIONS['pool']", pool):
        if key in POOL_BYPASSES:
            yield Violation(
                "E009",
                f"{name} is not accepted: the pool would hand it to libpq unchecked.",
                "put libpq keywords directly in OPTIONS; the pool uses those.",
            )
        yield _character_violation(name, value, secret=False)


def screen(
    settings_dict: Mapping[str, Any],
    keywords: frozenset[str],
    secret_keywords: frozenset[str] = frozenset(),
) -> list[Violation]:
    """Every key and character problem in one DATABASES entry.

    Values are never echoed for PASSWORD, for the keywords libpq marks secret
    (``libpq.secret_keywords``, passed in) or for keys this libpq does not know (a
    newer libpq's secret, say ``oauth_client_secret`` on libpq 15, is refused by name).
    """
    found: list[Violation | None] = [
        _character_violation(field, settings_dict.get(field), secret=field == "PASSWORD")
        for field in FIELDS
    ]
    options = settings_dict.get("OPTIONS") or {}
    allowed = allowed_keys(keywords)
    for name, key, value in _nested("OPTIONS", options):
        secret = key in secret_keywords or key not in allowed
        found.append(_key_violation(_named(key, name), key, allowed))
        found.append(_character_violation(_named(key, name), value, secret=secret))
        found.append(_shape_violation(_named(key, name), key, value, keywords, secret))
    found.extend(_pool_violations(options.get("pool")))
    return [v for v in found if v is not None]


def _named(key: Any, fallback: str) -> str:
    return option_name(key) if isinstance(key, str) and key.isidentifier() else fallback

"""The TLS policy: one alias's settings in, the parameters forced on libpq (or a refusal) out.

Judged once per settings, before any I/O: ``judge`` (``gate``) screens the entry
(``screening``), lets libpq resolve the parameters, applies the rules (``rules``) to what libpq
resolved (``terms.Request``) and returns a ``Verdict`` holding the ``Decision`` (what every
connection of the alias forces) and the keywords for ``psycopg.connect``. What is checked at
each connection instead (the files libpq opens, a provider's credentials) is ``files`` and
``provider``, which the attempt pipeline calls. The narrative: docs/development.md.
"""

from .gate import e009_assembled, final_parameters, judge
from .providers import has_provider, load_provider, provider_name, provider_violation
from .rules import RULES, direct_key, evaluate, root_of_trust
from .screening import PSYCOPG_ARGUMENTS, control_character, screen
from .terms import (
    ALLOW_LEGACY_CIPHERS,
    ALLOW_LOCAL_PROXY,
    ALLOW_UNIX_SOCKET,
    BACKEND_OPTIONS,
    CONNECT_RETRY,
    GSSENCMODE,
    NEGOTIATION,
    PASSWORD_PROVIDER,
    PROTOCOL_RANK,
    SSLMODE,
    Decision,
    DirectKey,
    Request,
    Verdict,
    is_socket_host,
)

__all__ = [
    "ALLOW_LEGACY_CIPHERS",
    "ALLOW_LOCAL_PROXY",
    "ALLOW_UNIX_SOCKET",
    "BACKEND_OPTIONS",
    "CONNECT_RETRY",
    "GSSENCMODE",
    "NEGOTIATION",
    "PASSWORD_PROVIDER",
    "PROTOCOL_RANK",
    "PSYCOPG_ARGUMENTS",
    "RULES",
    "SSLMODE",
    "Decision",
    "DirectKey",
    "Request",
    "Verdict",
    "control_character",
    "direct_key",
    "e009_assembled",
    "evaluate",
    "final_parameters",
    "has_provider",
    "is_socket_host",
    "judge",
    "load_provider",
    "provider_name",
    "provider_violation",
    "root_of_trust",
    "screen",
]

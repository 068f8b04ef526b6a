"""The post-handshake rules: facts of an established link in, a refusal or None out.

Pure functions, one per rule, applied in ``check_link`` to the ``LinkFacts`` that
``link.read_facts`` reads from libpq and the socket (no SQL, no round trip), and to
the ``Decision`` the settings rules (``policy``) made for the same connection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .policy import _EMPTY, PROTOCOL_RANK, Decision

_AEAD_MARKERS = ("GCM", "CHACHA20-POLY1305", "CCM")
_FORWARD_SECRET_PREFIXES = ("ECDHE-", "DHE-")
ALPN = "postgresql"


class LinkFacts:
    """What libpq and the kernel say about an established connection (no SQL involved)."""

    __slots__ = (
        "alpn",
        "cipher",
        "effective",
        "host",
        "protocol",
        "ssl_in_use",
        "unix_socket",
        "used_gssapi",
    )

    def __init__(
        self,
        host: str,
        ssl_in_use: bool,
        protocol: str | None,
        cipher: str | None,
        used_gssapi: bool | None = False,  # None: this libpq cannot tell (< 16)
        unix_socket: bool = False,  # the socket's address family, not the host string
        effective: Mapping[str, str] = _EMPTY,  # PQconninfo of the link
        alpn: str | None = None,
    ) -> None:
        self.host = host
        self.ssl_in_use = ssl_in_use
        self.protocol = protocol
        self.cipher = cipher
        self.used_gssapi = used_gssapi
        self.unix_socket = unix_socket
        self.effective = effective
        self.alpn = alpn


def cipher_is_strong(protocol: str | None, cipher: str | None) -> bool:
    """TLS 1.3 suites, or TLS 1.2 with forward secrecy and an AEAD cipher."""
    if not cipher:
        return False
    if protocol == "TLSv1.3" or cipher.startswith("TLS_"):
        return True
    return cipher.startswith(_FORWARD_SECRET_PREFIXES) and any(
        marker in cipher for marker in _AEAD_MARKERS
    )


Problem = tuple[str, str]  # (what is wrong, the fix)


def link_settings(decision: Decision, facts: LinkFacts) -> Problem | None:
    for key, value in decision.forced.items():
        actual = facts.effective.get(key, "")
        if actual != value:
            return (
                f"libpq's effective {key} on this connection is {actual!r}, not the "
                f"policy's {value!r}.",
                "remove whatever sets it (pg_service.conf, PG* environment variables).",
            )
    return None


def link_gssapi(decision: Decision, facts: LinkFacts) -> Problem | None:
    if facts.used_gssapi:
        return (
            "the connection is encrypted with GSSAPI instead of TLS; no certificate was checked.",
            "make sure gssencmode=disable reaches libpq (remove it from OPTIONS and "
            "pg_service.conf).",
        )
    return None


def link_transport(decision: Decision, facts: LinkFacts) -> Problem | None:
    if facts.unix_socket:
        if decision.allow_unix_socket:
            return None
        return (
            f"libpq connected over a Unix-domain socket ({facts.host!r}), without TLS.",
            "set HOST to the server's DNS name, or opt in with "
            "OPTIONS['allow_unix_socket'] = True for a server on this machine.",
        )
    if not facts.ssl_in_use:
        return (
            "the connection is not using TLS.",
            "enable ssl on the server and check that nothing rewrites sslmode.",
        )
    return None


def link_protocol(decision: Decision, facts: LinkFacts) -> Problem | None:
    if not facts.ssl_in_use:
        return None
    if PROTOCOL_RANK.get(facts.protocol or "", 0) < PROTOCOL_RANK[decision.min_protocol]:
        return (
            f"the server negotiated {facts.protocol}, below the minimum {decision.min_protocol}.",
            "upgrade the server's TLS configuration (ssl_min_protocol_version).",
        )
    return None


def link_cipher(decision: Decision, facts: LinkFacts) -> Problem | None:
    if not facts.ssl_in_use or decision.allow_legacy_ciphers:
        return None
    if cipher_is_strong(facts.protocol, facts.cipher):
        return None
    return (
        f"the server negotiated the cipher {facts.cipher} over {facts.protocol}, which "
        "lacks forward secrecy or authenticated encryption.",
        "configure the server's ssl_ciphers for ECDHE with AES-GCM or CHACHA20-POLY1305 "
        "(or TLS 1.3); for a legacy server you cannot change, opt out of this rule only "
        "with OPTIONS['allow_legacy_ciphers'] = True.",
    )


def link_alpn(decision: Decision, facts: LinkFacts) -> Problem | None:
    if not facts.ssl_in_use or facts.effective.get("sslnegotiation") != "direct":
        return None
    if facts.alpn == ALPN:
        return None
    return (
        f"direct TLS negotiation ended with ALPN {facts.alpn!r}, not {ALPN!r}: the peer is "
        "not known to be a PostgreSQL server (cross-protocol attacks).",
        "connect to a PostgreSQL 17+ server (or a proxy that negotiates ALPN 'postgresql'), "
        "or remove OPTIONS['sslnegotiation'].",
    )


LINK_RULES: tuple[Callable[[Decision, LinkFacts], Problem | None], ...] = (
    link_gssapi,
    link_transport,
    link_settings,
    link_protocol,
    link_cipher,
    link_alpn,
)


def check_link(decision: Decision, facts: LinkFacts) -> Problem | None:
    """The first broken post-handshake rule as (problem, fix), or None."""
    for rule in LINK_RULES:
        problem = rule(decision, facts)
        if problem is not None:
            return problem
    return None

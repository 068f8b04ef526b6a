"""The handshake: how TLS starts, what a new connection negotiated, the rules over it, expiry.

* ``negotiate``/``learn_direct``: direct TLS by default where this process has seen the
  endpoint do it, with one fallback to the SSLRequest (whether the default applies at all is
  the policy's ``direct_key``).

* ``read_facts``: libpq state and the socket in, ``LinkFacts`` out. No SQL, no round trip:
  two ``PQsslAttribute`` calls and ``PQconninfo``.
* ``check_link``: the post-handshake rules, pure functions over those facts and the
  ``Decision`` the settings rules (``policy``) made for the same connection.
* The certificates' expiry, the one place it is computed: the server certificate's notAfter
  and the client certificate's validity, decoded by the session's own OpenSSL (so the first
  connection can choose its start-up log level, and the metrics read them, without
  ``cryptography``), and the one warning rule (``expiring``) the log line, the system checks
  W001 and W002, the health check and the metrics share.

The public report (``tlsinfo.TLSInfo``, two dataclasses, a visible part of a cold start) is
built from these only when something inspects or logs the connection.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar

from . import libpq
from .causes import BY_NAME, REFUSAL, classify
from .checkids import CHECKS
from .policy import NEGOTIATION, PROTOCOL_RANK, Decision, DirectKey
from .policy.rules import loopback_address
from .policy.terms import _EMPTY

__all__ = [
    "ALPN",
    "DIRECT",
    "DIRECT_SINCE",
    "REPROBE_AFTER",
    "LinkFacts",
    "cannot_do_direct",
    "check_link",
    "cipher_is_strong",
    "decode",
    "forget_direct",
    "goes_direct",
    "learn_direct",
    "negotiate",
    "read_facts",
]

T = TypeVar("T")


def decode(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


# -- the facts and the rules over them ------------------------------------------------------
_AEAD_MARKERS = ("GCM", "CHACHA20-POLY1305", "CCM")
_FORWARD_SECRET_PREFIXES = ("ECDHE-", "DHE-")
ALPN = "postgresql"


# LinkFacts' fields, in their order in the tuple.
_FIELDS = (
    "host",
    "ssl_in_use",
    "protocol",
    "cipher",
    "used_gssapi",
    "unix_socket",
    "effective",
    "alpn",
    "peer",
)


class LinkFacts(tuple[Any, ...]):
    """What libpq and the kernel say about an established connection (no SQL involved).

    A tuple: ``read_facts`` makes one in a single C-level call, and two links' facts compare
    as tuples (``pipeline.verify`` rules once on each different set). Not a ``NamedTuple``,
    whose class is compiled from generated source in every process at start-up: the fields
    are read by the same kind of C-level getters, set below."""

    __slots__ = ()

    if TYPE_CHECKING:
        host: str
        ssl_in_use: bool
        protocol: str | None
        cipher: str | None
        used_gssapi: bool | None  # None: this libpq cannot tell (< 16)
        unix_socket: bool  # the socket's address family, not the host string
        effective: Mapping[str, str]  # PQconninfo of the link
        alpn: str | None
        peer: str | None  # the socket's peer address: read for a local proxy only

    def __new__(
        cls,
        host: str,
        ssl_in_use: bool,
        protocol: str | None,
        cipher: str | None,
        used_gssapi: bool | None = False,
        unix_socket: bool = False,
        effective: Mapping[str, str] = _EMPTY,
        alpn: str | None = None,
        peer: str | None = None,
    ) -> LinkFacts:
        facts = (
            host,
            ssl_in_use,
            protocol,
            cipher,
            used_gssapi,
            unix_socket,
            effective,
            alpn,
            peer,
        )
        return tuple.__new__(cls, facts)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(_FIELDS, self, strict=True))
        return f"LinkFacts({fields})"


for _at, _name in enumerate(_FIELDS):
    setattr(LinkFacts, _name, property(itemgetter(_at)))

_NEW_FACTS = tuple.__new__  # LinkFacts without its Python-level __new__ (read_facts)


def cipher_is_strong(protocol: str | None, cipher: str | None) -> bool:
    """TLS 1.3 suites, or TLS 1.2 with forward secrecy and an AEAD cipher."""
    if not cipher:
        return False
    if protocol == "TLSv1.3" or cipher.startswith("TLS_"):
        return True
    return cipher.startswith(_FORWARD_SECRET_PREFIXES) and any(
        marker in cipher for marker in _AEAD_MARKERS
    )


# (the cause's name, what is wrong on this link, the fix): the cause is one of causes.BY_NAME,
# whose fix is used unless the rule words one with this link's specifics.
Problem = tuple[str, str, str]


def _problem(cause: str, problem: str, fix: str | None = None) -> Problem:
    return (cause, problem, BY_NAME[cause].fix if fix is None else fix)


def link_settings(decision: Decision, facts: LinkFacts) -> Problem | None:
    for key, value in decision.forced.items():
        actual = facts.effective.get(key, "")
        if actual != value:
            return _problem(
                "settings",
                f"libpq's effective {key} on this connection is {actual!r}, not the "
                f"policy's {value!r}.",
            )
    return None


def link_gssapi(decision: Decision, facts: LinkFacts) -> Problem | None:
    if facts.used_gssapi:
        return _problem("gssapi", BY_NAME["gssapi"].problem)
    return None


def link_transport(decision: Decision, facts: LinkFacts) -> Problem | None:
    if decision.allow_local_proxy:
        return _local_proxy_transport(facts)
    if facts.unix_socket:
        if decision.allow_unix_socket:
            return None
        return _problem(
            "socket",
            f"libpq connected over a Unix-domain socket ({facts.host!r}), without TLS.",
            CHECKS["E004"].fix,  # the settings rule's own fix: the same cause
        )
    if not facts.ssl_in_use:
        return _problem("not_tls", BY_NAME["not_tls"].problem)
    return None


def _local_proxy_transport(facts: LinkFacts) -> Problem | None:
    """The settings named a loopback address (E019); the socket must really end there."""
    if facts.unix_socket:
        return _problem(
            "local_proxy",
            f"libpq connected over a Unix-domain socket ({facts.host!r}), not to the local "
            "proxy's loopback TCP address.",
            CHECKS["E019"].fix,
        )
    if facts.peer is None or not loopback_address(facts.peer):
        return _problem(
            "local_proxy",
            f"the connection's peer is {facts.peer or 'unknown'}, not a loopback address, "
            "although OPTIONS['allow_local_proxy'] permits plaintext to a local proxy only.",
            CHECKS["E019"].fix,
        )
    return None


def link_protocol(decision: Decision, facts: LinkFacts) -> Problem | None:
    if not facts.ssl_in_use:
        return None
    if PROTOCOL_RANK.get(facts.protocol or "", 0) < PROTOCOL_RANK[decision.min_protocol]:
        return _problem(
            "protocol",
            f"the server negotiated {facts.protocol}, below the minimum {decision.min_protocol}.",
        )
    return None


def link_cipher(decision: Decision, facts: LinkFacts) -> Problem | None:
    if not facts.ssl_in_use or decision.allow_legacy_ciphers:
        return None
    if cipher_is_strong(facts.protocol, facts.cipher):
        return None
    return _problem(
        "cipher",
        f"the server negotiated the cipher {facts.cipher} over {facts.protocol}, which "
        "lacks forward secrecy or authenticated encryption.",
    )


def link_alpn(decision: Decision, facts: LinkFacts) -> Problem | None:
    if not facts.ssl_in_use or facts.effective.get("sslnegotiation") != "direct":
        return None
    if facts.alpn == ALPN:
        return None
    return _problem(
        "alpn",
        f"direct TLS negotiation ended with ALPN {facts.alpn!r}, not {ALPN!r}: the peer is "
        "not known to be a PostgreSQL server (cross-protocol attacks).",
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


def read_facts(
    pgconn: Any, peer: bool = False, effective: Mapping[str, str] | None = None
) -> LinkFacts:
    """The facts the post-handshake check needs, from libpq and the socket (no SQL).

    ``peer``: also the socket's peer address (one ``getpeername``), for a local proxy.
    ``effective``: libpq's effective settings, already read from a connection opened with the
    same judged parameters (``pipeline.Plan.confirmed``); else ``PQconninfo`` here.
    """
    ssl_in_use = bool(pgconn.ssl_in_use)
    protocol = cipher = alpn = None
    if effective is None:
        effective = libpq.effective_settings(pgconn)
    if ssl_in_use:  # libpq's answers as text, None for none (``decode``, written out)
        get = libpq.functions().ssl_attribute
        ptr = pgconn.pgconn_ptr
        protocol = (get(ptr, b"protocol") or b"").decode("utf-8", "replace") or None
        cipher = (get(ptr, b"cipher") or b"").decode("utf-8", "replace") or None
        if effective.get("sslnegotiation") == "direct":
            alpn = (get(ptr, b"alpn") or b"").decode("utf-8", "replace") or None
    return _NEW_FACTS(  # LinkFacts' fields, in order
        LinkFacts,
        (
            (pgconn.host or b"").decode("utf-8", "replace"),
            ssl_in_use,
            protocol,
            cipher,
            libpq.used_gssapi(pgconn),
            # libpq never starts TLS over a Unix-domain socket (it skips the SSLRequest
            # there), so a link in TLS is TCP; only one without TLS needs its socket's family.
            not ssl_in_use and libpq.socket_family(pgconn) == socket.AF_UNIX,
            effective,
            alpn,
            libpq.peer_address(pgconn) if peer else None,
        ),
    )


# -- direct TLS by default, where the server is known to do it ------------------------------
# libpq's default negotiation sends an SSLRequest and waits for the server's answer before its
# TLS ClientHello; ``sslnegotiation=direct`` (libpq 17+, ALPN 'postgresql' required) starts TLS
# at once: one round trip less per new connection, which with CONN_MAX_AGE=0 is per request.
# Only a PostgreSQL 17+ server can do it: an older one hangs up, PgBouncer answers in plaintext.
# So when nothing sets sslnegotiation (an explicit 'postgres' or 'direct' always wins), a
# connection goes direct only to an endpoint this process has seen do TLS the way PostgreSQL 17+
# does, and a direct attempt refused the way such a peer refuses falls back once, in the same
# connect, to the SSLRequest, which is then remembered (``policy.direct_key`` says whether the
# default applies to a connection). sslmode and every check stay as they are: the fallback
# changes how TLS starts, never whether or how the server is verified.

DIRECT = "direct"
DIRECT_SINCE = 170000  # the first PostgreSQL server (and libpq) that negotiates TLS directly

# Endpoint -> whether direct TLS works there (a forked child inherits it: the same endpoints).
# Absent: not known yet, so the SSLRequest is used and the verified connection's facts decide
# (``learn_direct``). A dict write is atomic; two threads learning at once learn the same thing.
_DIRECT: dict[DirectKey, bool] = {}
# Endpoint -> when a direct attempt there last fell back to the SSLRequest. Until
# ``REPROBE_AFTER`` seconds have passed the endpoint stays on the SSLRequest (so a path that
# keeps refusing direct TLS costs one failed attempt per interval, not one per connect); then
# the next verified connection's facts decide again. A PostgreSQL 17+ server that hung up
# during a restart, or a middlebox that stopped resetting, goes direct again.
_FELL_BACK: dict[DirectKey, float] = {}
REPROBE_AFTER = 60.0

# How a direct attempt fails when what answers cannot (or may not) negotiate TLS directly, in
# libpq's words: PostgreSQL before 17 reads the ClientHello as an oversized startup packet and
# hangs up ("SSL error: unexpected eof while reading"; OpenSSL 1.1: "SSL SYSCALL error: EOF
# detected"), PgBouncer answers with a plaintext error ("SSL error: wrong version number"), and
# a firewall that only knows the PostgreSQL protocol resets the connection after TCP connected,
# during the TLS handshake ("SSL SYSCALL error: Connection reset by peer"). Each says nothing
# about the SSLRequest, which is then tried once. A refused TCP connection, a timeout or the
# server's own error answer is not among them: that is the path or the server, not how TLS
# starts, and the SSLRequest would meet it too.
NOT_DIRECT_MARKERS = (
    "unexpected eof while reading",
    "eof detected",
    "wrong version number",
    "ssl syscall error: connection reset by peer",
)


def goes_direct(decision: Decision | None) -> bool:
    """Whether the next connection of this decision starts TLS directly by default."""
    key = decision.direct_key if decision is not None else None
    return key is not None and _DIRECT.get(key) is True


def cannot_do_direct(exc: BaseException) -> bool:
    """A direct attempt failed the way a peer that cannot negotiate TLS directly fails.

    Never for a refusal libpq made on what it saw (an untrusted certificate, another host
    name, no ALPN 'postgresql', a root file): that stays a refusal (``causes.classify``).
    """
    cause = classify(exc)
    if cause is not None and cause.kind == REFUSAL and cause.name != "protocol":
        return False
    text = str(exc).lower()
    return any(marker in text for marker in NOT_DIRECT_MARKERS)


def negotiate(
    decision: Decision | None,
    params: Mapping[str, Any],
    connect: Callable[[Mapping[str, Any]], T],
) -> T:
    """``connect(params)``: with ``sslnegotiation=direct`` where known to work, falling back
    once, in the same connect, to ``params`` as given if refused the way a peer or path that
    cannot do it refuses; else ``params`` as given (the SSLRequest, as libpq does). sslmode and
    every check stay as they are either way."""
    if decision is None or not goes_direct(decision):
        return connect(params)
    key = decision.direct_key
    assert key is not None  # goes_direct
    try:
        return connect({**params, NEGOTIATION: DIRECT})
    except Exception as exc:
        if not cannot_do_direct(exc):
            raise
    _DIRECT[key] = False  # before the fallback: concurrent connects take the SSLRequest too
    _FELL_BACK[key] = time.monotonic()
    try:
        return connect(params)
    except BaseException:
        # Refused both ways: perhaps down rather than unable. Unknown again, so the next
        # connection uses the SSLRequest and what it shows is learned.
        _DIRECT.pop(key, None)
        _FELL_BACK.pop(key, None)
        raise


def learn_direct(decision: Decision, pgconn: Any) -> None:
    """Learn from a verified connection whether its endpoint can negotiate TLS directly.

    Yes when the server reports PostgreSQL 17+ and the TLS peer selected ALPN 'postgresql'
    (libpq 17+ offers it in either negotiation; PostgreSQL 17+ selects it). PgBouncer passes
    the server's version through but selects no ALPN: no. Read once per endpoint, and again
    ``REPROBE_AFTER`` seconds after a fallback.
    """
    key = decision.direct_key
    if key is None:
        return
    known = _DIRECT.get(key)
    if known is True:
        return
    if known is False:
        fell_back = _FELL_BACK.get(key)
        if fell_back is None or time.monotonic() - fell_back < REPROBE_AFTER:
            return
        del _FELL_BACK[key]
    if pgconn.server_version < DIRECT_SINCE:
        _DIRECT[key] = False
        return
    _DIRECT[key] = decode(libpq.functions().ssl_attribute(pgconn.pgconn_ptr, b"alpn")) == ALPN


def forget_direct() -> None:
    """Forget what was learned (tests and the benchmark start from a new process's state)."""
    _DIRECT.clear()
    _FELL_BACK.clear()

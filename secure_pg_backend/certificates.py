"""Certificates: the live session's, decoded, and the one expiry rule.

* Read from the TLS session libpq holds, through the OpenSSL libpq loaded (``libpq.functions``):
  the server certificate's DER and notAfter, the client certificate this side presents, their
  subject and issuer. So the first connection can choose its start-up log level, and the
  metrics read dates on every connection, without importing ``cryptography``; a full parse by
  ``cryptography`` is the fallback where that OpenSSL lacks a function.
* ``certificate_text``: the one escaping rule for certificate text anyone is shown.
* ``expiring``: the one expiry rule (the log line, W001/W002, the health check, the metrics).
* ``SessionCertificates``: one connection's dates, each read at most once.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

from .libpq import LibpqUnavailable, _CFunc, functions, loaded_libpq, optional_function

__all__ = [
    "CLIENT_WARNING_FRACTION",
    "EXPIRY_WARNING_DAYS",
    "SessionCertificates",
    "Validity",
    "certificate_names",
    "certificate_not_after",
    "certificate_text",
    "certificate_validity",
    "client_certificate_der",
    "client_certificate_names",
    "client_validity",
    "days_left",
    "decodes_times",
    "expiring",
    "peer_certificate_der",
    "peer_not_after",
    "warning_window",
]

T = TypeVar("T")


# -- the server certificate's DER ---------------------------------------------------------------
def peer_certificate_der(pgconn_ptr: int) -> bytes | None:
    """DER of the server's leaf certificate, read from the live TLS session."""
    fns = functions()
    if fns.peer_certificate is None or fns.i2d_x509 is None or fns.x509_free is None:
        return None
    ssl_ptr = fns.ssl_struct(pgconn_ptr, b"OpenSSL")
    if not ssl_ptr:
        return None
    x509 = fns.peer_certificate(ssl_ptr)
    if not x509:
        return None
    try:
        return _der(fns.i2d_x509, x509)
    finally:
        fns.x509_free(x509)


def _der(i2d_x509: _CFunc, x509: int) -> bytes | None:
    size = i2d_x509(x509, None)
    if size <= 0:
        return None
    buf = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buf))  # i2d advances the pointer it gets
    if i2d_x509(x509, ctypes.byref(cursor)) != size:
        return None
    return buf.raw


# -- the server certificate's notAfter, decoded by the session's own OpenSSL -----------------
# The start-up log line and the expiry warning need one date; parsing the whole certificate with
# `cryptography` costs an import of tens of milliseconds on the first connection (and, on a pool's
# worker thread, puts Rust frames on a thread the interpreter may stop at exit).


class _Tm(ctypes.Structure):
    # ISO C's nine ints; glibc and the BSDs add tm_gmtoff and tm_zone. Room for them is harmless
    # where the C library has none (OpenSSL only writes its own struct tm).
    _fields_ = [
        *[
            (name, ctypes.c_int)
            for name in ("sec", "min", "hour", "mday", "mon", "year", "wday", "yday", "isdst")
        ],
        ("gmtoff", ctypes.c_long),
        ("zone", ctypes.c_char_p),
    ]


class _TimeFunctions:
    __slots__ = ("asn1_time_to_tm", "d2i_x509", "get0_not_after", "get0_not_before", "x509_free")

    def __init__(
        self,
        d2i_x509: _CFunc,
        get0_not_after: _CFunc,
        get0_not_before: _CFunc,
        asn1_time_to_tm: _CFunc,
        x509_free: _CFunc,
    ) -> None:
        self.d2i_x509 = d2i_x509
        self.get0_not_after = get0_not_after
        self.get0_not_before = get0_not_before
        self.asn1_time_to_tm = asn1_time_to_tm
        self.x509_free = x509_free


@functools.lru_cache(maxsize=1)
def _time_functions() -> _TimeFunctions | None:
    """OpenSSL >= 1.1.1's functions, or None (another TLS library, or an older OpenSSL)."""
    try:
        lib = loaded_libpq()
    except (LibpqUnavailable, OSError):
        return None
    d2i = optional_function(lib, "d2i_X509")
    not_after = optional_function(lib, "X509_get0_notAfter")
    not_before = optional_function(lib, "X509_get0_notBefore")
    to_tm = optional_function(lib, "ASN1_TIME_to_tm")
    free = optional_function(lib, "X509_free")
    if d2i is None or not_after is None or not_before is None or to_tm is None or free is None:
        return None
    d2i.restype = ctypes.c_void_p
    d2i.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
    for get0 in (not_after, not_before):
        get0.restype = ctypes.c_void_p
        get0.argtypes = [ctypes.c_void_p]
    to_tm.restype = ctypes.c_int
    to_tm.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Tm)]
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    return _TimeFunctions(d2i, not_after, not_before, to_tm, free)


def _openssl_not_after(der: bytes) -> dt.datetime | None:
    """notAfter (UTC) of a DER certificate; None if this OpenSSL cannot say.

    Decoding DER (``d2i_X509``) initializes OpenSSL's decoders and digests, work that
    OpenSSL undoes again at exit, a cost a cold start should not pay. For a live connection,
    ``peer_not_after`` reads the certificate the TLS session already decoded.
    """
    fns = _time_functions()
    return None if fns is None else _decoded(der, lambda x509: _not_after(fns, x509))


def _decoded(der: bytes, read: Callable[[int], T]) -> T | None:
    """``read(X509*)`` of a DER certificate decoded by libpq's OpenSSL; None if it cannot."""
    fns = _time_functions()
    if fns is None:
        return None
    cursor = ctypes.c_char_p(der)  # d2i advances the pointer it gets; `der` stays alive
    x509 = fns.d2i_x509(None, ctypes.byref(cursor), len(der))
    if not x509:
        return None
    try:
        return read(x509)
    finally:
        fns.x509_free(x509)


def _session_not_after(pgconn_ptr: int) -> dt.datetime | None:
    """notAfter (UTC) of the certificate the server presented in this live TLS session."""
    fns, time_fns = functions(), _time_functions()
    if time_fns is None or fns.peer_certificate is None or fns.x509_free is None:
        return None
    ssl_ptr = fns.ssl_struct(pgconn_ptr, b"OpenSSL")
    x509 = fns.peer_certificate(ssl_ptr) if ssl_ptr else None
    if not x509:
        return None
    try:
        return _not_after(time_fns, x509)
    finally:
        fns.x509_free(x509)  # SSL_get1_peer_certificate took a reference


def _not_after(fns: _TimeFunctions, x509: int) -> dt.datetime | None:
    return _asn1_time(fns, fns.get0_not_after(x509))


def _asn1_time(fns: _TimeFunctions, asn1_time: int | None) -> dt.datetime | None:
    tm = _Tm()
    if not asn1_time or fns.asn1_time_to_tm(asn1_time, ctypes.byref(tm)) != 1:
        return None
    return dt.datetime(
        tm.year + 1900, tm.mon + 1, tm.mday, tm.hour, tm.min, tm.sec, tzinfo=dt.timezone.utc
    )


# -- certificate text: the one escaping rule ------------------------------------------------
# A certificate's names are chosen by whoever got it signed, and a CA that checks the host names
# signs whatever subject it is asked for: a CN holding a newline and an ANSI escape made dbtls
# print a forged line and clear the screen. Every form a person or a log pipeline reads (the
# log line and its fields, dbtls and --json, repr and as_dict, messages, the health check)
# shows certificate text through ``certificate_text`` only; the raw names stay in the
# certificate itself (``PeerCertificate.certificate()``, the DER).
#
# The rule is OpenSSL's RFC 2253 printing with ASN1_STRFLGS_ESC_CTRL, which the OpenTelemetry
# fields always used: a control character becomes a backslash and two upper-case hex digits
# (newline \0A, ESC \1B, DEL \7F). It extends, in the same form (OpenSSL's ASN1_STRFLGS_ESC_MSB:
# each UTF-8 byte), to what moves or reorders text without being ASCII: C1 controls (U+009B is
# a CSI to some terminals), the line and paragraph separators (str.splitlines and log viewers
# break lines there) and the bidirectional overrides ("Trojan Source"); and to lone surrogates,
# which no UTF-8 output could print. Backslashes are left alone: both OpenSSL's and
# cryptography's RFC 2253/4514 strings escape them already, so the rule is idempotent.
@functools.cache
def _unsafe_text() -> re.Pattern[str]:
    # Compiled on first use, not at import: its ranges beyond Latin-1 make this one of the
    # dearest compiles in the package, and most processes never show certificate text.
    return re.compile(
        r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
    )


def certificate_text(text: str) -> str:
    """``text`` (a certificate's name, or a message quoting one) with every control character,
    line separator and bidirectional override escaped as OpenSSL escapes them (``\\0A``)."""
    return _unsafe_text().sub(_hex_bytes, text)


def _hex_bytes(match: re.Match[str]) -> str:
    return "".join(f"\\{byte:02X}" for byte in match.group().encode("utf-8", "surrogatepass"))


# -- a certificate's subject and issuer, by the same OpenSSL ---------------------------------
# For the start-up log record's OpenTelemetry fields (signals.otel_server_fields), which must not
# import ``cryptography`` (the first connection never does). RFC 2253 order and escaping, as
# ``PeerCertificate.subject`` (cryptography's RFC 4514 string) shows them, with UTF-8 kept as is
# (XN_FLAG_RFC2253 without ASN1_STRFLGS_ESC_MSB), then ``certificate_text`` for what OpenSSL
# leaves unescaped there (C1 controls and the rest beyond ASCII).
_XN_FLAGS = 0x313 | 0x10000 | 0x100000 | 0x1000000
_BIO_CTRL_INFO = 3  # BIO_get_mem_data


class _NameFunctions:
    __slots__ = ("bio_ctrl", "bio_free", "bio_new", "bio_s_mem", "issuer", "print_ex", "subject")

    def __init__(self, **functions: _CFunc) -> None:
        for name, function in functions.items():
            setattr(self, name, function)

    bio_ctrl: _CFunc
    bio_free: _CFunc
    bio_new: _CFunc
    bio_s_mem: _CFunc
    issuer: _CFunc
    print_ex: _CFunc
    subject: _CFunc


@functools.lru_cache(maxsize=1)
def _name_functions() -> _NameFunctions | None:
    """OpenSSL's name printing, or None (another TLS library, or libpq not loaded)."""
    try:
        lib = loaded_libpq()
    except (LibpqUnavailable, OSError):
        return None
    found = {
        "bio_ctrl": optional_function(lib, "BIO_ctrl"),
        "bio_free": optional_function(lib, "BIO_free"),
        "bio_new": optional_function(lib, "BIO_new"),
        "bio_s_mem": optional_function(lib, "BIO_s_mem"),
        "issuer": optional_function(lib, "X509_get_issuer_name"),
        "print_ex": optional_function(lib, "X509_NAME_print_ex"),
        "subject": optional_function(lib, "X509_get_subject_name"),
    }
    functions = {name: fn for name, fn in found.items() if fn is not None}
    if len(functions) != len(found):
        return None
    pointer = ctypes.c_void_p
    for name, restype, argtypes in (
        ("bio_ctrl", ctypes.c_long, [pointer, ctypes.c_int, ctypes.c_long, pointer]),
        ("bio_free", ctypes.c_int, [pointer]),
        ("bio_new", pointer, [pointer]),
        ("bio_s_mem", pointer, []),
        ("issuer", pointer, [pointer]),
        ("print_ex", ctypes.c_int, [pointer, pointer, ctypes.c_int, ctypes.c_ulong]),
        ("subject", pointer, [pointer]),
    ):
        functions[name].restype = restype
        functions[name].argtypes = argtypes
    return _NameFunctions(**functions)


def certificate_names(der: bytes) -> tuple[str, str] | None:
    """(subject, issuer) of a DER certificate as RFC 2253 strings; None if this OpenSSL cannot
    say (the report's ``peer_certificate`` then has them, parsed by ``cryptography``)."""
    fns = _name_functions()
    return None if fns is None else _decoded(der, lambda x509: _names(fns, x509))


def _names(fns: _NameFunctions, x509: int) -> tuple[str, str] | None:
    subject = _print_name(fns, fns.subject(x509))
    issuer = _print_name(fns, fns.issuer(x509))
    return None if subject is None or issuer is None else (subject, issuer)


def _print_name(fns: _NameFunctions, name: int | None) -> str | None:
    if not name:
        return None
    bio = fns.bio_new(fns.bio_s_mem())
    if not bio:
        return None
    try:
        if fns.print_ex(bio, name, 0, _XN_FLAGS) < 0:
            return None
        data = ctypes.c_void_p()
        size = fns.bio_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.byref(data))
        if size == 0:
            return ""
        if size < 0 or not data.value:
            return None
        return certificate_text(ctypes.string_at(data.value, size).decode("utf-8", "replace"))
    finally:
        fns.bio_free(bio)


# -- the client certificate this side holds in the live session -------------------------------
# libpq loads OPTIONS['sslcert'] (or ~/.postgresql/postgresql.crt) into the session whenever the
# file exists and sslcertmode is not 'disable'; OpenSSL sends it when the server asks for one.
# ``SSL_get_certificate`` returns the session's own pointer (no reference taken: never freed).
# A connection without a client certificate pays two ctypes calls that return NULL.


@functools.lru_cache(maxsize=1)
def _local_certificate() -> _CFunc | None:
    try:
        get = optional_function(loaded_libpq(), "SSL_get_certificate")
    except (LibpqUnavailable, OSError):
        return None
    if get is not None:
        get.restype = ctypes.c_void_p
        get.argtypes = [ctypes.c_void_p]
    return get


def _local_x509(pgconn_ptr: int) -> int | None:
    get = _local_certificate()
    if get is None:
        return None
    ssl_ptr = functions().ssl_struct(pgconn_ptr, b"OpenSSL")
    x509 = get(ssl_ptr) if ssl_ptr else None
    return int(x509) if x509 else None


def client_certificate_der(pgconn_ptr: int) -> bytes | None:
    """DER of the client certificate in this live TLS session; None when there is none."""
    i2d = functions().i2d_x509
    x509 = _local_x509(pgconn_ptr) if i2d is not None else None
    return _der(i2d, x509) if x509 else None


def decodes_times() -> bool:
    """Whether libpq's OpenSSL can decode a certificate's validity (OpenSSL >= 1.1.1)."""
    return _time_functions() is not None


def _session_client_validity(pgconn_ptr: int) -> tuple[dt.datetime, dt.datetime] | None:
    """(notBefore, notAfter), UTC, of the client certificate in this live TLS session, decoded
    by the session's OpenSSL; None without one (or where that OpenSSL cannot say)."""
    time_fns = _time_functions()
    x509 = _local_x509(pgconn_ptr) if time_fns is not None else None
    if not x509 or time_fns is None:
        return None
    not_before = _asn1_time(time_fns, time_fns.get0_not_before(x509))
    not_after = _not_after(time_fns, x509)
    return None if not_before is None or not_after is None else (not_before, not_after)


def client_certificate_names(pgconn_ptr: int) -> tuple[str, str] | None:
    """(subject, issuer) of the client certificate in this live session, as
    ``certificate_names`` prints them, from the session's own X509 (no DER decoding)."""
    fns = _name_functions()
    x509 = _local_x509(pgconn_ptr) if fns is not None else None
    return _names(fns, x509) if x509 and fns is not None else None


# -- the certificates' expiry ----------------------------------------------------------------

# Log line, system checks W001/W002, health check and the example page all warn this many days
# before expiry (a short-lived client certificate later: see warning_window).
EXPIRY_WARNING_DAYS = 30
# A client certificate from Vault, cert-manager or SPIFFE lives hours or days and is renewed by
# automation well before it ends: cert-manager renews when a third of the lifetime is left (its
# default renewBefore), SPIFFE agents at half, Vault agent at about a third. Warning 30 days
# ahead would warn on every connection of a 24-hour certificate; warning when less than this
# fraction of the lifetime is left fires only once renewal is overdue.
CLIENT_WARNING_FRACTION = 1 / 3

Validity = tuple[dt.datetime, dt.datetime]  # (notBefore, notAfter), UTC


def days_left(not_after: dt.datetime, now: dt.datetime | None = None) -> int:
    return (not_after - (now or dt.datetime.now(dt.timezone.utc))).days


def warning_window(
    not_before: dt.datetime | None, not_after: dt.datetime, days: float = EXPIRY_WARNING_DAYS
) -> dt.timedelta:
    """How long before ``not_after`` the warning starts: ``days`` for the server certificate
    (``not_before`` None); for a client certificate the shorter of ``days`` and
    ``CLIENT_WARNING_FRACTION`` of its lifetime."""
    window = dt.timedelta(days=days)
    if not_before is None:
        return window
    return min(window, (not_after - not_before) * CLIENT_WARNING_FRACTION)


def expiring(
    not_after: dt.datetime,
    now: dt.datetime | None = None,
    not_before: dt.datetime | None = None,
    days: float = EXPIRY_WARNING_DAYS,
) -> bool:
    """The one expiry rule: less than ``warning_window`` left (fewer than ``days`` whole days
    for the server certificate; the last third of a short-lived client certificate's life)."""
    left = not_after - (now or dt.datetime.now(dt.timezone.utc))
    return left < warning_window(not_before, not_after, days)


def _parsed_validity(der: bytes) -> Validity:
    """(notBefore, notAfter) by a full parse with ``cryptography``: the fallback only."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return cert.not_valid_before_utc, cert.not_valid_after_utc


@functools.lru_cache(maxsize=32)
def certificate_not_after(der: bytes) -> dt.datetime:
    """A DER certificate's notAfter, cached per certificate: decoded by the OpenSSL of the TLS
    session (libpq's), so reading it on every connection (the log line, metrics) never imports
    ``cryptography``; the full parse where that OpenSSL lacks the functions."""
    not_after = _openssl_not_after(der)
    return not_after if not_after is not None else _parsed_validity(der)[1]


@functools.lru_cache(maxsize=32)
def certificate_validity(der: bytes) -> Validity:
    """A DER certificate's (notBefore, notAfter), by a full parse (the fallback)."""
    return _parsed_validity(der)


def peer_not_after(pgconn: Any) -> dt.datetime | None:
    """notAfter of the certificate the server presented on a live connection; None without TLS.

    Read from the certificate the TLS session already holds; the DER route (and its fallback
    to a full parse) only where libpq's OpenSSL lacks the functions.
    """
    ptr = pgconn.pgconn_ptr
    if not ptr or not pgconn.ssl_in_use:
        return None
    not_after = _session_not_after(ptr)
    if not_after is None:
        der = peer_certificate_der(ptr)
        not_after = certificate_not_after(der) if der else None
    return not_after


def client_validity(pgconn: Any) -> Validity | None:
    """(notBefore, notAfter) of the client certificate this side holds in a live TLS session;
    None without one (no TLS, no client certificate: two ctypes calls that return NULL)."""
    ptr = pgconn.pgconn_ptr
    if not ptr or not pgconn.ssl_in_use:
        return None
    if decodes_times():
        return _session_client_validity(ptr)
    der = client_certificate_der(ptr)
    return certificate_validity(der) if der else None


class SessionCertificates:
    """One live connection's certificate dates, each read at most once: the log line and the
    metrics of the same connection share the read, and neither pays it unless it asks."""

    def __init__(self, pgconn: Any) -> None:
        self._pgconn = pgconn

    @functools.cached_property
    def server_not_after(self) -> dt.datetime | None:
        return peer_not_after(self._pgconn)

    @functools.cached_property
    def client_validity(self) -> Validity | None:
        return client_validity(self._pgconn)

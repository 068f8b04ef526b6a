"""ctypes access to the libpq that psycopg already loaded.

psycopg 3 does not wrap ``PQsslAttribute``/``PQsslStruct``. We call them on
the live ``PGconn*`` through the *same* libpq instance psycopg uses: loading a
second copy would pair a PGconn with foreign code, and the TLS session belongs
to the OpenSSL that libpq was linked with. ``RTLD_NOLOAD`` makes "the same"
a guarantee: if the library is not already in the process, lookup fails
instead of loading it. Resolution happens once per process.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import glob
import os
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg

# typeshed names no public type for a foreign function pointer
_CFunc = Any

_NOLOAD = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)


class LibpqUnavailable(RuntimeError):
    pass


def _bundled_candidates() -> list[str]:
    import psycopg_binary

    pkg = os.path.dirname(psycopg_binary.__file__)
    patterns = [
        os.path.join(pkg, "..", "psycopg_binary.libs", "libpq*"),  # manylinux (auditwheel)
        os.path.join(pkg, ".dylibs", "libpq*"),  # macOS (delocate)
        os.path.join(pkg, "..", "psycopg_binary.libs", "libpq*.dll"),  # Windows (delvewheel)
    ]
    return [path for pattern in patterns for path in sorted(glob.glob(pattern))]


def _mapped_candidates() -> list[str]:
    """libpq files mapped into this process (Linux), for the C and Python builds."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libpq" in line and "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libpq"))


def _load_noload(paths: list[str]) -> ctypes.CDLL:
    for path in paths:
        try:
            return ctypes.CDLL(path, mode=_NOLOAD)
        except OSError:
            continue
    raise LibpqUnavailable(f"psycopg's libpq is not loaded from any of {paths!r}")


@functools.lru_cache(maxsize=1)
def loaded_libpq() -> ctypes.CDLL:
    """The libpq instance psycopg is using."""
    impl = psycopg.pq.__impl__
    if impl == "python":
        from psycopg.pq import _pq_ctypes

        return _pq_ctypes.pq  # type: ignore[attr-defined,no-any-return]
    if impl == "binary":
        return _load_noload(_bundled_candidates())
    candidates = _mapped_candidates()
    if not candidates and sys.platform != "win32":
        import ctypes.util

        found = ctypes.util.find_library("pq")
        candidates = [found] if found else []
    return _load_noload(candidates)


@dataclass(frozen=True)
class _Functions:
    ssl_attribute: _CFunc
    ssl_struct: _CFunc
    peer_certificate: _CFunc | None
    i2d_x509: _CFunc | None
    x509_free: _CFunc | None


def _optional(lib: ctypes.CDLL, *names: str) -> _CFunc | None:
    # A dlopen handle resolves symbols in the library *and its dependencies*, so
    # OpenSSL functions come from the libssl/libcrypto this libpq is linked to.
    for name in names:
        try:
            return getattr(lib, name)  # type: ignore[no-any-return]
        except AttributeError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def functions() -> _Functions:
    lib = loaded_libpq()
    ssl_attribute = lib.PQsslAttribute
    ssl_attribute.restype = ctypes.c_char_p
    ssl_attribute.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ssl_struct = lib.PQsslStruct
    ssl_struct.restype = ctypes.c_void_p
    ssl_struct.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    peer = _optional(lib, "SSL_get1_peer_certificate", "SSL_get_peer_certificate")
    i2d = _optional(lib, "i2d_X509")
    free = _optional(lib, "X509_free")
    if peer is not None and i2d is not None and free is not None:
        peer.restype = ctypes.c_void_p
        peer.argtypes = [ctypes.c_void_p]
        i2d.restype = ctypes.c_int
        i2d.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        free.restype = None
        free.argtypes = [ctypes.c_void_p]
    else:
        peer = i2d = free = None
    return _Functions(ssl_attribute, ssl_struct, peer, i2d, free)


# protocol and cipher are read by the post-handshake check itself (tlsinfo.read_facts).
_ATTRIBUTES = (b"library", b"key_bits", b"compression", b"alpn")


def ssl_attributes(pgconn_ptr: int) -> dict[str, str | None]:
    """``PQsslAttribute`` for the names the check did not read; None when unset."""
    get = functions().ssl_attribute
    out: dict[str, str | None] = {}
    for name in _ATTRIBUTES:
        raw = get(pgconn_ptr, name)
        out[name.decode()] = raw.decode("ascii", "replace") if raw else None
    return out


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
        size = fns.i2d_x509(x509, None)
        if size <= 0:
            return None
        buf = ctypes.create_string_buffer(size)
        cursor = ctypes.c_void_p(ctypes.addressof(buf))  # i2d advances the pointer it gets
        if fns.i2d_x509(x509, ctypes.byref(cursor)) != size:
            return None
        return buf.raw
    finally:
        fns.x509_free(x509)


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


class _TimeFunctions(NamedTuple):  # not a dataclass: this module is imported on every start
    d2i_x509: _CFunc
    get0_not_after: _CFunc
    asn1_time_to_tm: _CFunc
    x509_free: _CFunc


@functools.lru_cache(maxsize=1)
def _time_functions() -> _TimeFunctions | None:
    """OpenSSL >= 1.1.1's functions, or None (another TLS library, or an older OpenSSL)."""
    try:
        lib = loaded_libpq()
    except (LibpqUnavailable, OSError):
        return None
    d2i = _optional(lib, "d2i_X509")
    not_after = _optional(lib, "X509_get0_notAfter")
    to_tm = _optional(lib, "ASN1_TIME_to_tm")
    free = _optional(lib, "X509_free")
    if d2i is None or not_after is None or to_tm is None or free is None:
        return None
    d2i.restype = ctypes.c_void_p
    d2i.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
    not_after.restype = ctypes.c_void_p
    not_after.argtypes = [ctypes.c_void_p]
    to_tm.restype = ctypes.c_int
    to_tm.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Tm)]
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    return _TimeFunctions(d2i, not_after, to_tm, free)


def certificate_not_after(der: bytes) -> dt.datetime | None:
    """notAfter (UTC) of a DER certificate; None if this OpenSSL cannot say."""
    fns = _time_functions()
    if fns is None:
        return None
    cursor = ctypes.c_char_p(der)  # d2i advances the pointer it gets; `der` stays alive
    x509 = fns.d2i_x509(None, ctypes.byref(cursor), len(der))
    if not x509:
        return None
    try:
        tm = _Tm()
        asn1_time = fns.get0_not_after(x509)
        if not asn1_time or fns.asn1_time_to_tm(asn1_time, ctypes.byref(tm)) != 1:
            return None
        return dt.datetime(
            tm.year + 1900, tm.mon + 1, tm.mday, tm.hour, tm.min, tm.sec, tzinfo=dt.timezone.utc
        )
    finally:
        fns.x509_free(x509)

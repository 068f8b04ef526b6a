"""The files libpq opens for a connection: looked at with ``stat`` before every physical
connection, so a file replaced meanwhile is judged as it is now (E005, E006, E016, E018).
``Watch`` judges them again only when what ``stat`` says of them changed."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any

from .checkids import ROOT_FIX
from .errors import Violation, option_name, relative_note

__all__ = [
    "ENCRYPTED_KEY",
    "KEY",
    "KEY_WITHOUT_PASSPHRASE",
    "LOOSE_KEY",
    "MISSING",
    "UNCHANGED",
    "FileNeed",
    "Watch",
    "check_files",
    "file_problem",
    "file_problems",
    "file_violation",
    "home_directory",
    "key_mode_problem",
    "service_file_needs",
]

# -- the files libpq opens, checked before each physical connection ---------------------------
REGULAR, DIRECTORY = "file", "directory"
KEY = "private key"  # a regular file that libpq also refuses when others may read it (E018)
KEY_WITHOUT_PASSPHRASE = "private key, no sslpassword"  # ... and must not be encrypted (E018)
MISSING = "does not exist"
LOOSE_KEY = "can be read or written by group or others"
ENCRYPTED_KEY = "is an encrypted private key"


class FileNeed:
    """A file libpq opens for a connection: where it is, who set it, what it must be.

    ``required``: a missing file is refused (the root of trust); libpq skips the others
    when they do not exist. Anything present of the wrong type (a FIFO would block libpq
    while it holds the GIL, a directory fails obscurely) is refused by name. ``companion``:
    for the client key, the client certificate, without which libpq never reads the key.
    """

    __slots__ = ("code", "companion", "directory", "kind", "origin", "path", "required")

    def __init__(
        self,
        code: str,
        origin: str,
        path: str,
        kind: str = REGULAR,
        required: bool = False,
        companion: str | None = None,
    ) -> None:
        self.code = code
        self.origin = origin
        self.path = path
        self.kind = kind
        self.required = required
        self.companion = companion
        self.directory = os.path.dirname(path)  # judged before each connection: not re-derived


def file_problem(path: str, kind: str = REGULAR, companion: str | None = None) -> str | None:
    """Why ``path`` is not a usable file (or directory), checked with ``stat`` only.

    Never ``open`` before ``stat`` said it is a regular file: a FIFO or a device would block
    or have side effects. The one file read is a client key without ``sslpassword`` (is it
    encrypted?), once per version of the file.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if kind == DIRECTORY:
        if not stat.S_ISDIR(info.st_mode):
            return "is not a directory"
    elif stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    elif not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a FIFO, socket or device)"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    if kind in (KEY, KEY_WITHOUT_PASSPHRASE):
        return _key_problem(path, info, kind, companion)
    return None


def _key_problem(path: str, info: os.stat_result, kind: str, companion: str | None) -> str | None:
    # libpq judges key permissions outside Windows only.
    problem = key_mode_problem(info.st_uid, info.st_mode) if os.name != "nt" else None
    if problem is None and kind == KEY_WITHOUT_PASSPHRASE and _encrypted_pem(path, info):
        # OpenSSL would ask for the passphrase on the terminal, if the process has one, and
        # the connection would wait there for ever (measured: libpq 18); else it fails.
        problem = ENCRYPTED_KEY
    # libpq reads the key only after loading a certificate: a lone key is never judged.
    if problem is not None and (companion is None or os.path.exists(companion)):
        return problem
    return None


# What _encrypted_pem found, per (path, inode, mtime, size): a stat is all later connections pay.
_ENCRYPTION_SEEN: dict[tuple[str, int, int, int], bool] = {}
_PEM_ENCRYPTED = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def _encrypted_pem(path: str, info: os.stat_result) -> bool:
    """Whether a key file is PEM encrypted with a passphrase (PKCS#8 or OpenSSL's own form)."""
    key = (path, info.st_ino, info.st_mtime_ns, info.st_size)
    found = _ENCRYPTION_SEEN.get(key)
    if found is None:
        try:  # a regular file a moment ago; O_NONBLOCK in case it was swapped for a FIFO
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            try:
                head = os.read(fd, 65536)
            finally:
                os.close(fd)
        except OSError:
            return False  # libpq will say why it cannot read it
        found = any(marker in head for marker in _PEM_ENCRYPTED)
        if len(_ENCRYPTION_SEEN) > 64:  # renewed keys leave old entries behind
            _ENCRYPTION_SEEN.clear()
        _ENCRYPTION_SEEN[key] = found
    return found


def key_mode_problem(uid: int, mode: int) -> str | None:
    """libpq's rule on a client key (fe-secure-openssl.c): nothing for group or others when
    the user owns it (0600 or less), at most group read when root owns it (0640 or less)."""
    loose = (
        (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO) if uid == 0 else stat.S_IRWXG | stat.S_IRWXO
    )
    if mode & loose:
        owner = "root" if uid == 0 else "the user"
        return f"{LOOSE_KEY} (mode {stat.S_IMODE(mode):04o}, owned by {owner})"
    return None


def service_file_needs(service: str | None, environ: Mapping[str, str]) -> tuple[FileNeed, ...]:
    """The service files libpq reads while resolving a named service (before any rule)."""
    if not service:
        return ()
    user_file = environ.get("PGSERVICEFILE")
    needs = [
        FileNeed("E016", "PGSERVICEFILE", user_file)
        if user_file
        else FileNeed(
            "E016",
            "libpq's default service file",
            os.path.join(home_directory(environ), ".pg_service.conf"),
        )
    ]
    sysconf = environ.get("PGSYSCONFDIR")
    if sysconf:
        needs.append(
            FileNeed(
                "E016", "PGSYSCONFDIR's pg_service.conf", os.path.join(sysconf, "pg_service.conf")
            )
        )
    return tuple(needs)


def file_problems(needs: tuple[FileNeed, ...]) -> list[tuple[FileNeed, str]]:
    """What is wrong with the files now: ``stat`` only, so cheap enough for every connection.

    libpq's defaults under ``~/.postgresql`` (client certificate, key, CRL) are usually absent
    together with their directory: when a file is missing because its directory is (``access``
    on the directory, which raises nothing), the files below it are missing too, without a
    ``stat`` (and a FileNotFoundError) each."""
    found = []
    gone = None  # a directory found missing in this check
    for need in needs:
        if need.directory == gone:
            problem: str | None = MISSING
        else:
            problem = file_problem(need.path, need.kind, need.companion)
            if problem == MISSING and need.directory and not os.access(need.directory, os.F_OK):
                gone = need.directory
        if problem is not None and (need.required or problem != MISSING):
            found.append((need, problem))
    return found


# What a judgment depends on, as ``stat`` reports it: the file's identity, type and mode, owner,
# size, and its last change to contents or metadata in nanoseconds (a chmod, a chown, a rewrite
# in place, a replacement all change one of them).
_IDENTITY = attrgetter(
    "st_ino", "st_dev", "st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_ctime_ns"
)
_EXISTS = repeat(os.F_OK)
# What ``Watch.problems`` returns when stat says nothing changed since the files were found
# usable: no problem, and nothing new to remember (compared by identity).
UNCHANGED: tuple[tuple[FileNeed, str], ...] = ()


class Watch:
    """The files of one decision, as last found usable.

    Before every connection each file is still looked at, but by the cheapest ``stat`` that can
    tell a change: the files that were present by their identity (``_IDENTITY``), the absent
    ones by ``access`` (one per missing directory for those below it, no exception raised);
    only when that differs from what the last clean judgment saw are the rules run again
    (``file_problems``). A file changed between the look and the judgment is looked at again
    next time: the look is taken first.
    """

    __slots__ = ("_seen", "needs")

    def __init__(self, needs: tuple[FileNeed, ...]) -> None:
        self.needs = needs
        # (paths present, paths or directories absent, what stat said): one tuple, replaced
        # whole, so threads sharing a plan read a consistent one.
        self._seen: tuple[tuple[str, ...], tuple[str, ...], Any] | None = None

    def problems(self) -> Sequence[tuple[FileNeed, str]]:
        """``file_problems(self.needs)``, judged again only if a file changed (else
        ``UNCHANGED``, an empty tuple)."""
        seen = self._seen
        if seen is not None:
            present, absent, looked = seen
            try:
                now = (
                    tuple(map(_IDENTITY, map(os.stat, present))),
                    tuple(map(os.access, absent, _EXISTS)),
                )
            except OSError:  # one went away: judged below
                now = None
            if now == looked:
                return UNCHANGED
        present_now, absent_now = self._layout()
        try:
            looked = (
                tuple(map(_IDENTITY, map(os.stat, present_now))),
                tuple(map(os.access, absent_now, _EXISTS)),
            )
        except OSError:
            looked = None
        found = file_problems(self.needs)
        if not found and looked is not None:
            self._seen = (present_now, absent_now, looked)
        return found

    def _layout(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Which files exist now, and what to ask ``access`` about for those that do not
        (their directory, when it is missing too)."""
        present: list[str] = []
        absent: list[str] = []
        for need in self.needs:
            directory = need.directory
            if directory in absent:
                continue
            if os.access(need.path, os.F_OK):
                present.append(need.path)
            elif directory and not os.access(directory, os.F_OK):
                absent.append(directory)
            else:
                absent.append(need.path)
        return tuple(present), tuple(absent)


def check_files(needs: tuple[FileNeed, ...]) -> tuple[Violation, ...]:
    """The file rules (E005, E006, E016, E018) as violations, for the checks and dbshell."""
    return tuple(file_violation(need, problem) for need, problem in file_problems(needs))


def file_violation(need: FileNeed, problem: str) -> Violation:
    if need.code == "E005":
        return Violation(
            "E005",
            f"no root of trust: {option_name('sslrootcert')} is not set, nor PGSSLROOTCERT, nor "
            f"a service entry's sslrootcert, and {need.path} is not a readable file, so the "
            "server's certificate cannot be verified.",
        )
    relative = relative_note(need.path)  # "does not exist" from / but not from the project
    if need.code == "E006":
        return Violation(
            "E006", f"{need.origin} is {need.path!r}, which {problem}.{relative}", ROOT_FIX
        )
    if problem == ENCRYPTED_KEY:
        return Violation(
            "E018",
            f"{need.origin} is {need.path!r}, an encrypted private key, and "
            f"{option_name('sslpassword')} is not set: OpenSSL would ask for the passphrase on "
            "the terminal, and the connection wait there (or fail without one).",
            f"set {option_name('sslpassword')} to the key's passphrase, or store the key "
            "unencrypted with mode 0600.",
        )
    if problem.startswith(LOOSE_KEY):
        return Violation(
            "E018",
            f"{need.origin} is {need.path!r}, which {problem}; libpq refuses to use such a "
            "client key.",
            f"chmod 600 {need.path} (as the user that runs Django), or chmod 640 if root owns it.",
        )
    wanted = "a directory" if need.kind == DIRECTORY else "a regular file"
    return Violation(
        "E016",
        f"{need.origin} is {need.path!r}, which {problem}; libpq opens it for every "
        "connection and would block or fail on anything but " + wanted + "." + relative,
        f"point {need.origin} at {wanted} (or remove what is at {need.path}).",
    )


def home_directory(environ: Mapping[str, str]) -> str:
    """libpq's home directory: HOME, else the password database's."""
    return environ.get("HOME") or os.path.expanduser("~")

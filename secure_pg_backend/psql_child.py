"""psql as this process's child: its secrets in anonymous files, and it stops with us.

The passfile and the service file are anonymous files (memfd_create, else a temporary file
unlinked before anything is written to it) that psql inherits and libpq opens by name as
/dev/fd/N. They die with the last process holding them: a SIGKILL of manage.py dbshell, of psql
or of both leaves no file anywhere. Where /dev/fd cannot carry them (it must reopen the file
from its start each time, as Linux's /proc does; BSD and macOS share the offset instead), they
go into a private directory, removed when psql exits, on SIGTERM and SIGHUP too
(``StopTogether``), and swept by the next dbshell if this process was killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import PsqlSession

__all__ = [
    "StopTogether",
    "anonymous_file",
    "handed_over",
    "sweep_stale_directories",
]

_DIRECTORY_PREFIX = "spb-dbshell-"
_OWNER = re.compile(rf"{_DIRECTORY_PREFIX}(\d+)-")


@contextlib.contextmanager
def handed_over(
    files: Mapping[str, tuple[str, str]],
) -> Iterator[tuple[dict[str, str], tuple[int, ...]]]:
    """For ``{variable: (file name, text)}``: the environment variables naming each file as psql
    will open it, and the descriptors it must inherit; nothing of them left afterwards."""
    env: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        descriptors: list[int] = []
        for variable, (_, text) in files.items():
            descriptor = anonymous_file(text)
            if descriptor is None:
                break
            stack.callback(os.close, descriptor)
            descriptors.append(descriptor)
            env[variable] = f"/dev/fd/{descriptor}"
        else:
            yield env, tuple(descriptors)
            return
    with _private_directory() as directory:  # /dev/fd cannot carry them here
        for variable, (filename, text) in files.items():
            env[variable] = os.path.join(directory, filename)
            _write_private(env[variable], text)
        yield env, ()


def anonymous_file(text: str) -> int | None:
    """A descriptor of a nameless 0600 file holding ``text`` that libpq can open as
    ``/dev/fd/N`` (close-on-exec: only ``pass_fds`` hands it on); None where it cannot."""
    descriptor = _nameless_descriptor()
    if descriptor is None:
        return None
    data = text.encode()
    try:
        # memfd_create makes it 0777; libpq ignores a passfile the group or others could read.
        os.fchmod(descriptor, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        if _reopens_whole(descriptor, data):
            return descriptor
    except OSError:
        pass
    os.close(descriptor)
    return None


def _nameless_descriptor() -> int | None:
    memfd_create = getattr(os, "memfd_create", None)  # Linux 3.17+
    if memfd_create is not None:
        try:
            return int(memfd_create("spb-dbshell", os.MFD_CLOEXEC))
        except OSError:  # a seccomp filter or an old kernel
            pass
    import tempfile

    try:
        descriptor, path = tempfile.mkstemp(prefix=_DIRECTORY_PREFIX)  # 0600, close-on-exec
    except OSError:
        return None
    os.unlink(path)  # before anything is written: the secret never has a name
    return descriptor


def _reopens_whole(descriptor: int, data: bytes) -> bool:
    """Whether opening ``/dev/fd/N`` gives what libpq needs: a regular 0600 file (its
    passfile check follows the link) read from the start, each time (libpq opens it again
    for every connection it makes without a password in hand)."""
    path = f"/dev/fd/{descriptor}"
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode) or stat.S_IMODE(mode) & 0o077:
            return False
        for _ in range(2):
            with open(path, "rb") as handle:
                if handle.read(len(data) + 1) != data:
                    return False
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _private_directory() -> Iterator[str]:
    import shutil
    import tempfile

    # mode 0700, this user only; named after this process so that a sweep knows it is dead
    directory = tempfile.mkdtemp(prefix=f"{_DIRECTORY_PREFIX}{os.getpid()}-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def sweep_stale_directories(root: str | None = None) -> list[str]:
    """Remove this user's private dbshell directories whose process is gone (killed before it
    could remove them, or written by a version that named no process); return their paths."""
    import shutil
    import tempfile

    root = root or tempfile.gettempdir()
    try:
        names = [name for name in os.listdir(root) if name.startswith(_DIRECTORY_PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(root, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        # Never through a symbolic link, never another user's.
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        owner = _OWNER.match(name)
        if owner is not None and _running(int(owner.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has that number now: keep it
        return True
    return True


def _write_private(path: str, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


# -- psql stops with this process ------------------------------------------------------------
# SIGTERM and SIGHUP (docker stop, systemctl stop, a closed kubectl exec or ssh session) are
# forwarded to psql and waited for, so its private files are closed or removed and the
# terminal restored; then this process gets the signal again, under its previous handler.
# SIGKILL cannot be caught: on Linux psql asks the kernel for SIGTERM when its parent dies
# (PR_SET_PDEATHSIG, set between fork and exec). SIGINT stays psql's alone (it cancels a
# query), as in Django.

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class _Stopped(BaseException):
    """A stop signal arrived before psql started: nothing to wait for. A BaseException, so
    that no ``except Exception`` on the way (a password provider's) holds it up."""


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


class StopTogether:
    """``with StopTogether() as stop: stop.run(session)``: psql does not outlive this process.

    The child publishes its pid in memory shared across the fork (``subprocess.run``, which
    Django's own dbshell test replaces, does not give the parent its Popen) before exec; a
    stop flag the other way covers a signal that arrives while the child is being set up.
    """

    def __init__(self) -> None:
        import mmap

        self._shared = mmap.mmap(-1, 9)  # MAP_SHARED: pid (8 bytes), stop flag (1 byte)
        self._parent = os.getpid()
        self._previous: dict[int, Any] = {}
        self._prctl = _prctl()
        self.received: int | None = None

    def __enter__(self) -> StopTogether:
        for signum in _STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_IGN, None):  # nohup: psql ignores it too, as in stock
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._shared.close()
        if self.received is None:
            return  # an exception (not _Stopped, which comes with a signal) goes on
        # psql has exited and its files are gone: now this process takes the signal, as it
        # would have without dbshell (the default handler ends it with status 128 + signal).
        signal.raise_signal(self.received)
        from django.core.management.base import CommandError

        name = signal.Signals(self.received).name
        raise CommandError(f"dbshell stopped by {name}", returncode=128 + self.received)

    def _on_signal(self, signum: int, frame: object) -> None:
        if os.getpid() != self._parent:  # the forked child, before exec: just end
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        again = self.received is not None
        self.received = self.received or signum
        self._shared[8] = 1
        pid = struct.unpack_from("q", self._shared, 0)[0]
        if pid == 0:
            raise _Stopped
        if pid > 0:  # psql is running: stop it (a second signal: kill it) and wait for it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if again else signum)

    def _in_child(self) -> None:
        """Between fork and exec: a stop from now on ends the child (exec would lose
        it), the kernel stops psql when this process dies, then the pid is published."""
        for signum in self._previous:
            signal.signal(signum, signal.SIG_DFL)
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != self._parent:  # it died before the request took effect
                os.kill(os.getpid(), signal.SIGTERM)
        struct.pack_into("q", self._shared, 0, os.getpid())
        if self._shared[8]:
            os.kill(os.getpid(), signal.SIGTERM)

    def run(self, session: PsqlSession) -> int:
        """psql's exit status; SIGINT is ignored here while it runs (it cancels psql's query)."""
        sigint_handler = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            subprocess.run(
                session.argv,
                env=session.env,
                pass_fds=session.pass_fds,
                preexec_fn=self._in_child,
                check=True,
            )
        except subprocess.CalledProcessError as exc:
            return exc.returncode
        finally:
            struct.pack_into("q", self._shared, 0, -1)  # reaped: its pid is no longer its own
            signal.signal(signal.SIGINT, sigint_handler)
        return 0

"""A TCP proxy on loopback that delivers every chunk a fixed time after it arrived.

Loopback round trips take microseconds, which hides any saving in round trips, and
``tc netem`` needs privileges and a kernel module the benchmark cannot count on. This
proxy adds ``rtt / 2`` in each direction, so every request/response exchange costs one
``rtt``, as between two machines. Order is kept; bandwidth is not limited.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

_CHUNK = 65536
_EOF = b""


class DelayProxy:
    """``with DelayProxy(target_port, rtt_s=0.005) as proxy:`` then connect to ``proxy.port``."""

    def __init__(self, target_port: int, rtt_s: float) -> None:
        self.target = ("127.0.0.1", target_port)
        self.one_way_s = rtt_s / 2
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> DelayProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown() does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):  # as libpq and the server do
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._spawn(self._relay, client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        """Both directions of one connection; close both sockets when both have ended."""
        directions = [
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True),
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True),
        ]
        for thread in directions:
            thread.start()
        for thread in directions:
            thread.join()
        client.close()
        upstream.close()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        """Read from ``src``; a writer thread sends each chunk ``one_way_s`` after it came."""
        due: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        writer = threading.Thread(target=self._deliver, args=(due, dst), daemon=True)
        writer.start()
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = _EOF
            due.put((time.monotonic() + self.one_way_s, data))
            if data == _EOF:
                break
        writer.join()

    @staticmethod
    def _deliver(due: queue.SimpleQueue[tuple[float, bytes]], dst: socket.socket) -> None:
        broken = False
        while True:
            at, data = due.get()
            wait = at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if data == _EOF:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)  # pass the end of stream on
                return
            if not broken:
                try:
                    dst.sendall(data)
                except OSError:
                    broken = True  # the peer is gone: drain the queue until EOF


class DelayProxyProcess:
    """``DelayProxy`` in a child process: ``with DelayProxyProcess(port, rtt_s) as proxy:``.

    In the measuring process the proxy's threads would wait for the GIL while the client runs
    Python (Django, the backend), up to the 5 ms switch interval: noise as large as a 1 ms round
    trip. In its own process its delays are the ones asked for.
    """

    def __init__(self, target_port: int, rtt_s: float) -> None:
        self._args = [sys.executable, "-m", "bench.delay_proxy", str(target_port), str(rtt_s)]
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> DelayProxyProcess:
        root = Path(__file__).resolve().parent.parent
        self._process = subprocess.Popen(
            self._args, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__()
            raise RuntimeError(f"the delaying proxy did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # the child exits when its stdin ends
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _serve(target_port: int, rtt_s: float) -> None:
    """The child: print the port, relay until stdin ends (the parent exited or closed it)."""
    with DelayProxy(target_port, rtt_s) as proxy:
        print(proxy.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), float(sys.argv[2]))

"""systemd integration: sd_notify and socket activation, without libsystemd.

Both protocols are small and stable (sd_notify(3), sd_listen_fds(3)), so they
are spoken directly: a datagram to ``$NOTIFY_SOCKET``, and the listening
sockets systemd passes as file descriptors 3, 4, ... with ``$LISTEN_FDS`` and
``$LISTEN_PID``.
"""

from __future__ import annotations

import os
import socket
import stat
import time

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes (sd_listen_fds(3))."""

_WILDCARD_HOSTS = ("0.0.0.0", "[::]")


class Notifier:
    """Sends sd_notify messages when NOTIFY_SOCKET is set; otherwise does nothing."""

    def __init__(self, path: str) -> None:
        # As given in the environment, so a USR2 re-exec can pass it on.
        self.env_value = path
        self.path = path
        if path.startswith("@"):
            # Abstract namespace socket.
            self.path = "\0" + path[1:]

    @classmethod
    def from_env(cls) -> Notifier:
        """Take NOTIFY_SOCKET from the environment and remove it (workers must not see it)."""
        return cls(os.environ.pop("NOTIFY_SOCKET", ""))

    def send(self, message: str) -> None:
        """Send one datagram; failures are ignored (systemd may be gone)."""
        if not self.path:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.path)
                s.sendall(message.encode())
        except OSError:
            pass

    def ready(self, status: str) -> None:
        """Every app has its workers ready."""
        self.send(f"READY=1\nSTATUS={_one_line(status)}\nMAINPID={os.getpid()}")

    def reloading(self) -> None:
        """A HUP reload began (systemd ≥ 253 wants MONOTONIC_USEC with it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading")

    def stopping(self) -> None:
        """Shutdown began."""
        self.send("STOPPING=1\nSTATUS=stopping")


def _one_line(text: str) -> str:
    """A newline would end the STATUS= assignment and start a bogus one."""
    return " ".join(text.splitlines())


class InheritedSockets(dict[str, socket.socket]):
    """Passed sockets by listen key; ``":8080"`` also finds a wildcard socket on port 8080.

    ``ListenStream=8080`` gives a socket bound to ``[::]:8080`` (dual stack) and
    ``ListenStream=0.0.0.0:8080`` one bound to ``0.0.0.0:8080``; the flypool
    spelling of "every address" is ``":8080"``, so lookups of that form try both.
    Each socket is stored once, under the address it is bound to.
    """

    def _key(self, key: str) -> str:
        if key.startswith(":") and key not in self:
            for host in _WILDCARD_HOSTS:
                if host + key in self:
                    return host + key
        return key

    def get(self, key: str, default: socket.socket | None = None) -> socket.socket | None:  # type: ignore[override]
        """Like dict.get, with the wildcard spelling understood."""
        return super().get(self._key(key), default)

    def pop(self, key: str, *default: socket.socket | None) -> socket.socket | None:  # type: ignore[override]
        """Like dict.pop, with the wildcard spelling understood."""
        return super().pop(self._key(key), *default)


def _address_key(sock: socket.socket) -> str:
    """The ``listen`` entry spelling of the address ``sock`` is bound to."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return "unix:" + (
            name.decode(errors="surrogateescape") if isinstance(name, bytes) else name
        )
    host, port = name[0], name[1]
    if sock.family == socket.AF_INET6:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _stream_socket(fd: int) -> socket.socket | None:
    """The listening stream socket at ``fd``, or None for anything else systemd may pass.

    A unit may also pass FIFOs, datagram sockets or stored fds; those are left
    alone (not ours to close, and not something HTTP can be served on).
    """
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    if sock.type != socket.SOCK_STREAM or sock.family not in (
        socket.AF_UNIX,
        socket.AF_INET,
        socket.AF_INET6,
    ):
        sock.detach()
        return None
    return sock


def listen_fds() -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, keyed like a ``listen`` entry.

    Keys look like ``"unix:/run/flypool/blog.sock"``, ``"127.0.0.1:8080"`` or
    ``"[::1]:8080"``; ``":8080"`` finds a socket bound to every address.
    LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES are removed from the environment in any
    case (as sd_listen_fds(1) does), and the sockets are made close-on-exec, so
    workers neither see nor inherit them.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    out = InheritedSockets()
    try:
        if int(pid) != os.getpid():
            return out
        n = int(count)
    except ValueError:
        return out
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(n, 0)):
        sock = _stream_socket(fd)
        if sock is None:
            continue
        sock.set_inheritable(False)
        sock.setblocking(False)
        out[_address_key(sock)] = sock
    return out

"""systemd integration: sd_notify and socket activation, without libsystemd."""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends sd_notify messages when NOTIFY_SOCKET is set; otherwise does nothing."""

    def __init__(self, path: str) -> None:
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
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self.path)
                s.sendall(message.encode())
        except OSError:
            pass

    def ready(self, status: str) -> None:
        """Every app has its workers ready."""
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def reloading(self) -> None:
        """A HUP reload began (systemd ≥ 253 wants MONOTONIC_USEC with it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading")

    def stopping(self) -> None:
        """Shutdown began."""
        self.send("STOPPING=1\nSTATUS=stopping")


def _address_key(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return "unix:" + (name.decode() if isinstance(name, bytes) else name)
    host, port = name[0], name[1]
    if sock.family == socket.AF_INET6:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def listen_fds() -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, keyed like a ``listen`` entry.

    LISTEN_FDS/LISTEN_PID are removed from the environment so workers don't
    try to use them.
    """
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    out: dict[str, socket.socket] = {}
    for fd in range(3, 3 + count):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        out[_address_key(sock)] = sock
    return out

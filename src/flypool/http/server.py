"""Front listeners: bind, hand connections to the router, sweep timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import socket
import stat

from flypool.config import ListenAddress
from flypool.http.client import ClientConnection
from flypool.http.request import ServerState
from flypool.http.router import Router

MIN_BACKLOG = 2048
UPSTREAM_MAX_IDLE = 1.0


class ListenError(Exception):
    """A front or admin socket could not be bound; the message says why."""


def backlog() -> int:
    """At least 2048 (Passenger's figure), more if the kernel allows it."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(MIN_BACKLOG, int(f.read()))
    except (OSError, ValueError):
        return MIN_BACKLOG


def _unix_in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def bind_unix(path: str, mode: int, group: str = "") -> socket.socket:
    """Bind a Unix listener, removing a stale socket file but never a live one."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ListenError(f"{path}: exists and is not a socket")
        if _unix_in_use(path):
            raise ListenError(
                f"{path}: another process is listening on it (is another flypool running?)"
            )
        os.unlink(path)
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ListenError(f"{path}: directory {parent} does not exist")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if group:
            # So the web server's group (www-data) can connect to a 0660 socket.
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(backlog())
    except KeyError:
        sock.close()
        raise ListenError(f"{path}: listen_group {group!r} does not exist") from None
    except OSError as exc:
        sock.close()
        raise ListenError(f"{path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind a TCP listener with SO_REUSEADDR (never SO_REUSEPORT: no stealing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "0.0.0.0", port))
        sock.listen(backlog())
    except OSError as exc:
        sock.close()
        hint = " (is another flypool running?)" if exc.errno == errno.EADDRINUSE else ""
        raise ListenError(f"{host}:{port}: {exc.strerror or exc}{hint}") from exc
    sock.setblocking(False)
    return sock


def bind(addr: ListenAddress, mode: int, group: str = "") -> socket.socket:
    """Bind one configured listen address."""
    if addr.kind == "unix":
        return bind_unix(addr.path, mode, group)
    return bind_tcp(addr.host, addr.port)


async def serve(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, router: Router, state: ServerState
) -> asyncio.AbstractServer:
    """Start accepting on an already bound socket."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return await loop.create_server(
        # proxy_protocol is read at each accept, so a reload applies to new connections.
        lambda: ClientConnection(router, state, loop, proxy_protocol=router.proxy_protocol),
        sock=sock,
        backlog=backlog(),
    )


async def sweep(state: ServerState, routers: list[Router]) -> None:
    """Close idle upstream connections and enforce client and request timeouts, forever."""
    loop = asyncio.get_running_loop()
    tick = 0
    while True:
        await asyncio.sleep(0.25)
        now = loop.time()
        for r in routers:
            r.sweep_idle(now, UPSTREAM_MAX_IDLE)
        tick += 1
        if tick % 4 == 0:
            for conn in list(state.connections):
                conn.check_timeout(now)
            for r in routers:
                r.sweep_request_time(now)


def remove_socket_file(addr: ListenAddress) -> None:
    """Remove a Unix listener's file at shutdown."""
    if addr.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(addr.path)

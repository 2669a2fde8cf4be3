"""USR2: replace the daemon's own code without touching a worker or a client.

Theory of operation
-------------------
The daemon re-executes itself in place (``execv``), so it keeps its PID:
systemd and runit see no exit, and the workers stay its children, so it can
still reap them. What crosses the ``execv`` is a set of file descriptors
(their close-on-exec flag cleared) and a small JSON file describing them:

- the listening sockets (front and admin): connections that arrive during
  the switch wait in the kernel backlog;
- every worker: pid, socket, release, counters, and the read ends of its
  stdout/stderr pipes;
- idle keep-alive client connections. Before the switch each connection is
  *frozen* the moment it has no request in progress: reading is paused, so
  the next request stays in the kernel buffer for the new image to read.
  Connections still busy after ``drain_timeout`` are closed, and WebSocket
  tunnels are closed: their state cannot be passed on.

The new image finds ``FLYPOOL_HANDOVER`` in its environment, adopts all of
it (workers are watched through pidfds, see ``spawner.AdoptedProcess``) and
goes on serving. If anything fails before ``execv``, the old image simply
resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, cast

from flypool.http.client import ClientConnection
from flypool.pool.spawner import AdoptedProcess, follow_output
from flypool.pool.worker import Worker, WorkerState

if TYPE_CHECKING:
    from flypool.daemon import Daemon

STATE_ENV = "FLYPOOL_HANDOVER"


def _keep(fd: int) -> int:
    """A duplicate of ``fd`` that survives execv."""
    new = os.dup(fd)
    os.set_inheritable(new, True)
    return new


def keep_socket(sock: socket.socket) -> int:
    """An inheritable duplicate of a socket's descriptor."""
    return _keep(sock.fileno())


def keep_fd(fd: int) -> int:
    """An inheritable duplicate of a plain descriptor (worker output pipes)."""
    return _keep(fd)


def write_state(runtime_dir: str, state: dict[str, Any]) -> str:
    """Write the state file the next image reads; return its path."""
    path = os.path.join(runtime_dir, "handover.json")
    state["written_at"] = time.time()
    with open(path, "w") as f:
        json.dump(state, f)
    return path


def exec_self(state_path: str) -> None:
    """Become a fresh copy of flypool with the same command line (never returns)."""
    os.environ[STATE_ENV] = state_path
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def read_state() -> dict[str, Any] | None:
    """The hand-over state when this process was started by USR2, else None."""
    path = os.environ.pop(STATE_ENV, "")
    if not path:
        return None
    try:
        with open(path) as f:
            state: dict[str, Any] = json.load(f)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return state


def adopt_socket(fd: int) -> socket.socket:
    """Wrap an inherited descriptor, close-on-exec again so workers don't get it."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


async def hand_over(daemon: Daemon) -> None:
    """USR2 in the old image: freeze, collect, write the state file, execv."""
    if daemon.handing_over or daemon.stop_event.is_set():
        return
    loop = asyncio.get_running_loop()
    log = daemon.log
    # A restart or spawn in progress holds state that can't cross execv: wait.
    deadline = loop.time() + 60.0
    while any(p.rollout is not None or p._spawning for p in daemon.pools.values()):
        if loop.time() > deadline:
            log.error("hand-over abandoned: a restart is still running")
            return
        await asyncio.sleep(0.05)
    daemon.handing_over = True
    log.info("hand-over begins", pid=os.getpid())
    daemon.notifier.reloading()
    listeners = {}
    for server, key in zip(daemon.servers, daemon.server_keys, strict=True):
        for sock in cast(asyncio.Server, server).sockets:
            listeners[key] = {"fd": keep_socket(sock), "owned": key in daemon.owned}
        server.close()
    for key, sock in daemon.inherited.items():
        listeners[key] = {"fd": keep_socket(sock), "owned": False}
    assert daemon.admin is not None
    admin_fd = keep_socket(cast(asyncio.Server, daemon.admin).sockets[0])
    daemon.admin.close()
    # Freeze connections as they fall idle; the busy ones get drain_timeout.
    state = daemon.state
    state.handing_over = True
    for conn in list(state.connections):
        if conn.is_idle():
            conn.freeze()
    limit = max((p.cfg.drain_timeout for p in daemon.pools.values()), default=0.0)
    deadline = loop.time() + limit
    # Tunnels can't be passed on (their state is in two sockets and a worker):
    # they are closed by the switch, so there is no point waiting for them.
    while loop.time() < deadline and any(not c.frozen and not c.tunnel for c in state.connections):
        await asyncio.sleep(0.005)
    clients = []
    for conn in list(state.connections):
        transport = conn.transport
        if conn.frozen and transport is not None:
            sock = transport.get_extra_info("socket")
            clients.append({"app": conn.router.app, "fd": keep_socket(sock)})
    workers = []
    now = loop.time()
    for pool in daemon.pools.values():
        for w in pool.workers:
            if w.state.value != "ready" or w.output_fds[0] < 0:
                continue
            workers.append(
                {
                    "app": pool.name,
                    "pid": w.pid,
                    "number": w.number,
                    "generation": w.generation,
                    "release": w.release,
                    "address": w.address,
                    "uptime_s": now - w.started_at,
                    "processed": w.processed,
                    "restarts": w.restarts,
                    "out_fd": keep_fd(w.output_fds[0]),
                    "err_fd": keep_fd(w.output_fds[1]),
                }
            )
    pools = {
        p.name: {
            "generation": p.generation,
            "next_number": p._next_number,
            "restart_seq": p.restart_seq,
            "last_restart": p.last_restart,
            "deployment_error": p.deployment_error,
            "drained": p.router.drained,
            "restarts_total": p.restarts_total,
        }
        for p in daemon.pools.values()
    }
    path = write_state(
        daemon.runtime_dir,
        {
            "runtime_dir": daemon.runtime_dir,
            "listeners": listeners,
            "admin_fd": admin_fd,
            "workers": workers,
            "clients": clients,
            "pools": pools,
            "uptime_s": now - daemon.started_at,
        },
    )
    log.info("hand-over: executing the new image", workers=len(workers), clients=len(clients))
    if daemon.notifier.env_value:
        # The next image owes systemd the READY=1 that ends this reload.
        os.environ["NOTIFY_SOCKET"] = daemon.notifier.env_value
    exec_self(path)


async def adopt(daemon: Daemon, handed: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    """In the new image: take over what the previous image passed on."""
    daemon.started_at = loop.time() - handed.get("uptime_s", 0.0)
    for name, info in handed["pools"].items():
        pool = daemon.pools.get(name)
        if pool is None:
            continue
        pool.generation = info["generation"]
        pool._next_number = info["next_number"]
        pool.restart_seq = info["restart_seq"]
        pool.last_restart = info["last_restart"]
        pool.deployment_error = info["deployment_error"]
        pool.restarts_total = info["restarts_total"]
        pool.router.drained = info.get("drained", False)
    now = loop.time()
    for ws in handed["workers"]:
        for fd in (ws["out_fd"], ws["err_fd"]):
            os.set_inheritable(fd, False)
        pool = daemon.pools.get(ws["app"])
        if pool is None:
            # The app left the configuration: its workers go.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ws["pid"], signal.SIGTERM)
            continue
        w = Worker(
            ws["number"], ws["generation"], ws["release"], ws["address"], now - ws["uptime_s"]
        )
        w.pid = ws["pid"]
        w.processed = ws["processed"]
        w.restarts = ws["restarts"]
        w.last_used = now
        w.state = WorkerState.READY
        try:
            w.proc = AdoptedProcess(w.pid)
        except ProcessLookupError:
            continue  # exited during the switch; the pool refills its slot
        pool.workers.append(w)
        await follow_output(w, ws["out_fd"], ws["err_fd"], pool.name, pool.log)
        pool.task(pool.watch(w, w.proc))
    for c in handed["clients"]:
        pool = daemon.pools.get(c["app"])
        sock = adopt_socket(c["fd"])
        if pool is None:
            sock.close()
            continue
        router = pool.router
        await loop.connect_accepted_socket(
            lambda r=router: ClientConnection(r, daemon.state, loop),  # type: ignore[misc]
            sock=sock,
        )
    daemon.log.info(
        "hand-over complete",
        pid=os.getpid(),
        workers=len(handed["workers"]),
        clients=len(handed["clients"]),
    )

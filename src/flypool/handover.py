"""USR2: replace the daemon's own code without touching a worker or a client.

Theory of operation
-------------------
The daemon re-executes itself in place (``execv``), so it keeps its PID:
systemd and runit see no exit, and the workers stay its children, so it can
still reap them. What crosses the ``execv`` is a set of file descriptors
(their close-on-exec flag cleared) and a small JSON file describing them:

- the listening sockets (front and admin): connections that arrive during
  the switch wait in the kernel backlog;
- every worker, in whatever state (spawning, ready, draining, stopping),
  with its deadlines, counters and the read ends of its output pipes; and
  each pool's desired state: the target count (scale, TTIN/TTOU, elastic),
  the generation and a restart in progress;
- idle keep-alive client connections. Each connection is *frozen* the
  moment it has no request in progress: reading is paused, so the next
  request stays in the kernel buffer for the new image. Connections still
  busy after ``drain_timeout`` are closed; WebSocket tunnels are closed.
- the signals that arrived meanwhile (TERM, QUIT, HUP, USR2): the new image
  carries them out.

It is a transaction. :func:`prepare` does everything that can fail without
changing anything (the interpreter is executable, the state file can be
created). Only then is anything frozen or closed, and every step keeps what
it needs to undo itself: listeners are closed through duplicates of their
descriptors, so if a later step fails (the state file cannot be written,
``execv`` fails) the old image accepts on the very same sockets again, its
admin socket answers again, frozen connections read again, the pools spawn
again, and the queued signals are carried out by the old image.

``FLYPOOL_TEST_EXEC_FAIL=1`` in the daemon's environment makes the exec
step fail, so tests can check the undo path.
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
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Protocol

from flypool.http.client import ClientConnection
from flypool.pool import snapshot
from flypool.pool.preload_launcher import PreloadLauncher, reap_previous
from flypool.pool.spawner import AdoptedProcess, ProcessHandle, follow_output
from flypool.pool.stack_dump import LineFanout
from flypool.pool.worker import Worker, WorkerState
from flypool.preload import PreloadedProcess, lifeline

if TYPE_CHECKING:
    from flypool.http.request import ServerState
    from flypool.pool.app import AppPool
    from flypool.systemd import Notifier

STATE_ENV = "FLYPOOL_HANDOVER"
EXEC_FAIL_ENV = "FLYPOOL_TEST_EXEC_FAIL"
# Blocked from just before the state is written until the new image has its
# handlers: a signal arriving in between stays pending across execv instead
# of being lost.
HANDOVER_SIGNALS = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
}
# Waiting for connections to fall idle wakes on every finished request, and
# at least this often (a connection that times out sends no event).
WAIT_TICK_S = 0.05
# Workers whose process is being created get this long to have a pid.
UNBORN_WAIT_S = 10.0


class HandoverHost(Protocol):
    """What the hand-over reads and calls on the daemon (flypool.daemon.Daemon)."""

    log: Any
    runtime_dir: str
    started_at: float
    handing_over: bool
    pending: list[str]
    state: ServerState
    notifier: Notifier
    pools: dict[str, AppPool]
    stop_event: asyncio.Event

    def listening(self) -> list[tuple[str, socket.socket, bool, bool]]:
        """(key, socket, bound by this daemon, accepted on) of every listener."""

    def admin_socket(self) -> socket.socket:
        """The admin server's listening socket."""

    def stop_listening(self) -> None:
        """Stop accepting on every listener and the admin socket."""

    async def resume_listening(self, socks: dict[str, socket.socket], admin: socket.socket) -> None:
        """Accept again on these sockets (the hand-over failed)."""

    def run_pending(self, commands: list[str]) -> None:
        """Carry out commands queued during the hand-over."""


class HandoverError(Exception):
    """A step of the hand-over failed; the old image goes on."""


def _keep(fd: int) -> int:
    """A duplicate of ``fd`` that survives execv."""
    new = os.dup(fd)
    os.set_inheritable(new, True)
    return new


def keep_socket(sock: socket.socket) -> int:
    """An inheritable duplicate of a socket's descriptor."""
    return _keep(sock.fileno())


def adopt_socket(fd: int) -> socket.socket:
    """Wrap an inherited descriptor, close-on-exec again so workers don't get it."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


@dataclass
class Prepared:
    """What :func:`prepare` checked and opened."""

    argv: list[str]
    path: str
    file: IO[str]


def prepare(runtime_dir: str) -> Prepared:
    """Everything that can fail before anything changes; raise HandoverError."""
    exe = sys.executable
    if not exe or not os.access(exe, os.X_OK):
        raise HandoverError(f"interpreter {exe!r} is not executable")
    argv = [exe, *sys.orig_argv[1:]]
    path = os.path.join(runtime_dir, "handover.json")
    try:
        f = open(path, "w")  # noqa: SIM115 (closed by the transaction)
    except OSError as exc:
        raise HandoverError(f"cannot create the state file {path}: {exc}") from exc
    return Prepared(argv, path, f)


def exec_self(argv: list[str], state_path: str) -> None:
    """Become a fresh copy of flypool with the same command line (returns only on failure)."""
    if os.environ.get(EXEC_FAIL_ENV):
        raise OSError(f"exec failed on purpose ({EXEC_FAIL_ENV} is set)")
    os.environ[STATE_ENV] = state_path
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    finally:
        os.environ.pop(STATE_ENV, None)


def read_state() -> dict[str, Any] | None:
    """The hand-over state when this process was started by USR2, else None."""
    path = os.environ.pop(STATE_ENV, "")
    if not path:
        return None
    try:
        with open(path) as f:
            state: dict[str, Any] = json.load(f)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return state


def unblock_signals() -> None:
    """Let the hand-over signals through again (new image: handlers are installed)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOVER_SIGNALS)


@dataclass
class _Undo:
    """What a failed hand-over must give back."""

    listeners: dict[str, tuple[int, bool]] = field(default_factory=dict)
    serving: set[str] = field(default_factory=set)
    admin_fd: int = -1
    closed: bool = False
    frozen: bool = False
    passed_fds: list[int] = field(default_factory=list)
    blocked: bool = False


async def hand_over(host: HandoverHost) -> None:
    """USR2 in the old image: prepare, freeze, collect, write the state, execv."""
    if host.handing_over or host.stop_event.is_set():
        return
    log = host.log
    try:
        prep = prepare(host.runtime_dir)
    except HandoverError as exc:
        log.error("hand-over refused; nothing changed", error=str(exc))
        return
    host.handing_over = True
    host.notifier.reloading()
    log.info("hand-over begins", pid=os.getpid())
    undo = _Undo()
    try:
        await _run(host, prep, undo)
    except Exception as exc:  # every failure is undone the same way
        log.error("hand-over failed; the old image goes on serving", error=repr(exc))
        await _rollback(host, prep, undo)
        host.handing_over = False
        pending, host.pending = host.pending, []
        host.notifier.ready("hand-over failed; serving")
        host.run_pending(pending)


async def _run(host: HandoverHost, prep: Prepared, undo: _Undo) -> None:
    loop = asyncio.get_running_loop()
    pools = list(host.pools.values())
    for pool in pools:
        pool.controller.freeze()
    undo.frozen = True
    for key, sock, owned, serving in host.listening():
        undo.listeners[key] = (keep_socket(sock), owned)
        if serving:
            undo.serving.add(key)
    undo.admin_fd = keep_socket(host.admin_socket())
    host.stop_listening()
    undo.closed = True
    # Freeze connections as they fall idle; the busy ones get drain_timeout.
    state = host.state
    state.handing_over = True
    for conn in list(state.connections):
        if conn.is_idle():
            conn.freeze()
    limit = max((p.cfg.drain_timeout for p in pools), default=0.0)
    deadline = loop.time() + limit
    unborn_deadline = loop.time() + UNBORN_WAIT_S
    while True:
        # Tunnels can't be passed on (their state is in two sockets and a
        # worker): the switch closes them, so there is no point waiting.
        busy = any(not c.frozen and not c.tunnel for c in state.connections)
        unborn = sum(p.controller.unborn() for p in pools)
        now = loop.time()
        if unborn and now >= unborn_deadline:
            raise HandoverError(f"{unborn} worker(s) still being started")
        if not unborn and (not busy or now >= deadline):
            break
        await _any_change(pools, WAIT_TICK_S)
    # From here on no await: nothing can change between collecting and execv.
    # Signals are blocked so that one arriving now waits for the new image.
    await asyncio.sleep(0)
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDOVER_SIGNALS)
    undo.blocked = True
    await asyncio.sleep(0)  # run handlers of signals that arrived just before
    now = loop.time()
    clients = []
    for conn in list(state.connections):
        transport = conn.transport
        if conn.frozen and transport is not None:
            fd = keep_socket(transport.get_extra_info("socket"))
            undo.passed_fds.append(fd)
            clients.append({"app": conn.router.app, "fd": fd})
    workers = [_worker_state(p.name, w, now, undo) for p in pools for w in p.workers]
    # Preloaded workers hold the read end of the lifeline: its write end must
    # cross the execv, or the kernel signals them all at the switch.
    lifeline_fds = [_keep(fd) for fd in lifeline.existing() or ()]
    undo.passed_fds.extend(lifeline_fds)
    preloaders = [
        pid
        for p in pools
        if isinstance(p.controller.launcher, PreloadLauncher)
        for pid in p.controller.launcher.handover_pids()
    ]
    doc = {
        "runtime_dir": host.runtime_dir,
        "listeners": {k: {"fd": fd, "owned": owned} for k, (fd, owned) in undo.listeners.items()},
        "admin_fd": undo.admin_fd,
        "workers": workers,
        "clients": clients,
        "pools": {
            p.name: {**snapshot.snapshot(p.controller, now), "drained": p.router.drained}
            for p in pools
        },
        "uptime_s": now - host.started_at,
        "lifeline": lifeline_fds,
        "preloaders": preloaders,
        "pending": list(host.pending),
        "written_at": time.time(),
    }
    with prep.file as f:
        json.dump(doc, f)
    host.log.info("hand-over: executing the new image", workers=len(workers), clients=len(clients))
    if host.notifier.env_value:
        # The next image owes systemd the READY=1 that ends this reload.
        os.environ["NOTIFY_SOCKET"] = host.notifier.env_value
    exec_self(prep.argv, prep.path)


async def _any_change(pools: list[AppPool], timeout: float) -> None:
    waits = [asyncio.ensure_future(p.controller.changed()) for p in pools]
    if not waits:
        await asyncio.sleep(timeout)
        return
    _done, pending = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
    for t in pending:
        t.cancel()


def _worker_state(app: str, w: Worker, now: float, undo: _Undo) -> dict[str, Any]:
    fds = [-1, -1]
    for i, fd in enumerate(w.output_fds):
        if fd >= 0:
            with contextlib.suppress(OSError):
                fds[i] = _keep(fd)
                undo.passed_fds.append(fds[i])
    # A preloaded worker is not our child: the new image watches it through
    # this pidfd (never through a pid that may have been reused).
    pidfd = w.proc.pidfd if isinstance(w.proc, PreloadedProcess) else None
    if pidfd is not None:
        pidfd = _keep(pidfd)
        undo.passed_fds.append(pidfd)
    return {
        "app": app,
        "pid": w.pid,
        "number": w.number,
        "generation": w.generation,
        "release": w.release,
        "address": w.address,
        "state": w.state.value,
        "uptime_s": now - w.started_at,
        "ready_age_s": now - w.ready_at if w.ready_at else None,
        "idle_s": now - w.last_used,
        "deadline_in_s": w.deadline - now,
        "processed": w.processed,
        "restarts": w.restarts,
        "replace_reason": w.replace_reason,
        "extra": w.extra,
        "spawn": w.spawn,
        "rss_bytes": w.rss_bytes,
        "attempt": w.attempt,
        "out_fd": fds[0],
        "err_fd": fds[1],
        "pidfd": -1 if pidfd is None else pidfd,
    }


async def _rollback(host: HandoverHost, prep: Prepared, undo: _Undo) -> None:
    """Give back everything a failed hand-over took, in reverse order."""
    log = host.log
    with contextlib.suppress(OSError):
        prep.file.close()
    with contextlib.suppress(OSError):
        os.unlink(prep.path)
    for fd in undo.passed_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    state = host.state
    state.handing_over = False
    for conn in list(state.connections):
        if conn.frozen:
            conn.thaw()
    if undo.closed:
        socks = {}
        for key, (fd, _owned) in undo.listeners.items():
            if key in undo.serving:
                socks[key] = adopt_socket(fd)
            else:
                os.close(fd)
        try:
            await host.resume_listening(socks, adopt_socket(undo.admin_fd))
            undo.admin_fd = -1
        except Exception as exc:
            log.error("hand-over rollback: cannot listen again", error=repr(exc))
    else:
        for fd, _owned in undo.listeners.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        if undo.admin_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(undo.admin_fd)
    if undo.frozen:
        for pool in host.pools.values():
            pool.controller.thaw()
    if undo.blocked:
        unblock_signals()


async def adopt(
    host: HandoverHost, handed: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> list[str]:
    """In the new image: take over what the previous image passed on.

    Returns the signals queued during the hand-over, for the caller to carry
    out once it serves.
    """
    host.started_at = loop.time() - handed.get("uptime_s", 0.0)
    now = loop.time()
    if handed.get("lifeline"):
        lifeline.adopt(*handed["lifeline"])
    reap_previous(handed.get("preloaders", []), host.log)
    for name, info in handed["pools"].items():
        pool = host.pools.get(name)
        if pool is None:
            continue
        snapshot.restore(pool.controller, info, now)
        pool.router.drained = info.get("drained", False)
    adopted = 0
    for ws in handed["workers"]:
        fds = (ws["out_fd"], ws["err_fd"])
        pidfd = ws.get("pidfd", -1)
        for fd in (*fds, pidfd):
            if fd >= 0:
                os.set_inheritable(fd, False)
        pool = host.pools.get(ws["app"])
        if (pool is None or not ws["pid"]) and pidfd >= 0:
            os.close(pidfd)
        if pool is None or not ws["pid"]:
            # The app left the configuration: its workers go.
            if ws["pid"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ws["pid"], signal.SIGTERM)
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            continue
        w = _adopted_worker(ws, now)
        proc: ProcessHandle
        try:
            # A preloaded worker's exit is seen on its pidfd (its status went
            # to its preloader); a cold one is our child and reaped by pid.
            proc = PreloadedProcess(w.pid, pidfd, None) if pidfd >= 0 else AdoptedProcess(w.pid)
        except ProcessLookupError:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            continue  # exited and reaped during the switch; the pool refills its slot
        if w.spawn == "preload":
            w.fanout = LineFanout()
        if fds[0] >= 0 and fds[1] >= 0:
            await follow_output(w, fds[0], fds[1], pool.name, pool.log)
        pool.controller.procs.adopt(w, proc, w.started_at + pool.cfg.start_timeout)
        launcher = pool.controller.launcher
        if isinstance(launcher, PreloadLauncher):
            launcher.watch(proc)
        adopted += 1
    for c in handed["clients"]:
        cpool = host.pools.get(c["app"])
        sock = adopt_socket(c["fd"])
        if cpool is None:
            sock.close()
            continue
        router = cpool.router
        await loop.connect_accepted_socket(
            lambda r=router: ClientConnection(r, host.state, loop),  # type: ignore[misc]
            sock=sock,
        )
    pending: list[str] = list(handed.get("pending", []))
    host.log.info(
        "hand-over complete",
        pid=os.getpid(),
        workers=adopted,
        clients=len(handed["clients"]),
        pending=pending or None,
    )
    return pending


def _adopted_worker(ws: dict[str, Any], now: float) -> Worker:
    w = Worker(
        ws["number"],
        ws["generation"],
        ws["release"],
        ws["address"],
        now - ws["uptime_s"],
        WorkerState(ws["state"]),
    )
    w.pid = ws["pid"]
    w.processed = ws["processed"]
    w.restarts = ws["restarts"]
    w.last_used = now - ws.get("idle_s", 0.0)
    if ws.get("ready_age_s") is not None:
        w.ready_at = now - ws["ready_age_s"]
    w.deadline = now + ws.get("deadline_in_s", 0.0)
    w.replace_reason = ws.get("replace_reason")
    w.extra = ws.get("extra", False)
    w.spawn = ws.get("spawn", "cold")
    w.rss_bytes = ws.get("rss_bytes", 0)
    w.attempt = ws.get("attempt", 0)
    return w

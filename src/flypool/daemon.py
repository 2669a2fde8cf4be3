"""The composition root: builds the loop, the pools and the listeners, runs until stopped.

Signals map to one-line handlers (SPEC §5). While a USR2 hand-over is in
progress, TERM, QUIT, HUP and USR2 are queued in ``pending`` and carried out
by whichever image is running when the hand-over ends: this one if it
failed, the next one (the queue is in the hand-over state) if it succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any, cast

import uvloop

from flypool import handover, systemd
from flypool import logging as flog
from flypool.admin.routes import AdminRoutes
from flypool.admin.server import admin_gid, start_admin
from flypool.config import AppConfig, Config, ConfigError
from flypool.http.request import Request, ServerState
from flypool.http.router import Router
from flypool.http.server import ListenError, bind, remove_socket_file, serve, sweep
from flypool.pool.app import AppPool
from flypool.pool.preload_launcher import PreloadLauncher
from flypool.pool.sampler import Sample, run_sampler
from flypool.pool.worker import Worker, WorkerState
from flypool.restart_file import watch_restart_file

SAMPLE_INTERVAL = 2.0
# While a restart runs the pool's memory is sampled this often (peak memory).
RESTART_SAMPLE_INTERVAL = 0.25


def _clean_stale_runtime_dirs(base: str) -> None:
    """Remove runtime dirs of daemons that died without cleaning up (SIGKILL)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        if not name.startswith("flypool."):
            continue
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, "daemon.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            continue


def root_worker_problems(config: Config) -> list[str]:
    """Apps that would run as root without saying so (the daemon is root, no ``user``)."""
    if os.geteuid() != 0:
        return []
    return [
        f'app "{a.name}": flypool runs as root and the app has no user, so its workers '
        f'would run as root; set user = "www-data" (or another account), or user = "root" '
        f"to allow root workers deliberately"
        for a in config.apps
        if not a.user
    ]


class Daemon:
    """Owns every app pool, listener and background task of one flypool process."""

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        # How to read the configuration again on HUP (keeps command-line overrides).
        self.reload_config = reload_config
        self.log: Any = flog.get_logger()
        self.pools: dict[str, AppPool] = {}
        # Live list: apps added by a reload get swept (idle conns, max_request_time) too.
        self._routers: list[Router] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.listen_addrs: list[Any] = []
        self.stop_event = asyncio.Event()
        self.fast = False
        self.stop_requests = 0
        self.runtime_dir = ""
        self.started_at = 0.0
        self.tasks: list[asyncio.Task[Any]] = []
        d = config.daemon
        self.state = ServerState(
            header_timeout=d.header_timeout,
            keepalive_timeout=d.keepalive_timeout,
            body_timeout=d.body_timeout,
            max_header_size=d.max_header_size,
            send_timeout=d.send_timeout,
            underscores_in_headers=d.underscores_in_headers,
        )
        self.admin: asyncio.AbstractServer | None = None
        self.routes = AdminRoutes(self)
        # Socket-activated listeners not (yet) claimed by an app's listen entry.
        self.inherited: dict[str, Any] = {}
        # Listen keys whose sockets this daemon (or the image before a USR2) bound.
        self.owned: set[str] = set()
        self.server_keys: list[str] = []
        self.handing_over = False
        # Signals queued during a hand-over ("term", "quit", "hup", "usr2").
        self.pending: list[str] = []
        # The files this process created; a reload may name others, but
        # these are the ones to remove at exit.
        self.admin_path = config.daemon.admin_socket
        self.pid_path = config.daemon.pid_file
        self.notifier = systemd.Notifier.from_env()

    # -- start --------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; return the exit status."""
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        d = self.config.daemon
        handed = handover.read_state()
        base = d.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/tmp"
        if handed is not None:
            self.runtime_dir = handed["runtime_dir"]
        else:
            _clean_stale_runtime_dirs(base)
            try:
                self.runtime_dir = tempfile.mkdtemp(prefix="flypool.", dir=base)
                # Workers of other users reach only their own app's subdirectory.
                os.chmod(self.runtime_dir, 0o711)
            except OSError as exc:
                self.log.error("cannot create runtime directory", dir=base, error=str(exc))
                return 1
        with open(os.path.join(self.runtime_dir, "daemon.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
        try:
            for app in self.config.apps:
                self._add_pool(app, loop)
            self.inherited = systemd.listen_fds()
            admin_sock = None
            if handed is not None:
                for key, info in handed["listeners"].items():
                    self.inherited[key] = handover.adopt_socket(info["fd"])
                    if info["owned"]:
                        self.owned.add(key)
                admin_sock = handover.adopt_socket(handed["admin_fd"])
            for app in self.config.apps:
                await self._listen(app, loop, self.inherited)
            if self.inherited:
                # Kept open (an app added by a reload may claim them), but say so:
                # a socket unit's backlog with nobody accepting hangs clients.
                self.log.warning(
                    "passed sockets match no listen entry", sockets=sorted(self.inherited)
                )
            self.admin = await self._serve_admin(admin_sock)
        except ListenError as exc:
            self.log.error("cannot listen", error=str(exc))
            await self._close_listeners()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            return 1
        if d.pid_file:
            with open(d.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        # Never keep a release directory busy: old releases must be deletable.
        os.chdir("/")
        self._install_signals(loop)
        # A hand-over blocks these signals across execv so none is lost.
        handover.unblock_signals()
        self.tasks.append(loop.create_task(sweep(self.state, self._routers)))
        self.tasks.append(
            loop.create_task(run_sampler(self._sample_interval, self._all_workers, self._sampled))
        )
        pending: list[str] = []
        if handed is not None:
            pending = await handover.adopt(self, handed, loop)
        for pool in self.pools.values():
            self._start_pool(pool, loop)
        self.tasks.append(loop.create_task(self._notify_ready()))
        self.log.info(
            "flypool started",
            pid=os.getpid(),
            apps=[a.name for a in self.config.apps],
            admin_socket=d.admin_socket,
        )
        self.run_pending(pending)
        await self.stop_event.wait()
        await self._shutdown()
        return 0

    async def _serve_admin(self, sock: socket.socket | None) -> asyncio.AbstractServer:
        d = self.config.daemon
        return await start_admin(
            self.admin_path, d.admin_socket_mode, self.routes.handle, admin_gid(d.admin_group), sock
        )

    def _add_pool(self, app: AppConfig, loop: asyncio.AbstractEventLoop) -> AppPool:
        pool = AppPool(app, loop, self.runtime_dir, self.log)
        # Cold fork+exec unless the app has ``preload`` (a reload may set it).
        pool.controller.launcher = PreloadLauncher(pool.controller, pool.log)
        access_log = self.config.daemon.access_log
        if access_log:
            pool.router.access_log = make_access_logger(pool.name, access_log, loop)
        self.pools[app.name] = pool
        self._routers.append(pool.router)
        return pool

    def _remove_pool(self, name: str) -> None:
        pool = self.pools.pop(name)
        with contextlib.suppress(ValueError):
            self._routers.remove(pool.router)

    def _start_pool(self, pool: AppPool, loop: asyncio.AbstractEventLoop) -> None:
        pool.start()
        self.tasks.append(loop.create_task(watch_restart_file(pool, self._file_restart)))

    async def _listen(
        self, app: AppConfig, loop: asyncio.AbstractEventLoop, inherited: dict[str, Any]
    ) -> None:
        pool = self.pools[app.name]
        for addr in app.listen:
            key = str(addr)
            sock = inherited.pop(key, None)
            if sock is None:
                sock = bind(addr, app.listen_mode, app.listen_group)
                self.owned.add(key)
            if key in self.owned:
                # Only sockets we bound are ours to remove; an inherited
                # (socket-activated) one must outlive this process.
                self.listen_addrs.append(addr)
            server = await serve(loop, sock, pool.router, self.state)
            self.servers.append(server)
            self.server_keys.append(key)

    def routers(self) -> list[Router]:
        """Routers of every app (the sweeper iterates this list)."""
        return self._routers

    def _all_workers(self) -> list[Worker]:
        return [w for p in self.pools.values() for w in p.workers]

    def _sample_interval(self) -> float:
        restarting = any(p.controller.restart is not None for p in self.pools.values())
        return RESTART_SAMPLE_INTERVAL if restarting else SAMPLE_INTERVAL

    def _sampled(self, samples: list[Sample]) -> None:
        for pool in self.pools.values():
            pool.controller.sampled()
            limit = pool.cfg.memory_limit
            if not limit:
                continue
            for w in pool.workers:
                if w.rss_bytes > limit:
                    pool.replace_worker(w, f"memory limit: rss {w.rss_bytes} > {limit}")

    def _file_restart(self, pool: AppPool) -> None:
        pool.request_restart(None, f"{pool.cfg.restart_file} touched")

    async def _notify_ready(self, restarts: dict[str, int] | None = None) -> None:
        """READY=1 once every app has its workers, and (after HUP) its restart done."""
        pools = list(self.pools.values())
        await asyncio.gather(*(p.controller.settled() for p in pools))
        waits = [
            self.pools[name].controller.restart_done(rid)
            for name, rid in (restarts or {}).items()
            if name in self.pools
        ]
        await asyncio.gather(*waits)
        self.log.info("all workers ready")
        self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        parts = []
        for p in self.pools.values():
            ready = sum(1 for w in p.workers if w.state is WorkerState.READY)
            parts.append(f"{p.name}: {ready}/{p.target} ready")
        return "; ".join(parts)

    # -- signals and commands ------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        handlers: dict[signal.Signals, Callable[[], None]] = {
            signal.SIGTERM: lambda: self.command("term"),
            signal.SIGINT: lambda: self.command("term"),
            signal.SIGQUIT: lambda: self.command("quit"),
            signal.SIGHUP: lambda: self.command("hup"),
            signal.SIGUSR1: self.reopen_logs,
            signal.SIGUSR2: lambda: self.command("usr2"),
            signal.SIGTTIN: lambda: self.scale_all(+1),
            signal.SIGTTOU: lambda: self.scale_all(-1),
        }
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)

    def command(self, name: str) -> None:
        """Carry out a signal's command now, or after the hand-over in progress."""
        if self.handing_over:
            self.log.info("signal queued until the hand-over ends", command=name)
            self.pending.append(name)
            return
        if name == "term":
            self.request_stop(fast=False)
        elif name == "quit":
            self.request_stop(fast=True)
        elif name == "hup":
            self.spawn(self.reload_and_restart())
        elif name == "usr2":
            self.spawn(self.handover())

    def run_pending(self, commands: list[str]) -> None:
        """Carry out the commands queued during a hand-over, in order."""
        for name in commands:
            self.command(name)

    def spawn(self, coro: Any) -> None:
        """Run a command coroutine in the background."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        task.add_done_callback(lambda t: self.tasks.remove(t) if t in self.tasks else None)

    def request_stop(self, *, fast: bool) -> None:
        """Graceful stop; a second request (or fast=True) stops fast."""
        self.stop_requests += 1
        if fast or self.stop_requests > 1:
            self.fast = True
        self.log.info("stop requested", mode="fast" if self.fast else "graceful")
        self.notifier.stopping()
        if self.stop_event.is_set() and self.fast:
            # Already stopping: hurry up every app.
            for pool in self.pools.values():
                pool.controller.stop(graceful=False, deadline=0.0)
        self.stop_event.set()

    def reopen_logs(self) -> None:
        """USR1: reopen the log file after logrotate moved it."""
        flog.reopen()
        self.log.info("log file reopened")

    async def handover(self) -> None:
        """USR2: re-exec this process, passing sockets, workers and idle clients on."""
        await handover.hand_over(self)

    def scale_all(self, delta: int) -> None:
        """TTIN/TTOU: one worker more or fewer for every app (within max_pool_size)."""
        limit = self.config.daemon.max_pool_size
        total = sum(p.target for p in self.pools.values())
        if delta > 0 and total + delta * len(self.pools) > limit:
            self.log.warning("scale refused: max_pool_size reached", max_pool_size=limit)
            return
        for pool in self.pools.values():
            pool.scale(pool.target + delta)

    def scale_app(self, name: str, n: int) -> str | None:
        """Set one app's worker count; an error message when refused."""
        pool = self.pools.get(name)
        if pool is None:
            return f'no app named "{name}"'
        limit = self.config.daemon.max_pool_size
        others = sum(p.target for p in self.pools.values() if p is not pool)
        if n < 1 or n > limit:
            return f"workers must be between 1 and max_pool_size ({limit})"
        if others + n > limit:
            return f"{n} workers would make {others + n} in all, over max_pool_size ({limit})"
        pool.scale(n)
        return None

    async def reload(self) -> str | None:
        """Read the configuration again; return an error message or None."""
        if self.reload_config is None:
            return None
        try:
            new = self.reload_config()
        except ConfigError as exc:
            self.log.error("reload failed; keeping the old configuration", error=str(exc))
            return str(exc)
        problems = root_worker_problems(new)
        if problems:
            self.log.error("reload failed; keeping the old configuration", error=problems[0])
            return problems[0]
        loop = asyncio.get_running_loop()
        self.config = new
        for app in new.apps:
            pool = self.pools.get(app.name)
            if pool is None:
                pool = self._add_pool(app, loop)
                try:
                    await self._listen(app, loop, self.inherited)
                except ListenError as exc:
                    self._remove_pool(app.name)
                    self.log.error(
                        "reload: cannot listen for new app", app=app.name, error=str(exc)
                    )
                    continue
                self._start_pool(pool, loop)
                continue
            if app.listen != pool.cfg.listen:
                self.log.warning(
                    "reload: listen changes take effect after a daemon restart", app=app.name
                )
                app = dataclasses.replace(app, listen=pool.cfg.listen)
            pool.apply_config(app)
        for name in list(self.pools):
            if name not in {a.name for a in new.apps}:
                self.log.warning(
                    "reload: app removed from the configuration keeps running "
                    "until the daemon restarts",
                    app=name,
                )
        d = new.daemon
        self.state.header_timeout = d.header_timeout
        self.state.keepalive_timeout = d.keepalive_timeout
        self.state.body_timeout = d.body_timeout
        self.state.max_header_size = d.max_header_size
        self.state.send_timeout = d.send_timeout
        self.state.underscores = d.underscores_in_headers
        self.log.info("configuration reloaded")
        return None

    async def reload_and_restart(self, reason: str = "SIGHUP") -> str | None:
        """HUP and `flypool reload`: re-read the config, then restart every app.

        Restarts are rolling where enabled. In flags-only mode there is no
        file to re-read, so only the restart happens. A bad config is logged,
        the old one stays, and nothing restarts; the error is returned.
        """
        self.notifier.reloading()
        error = await self.reload() if self.reload_config is not None else None
        restarts: dict[str, int] = {}
        if error is None:
            for pool in self.pools.values():
                restarts[pool.name] = pool.request_restart(None, reason)
        # systemd's reload is over when every worker runs the new release.
        self.spawn(self._notify_ready(restarts))
        return error

    # -- hand-over support (flypool.handover.HandoverHost) -------------------------------

    def listening(self) -> list[tuple[str, socket.socket, bool, bool]]:
        """(key, socket, bound by us, accepted on) of every listener, claimed or not."""
        out = [
            (key, sock, key in self.owned, True)
            for server, key in zip(self.servers, self.server_keys, strict=True)
            for sock in cast(asyncio.Server, server).sockets
        ]
        out.extend((key, sock, False, False) for key, sock in self.inherited.items())
        return out

    def admin_socket(self) -> socket.socket:
        """The admin server's listening socket."""
        assert self.admin is not None
        return cast(asyncio.Server, self.admin).sockets[0]

    def stop_listening(self) -> None:
        """Stop accepting (sockets stay open through their hand-over duplicates)."""
        for server in self.servers:
            server.close()
        if self.admin is not None:
            self.admin.close()

    async def resume_listening(self, socks: dict[str, socket.socket], admin: socket.socket) -> None:
        """The hand-over failed: accept again on the same sockets."""
        loop = asyncio.get_running_loop()
        routers = {}
        for pool in self.pools.values():
            for addr in pool.cfg.listen:
                routers[str(addr)] = pool.router
        servers, keys = [], []
        for key in self.server_keys:
            sock = socks.get(key)
            if sock is None or key not in routers:
                continue
            servers.append(await serve(loop, sock, routers[key], self.state))
            keys.append(key)
        self.servers, self.server_keys = servers, keys
        self.admin = await self._serve_admin(admin)

    # -- stop ----------------------------------------------------------------------------

    async def _close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        for addr in self.listen_addrs:
            remove_socket_file(addr)

    async def _shutdown(self) -> None:
        log = self.log
        loop = asyncio.get_running_loop()
        await self._close_listeners()
        self.state.shutting_down = True
        for conn in list(self.state.connections):
            conn.shutdown()
        # One deadline for everything: queued and in-flight requests finish
        # within drain_timeout of the stop, not drain_timeout twice.
        limit = max((p.cfg.drain_timeout for p in self.pools.values()), default=0.0)
        deadline = loop.time() + limit
        for p in self.pools.values():
            p.controller.stop(graceful=not self.fast, deadline=deadline)
        await asyncio.gather(*(p.controller.wait_stopped() for p in self.pools.values()))
        for p in self.pools.values():
            if isinstance(p.controller.launcher, PreloadLauncher):
                await p.controller.launcher.close()
        for conn in list(self.state.connections):
            if conn.transport is not None:
                conn.transport.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.admin is not None:
            self.admin.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.admin_path)
        if self.pid_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pid_path)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        log.info("flypool stopped")


def make_access_logger(
    app: str, path: str, loop: asyncio.AbstractEventLoop
) -> Callable[[Request, int, Worker | None], None]:
    """One structured event per finished request, into ``access_log`` (a file or "-")."""
    log = flog.access_logger(path, app=app)

    def access(req: Request, status: int, worker: Worker | None) -> None:
        now = loop.time()
        log.info(
            "request",
            method=req.method.decode(),
            path=req.target.decode("latin-1"),
            status=status,
            duration_ms=round((now - req.started_at) * 1000, 3) if req.started_at else None,
            queue_ms=round(req.queue_wait * 1000, 3),
            worker_pid=worker.pid if worker is not None else None,
        )

    return access


def run(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run the daemon in the foreground until stopped; return the exit status."""
    d = config.daemon
    problems = root_worker_problems(config)
    if problems:
        for p in problems:
            print(f"flypool: {config.path or 'command line'}: {p}", file=sys.stderr)
        return 2
    flog.configure(d.log_format, d.log_level, d.log_file)
    daemon = Daemon(config, reload_config)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(daemon.run())

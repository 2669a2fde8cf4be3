"""The composition root: builds the loop, the pools and the listeners, runs until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

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
from flypool.pool.rollout import request_restart
from flypool.pool.sampler import Sample, run_sampler
from flypool.pool.worker import Worker
from flypool.restart_file import watch_restart_file

SAMPLE_INTERVAL = 2.0


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
        )
        self.admin: asyncio.AbstractServer | None = None
        # Socket-activated listeners not (yet) claimed by an app's listen entry.
        self.inherited: dict[str, Any] = {}
        # Listen keys whose sockets this daemon (or the image before a USR2) bound.
        self.owned: set[str] = set()
        self.server_keys: list[str] = []
        self.handing_over = False
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
            routes = AdminRoutes(self)
            self.admin = await start_admin(
                d.admin_socket,
                d.admin_socket_mode,
                routes.handle,
                admin_gid(d.admin_group),
                sock=admin_sock,
            )
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
        self.tasks.append(loop.create_task(sweep(self.state, self.routers())))
        self.tasks.append(
            loop.create_task(run_sampler(SAMPLE_INTERVAL, self._all_workers, self._sampled))
        )
        if handed is not None:
            await handover.adopt(self, handed, loop)
        for pool in self.pools.values():
            if d.access_log:
                pool.router.access_log = make_access_logger(pool.name, d.access_log, loop)
            pool.start()
            self.tasks.append(loop.create_task(watch_restart_file(pool, self._file_restart)))
        self.tasks.append(loop.create_task(self._notify_ready()))
        self.log.info(
            "flypool started",
            pid=os.getpid(),
            apps=[a.name for a in self.config.apps],
            admin_socket=d.admin_socket,
        )
        await self.stop_event.wait()
        await self._shutdown()
        return 0

    def _add_pool(self, app: AppConfig, loop: asyncio.AbstractEventLoop) -> AppPool:
        pool = AppPool(app, loop, self.runtime_dir, self.log)
        self.pools[app.name] = pool
        return pool

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
        return [p.router for p in self.pools.values()]

    def _all_workers(self) -> list[Worker]:
        return [w for p in self.pools.values() for w in p.workers]

    def _sampled(self, samples: list[Sample]) -> None:
        for w, _cpu, rss in samples:
            pool = self.pools.get(self._app_of(w))
            if pool is None or not pool.cfg.memory_limit or rss <= pool.cfg.memory_limit:
                continue
            pool.replace_worker(w, f"memory limit: rss {rss} > {pool.cfg.memory_limit}")

    def _app_of(self, w: Worker) -> str:
        for name, pool in self.pools.items():
            if w in pool.workers:
                return name
        return ""

    def _file_restart(self, pool: AppPool) -> None:
        request_restart(pool, None, f"{pool.cfg.restart_file} touched")

    async def _notify_ready(self, restarts: dict[str, int] | None = None) -> None:
        """READY=1 once every app has its workers, and (after HUP) its restart done."""
        await asyncio.gather(*(p.wait_all_ready() for p in self.pools.values()))
        for name, rid in (restarts or {}).items():
            pool = self.pools.get(name)
            while (
                pool is not None
                and not pool.stopping
                and (pool.rollout is not None or (pool.last_restart or {}).get("id", 0) < rid)
            ):
                await asyncio.sleep(0.05)
        self.log.info("all workers ready")
        self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        parts = []
        for p in self.pools.values():
            ready = sum(1 for w in p.workers if w.state.value == "ready")
            parts.append(f"{p.name}: {ready}/{p.target} ready")
        return "; ".join(parts)

    # -- signals and commands ------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        handlers: dict[signal.Signals, Callable[[], None]] = {
            signal.SIGTERM: lambda: self.request_stop(fast=False),
            signal.SIGINT: lambda: self.request_stop(fast=False),
            signal.SIGQUIT: lambda: self.request_stop(fast=True),
            signal.SIGHUP: lambda: self.spawn(self.reload_and_restart()),
            signal.SIGUSR1: self.reopen_logs,
            signal.SIGUSR2: lambda: self.spawn(self.handover()),
            signal.SIGTTIN: lambda: self.scale_all(+1),
            signal.SIGTTOU: lambda: self.scale_all(-1),
        }
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)

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
        self.stop_event.set()

    def reopen_logs(self) -> None:
        """USR1: reopen the log file after logrotate moved it."""
        flog.reopen()
        self.log.info("log file reopened")

    async def handover(self) -> None:
        """USR2: re-exec this process, passing sockets, workers and idle clients on."""
        await handover.hand_over(self)

    def scale_all(self, delta: int) -> None:
        """TTIN/TTOU: one worker more or fewer for every app."""
        for pool in self.pools.values():
            pool.scale(pool.target + delta)

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
        for app in new.apps:
            pool = self.pools.get(app.name)
            if pool is None:
                pool = self._add_pool(app, loop)
                try:
                    await self._listen(app, loop, self.inherited)
                except ListenError as exc:
                    del self.pools[app.name]
                    self.log.error(
                        "reload: cannot listen for new app", app=app.name, error=str(exc)
                    )
                    continue
                pool.start()
                self.tasks.append(loop.create_task(watch_restart_file(pool, self._file_restart)))
                continue
            if app.listen != pool.cfg.listen:
                self.log.warning(
                    "reload: listen changes take effect after a daemon restart", app=app.name
                )
                app = _with_listen(app, pool.cfg.listen)
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
        self.config = new
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
                restarts[pool.name] = request_restart(pool, None, reason)
        # systemd's reload is over when every worker runs the new release.
        self.spawn(self._notify_ready(restarts))
        return error

    # -- stop ----------------------------------------------------------------------------

    async def _close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        for addr in self.listen_addrs:
            remove_socket_file(addr)

    def _requests_pending(self) -> bool:
        # A second TERM (fast) ends the wait early.
        return not self.fast and any(r.active or r.queue for r in self.routers())

    async def _shutdown(self) -> None:
        log = self.log
        loop = asyncio.get_running_loop()
        await self._close_listeners()
        self.state.shutting_down = True
        for conn in list(self.state.connections):
            conn.shutdown()
        if not self.fast:
            # Finish in-flight and queued requests before the workers go.
            limit = max((p.cfg.drain_timeout for p in self.pools.values()), default=0.0)
            deadline = loop.time() + limit
            while loop.time() < deadline and self._requests_pending():
                await asyncio.sleep(0.01)
        await asyncio.gather(*(p.stop(graceful=not self.fast) for p in self.pools.values()))
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


def _with_listen(app: AppConfig, listen: Any) -> AppConfig:
    import dataclasses

    return dataclasses.replace(app, listen=listen)


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

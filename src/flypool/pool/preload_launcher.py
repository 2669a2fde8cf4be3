"""The spawn step of apps with ``preload``: fork workers from a per-release preloader (SPEC §11).

Theory of operation
-------------------
:class:`PreloadLauncher` is the pool controller's :class:`~flypool.pool.spawner.Launcher`
for every app; with ``preload = []`` it is the cold fork+exec, unchanged.
With modules to preload:

- **One preloader per generation and release**, keyed ``(w.generation,
  w.release)``: the release is resolved at spawn time, as for cold spawns,
  and a restart (a new generation) imports afresh even when the release
  directory is the same one, so the code a restart loads is the code on
  disk, as with cold spawns. It is started by the first spawn of its key;
  concurrent spawns wait for the same import.
- **Import failure** (:class:`~flypool.preload.PreloadError`) fails the spawn
  like a worker that does not boot (:class:`SpawnError`), with the
  preloader's last output lines as the worker's output: a restart shows
  them in ``deployment_error`` and keeps the old generation. The failed
  preloader is forgotten, so the next spawn tries again.
- **Refusals** (threads running in the preloader, a command it cannot run,
  a command that is not Python) spawn that worker cold, and the reason is
  logged (``spawning cold``).
- **Preloader death**: its workers keep serving (they are in sessions of
  their own); the next spawn of its key starts a new preloader.
- **Stopping**: a preloader is stopped (and reaped) once no worker of its
  key is left and no spawn is using it. This is checked whenever a worker
  this launcher started exits, and after every spawn.

Preloaded workers get ``w.spawn = "preload"`` and a stderr
:class:`~flypool.pool.stack_dump.LineFanout` (``w.fanout``), through which a
faulthandler stack dump is collected (:mod:`flypool.pool.stuck_stack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from flypool.config import AppConfig
from flypool.pool import spawner
from flypool.pool.spawner import ColdLauncher, Launcher, ProcessHandle, SpawnError
from flypool.pool.stack_dump import LineFanout
from flypool.pool.worker import OUTPUT_LINES, Worker, WorkerState
from flypool.preload import (
    NotPreloadable,
    PreloadedProcess,
    Preloader,
    PreloadError,
    PreloaderState,
    PreloadUnavailable,
)

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

Key = tuple[int, str]
"""(generation, release) of a preloader."""
STOP_TIMEOUT = 5.0
# Handles of preloaders from the previous image, reaped after a USR2 hand-over.
_REAPING: set[asyncio.Task[None]] = set()


class PoolView(Protocol):
    """What the launcher reads of its pool (the controller)."""

    @property
    def workers(self) -> list[Worker]:
        """Every worker of the app, in any state."""


@dataclass
class _Entry:
    """One preloader and the spawns using it right now."""

    preloader: Preloader
    generation: int
    starting: asyncio.Task[None]
    users: int = 0


class PreloadLauncher:
    """Forks workers from a per-release preloader when the app has ``preload``."""

    def __init__(
        self,
        pool: PoolView,
        log: FilteringBoundLogger,
        cold: Launcher | None = None,
    ) -> None:
        self.pool = pool
        self.log = log
        self.cold = cold or ColdLauncher()
        self._entries: dict[Key, _Entry] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Preloaders being stopped (out of _entries, maybe not reaped yet).
        self._stopping: set[Preloader] = set()
        self._stops: set[asyncio.Task[Any]] = set()
        self._sweep_scheduled = False

    # ------------------------------------------------------------------ spawn

    async def start(self, cfg: AppConfig, w: Worker, log: FilteringBoundLogger) -> ProcessHandle:
        """Fork ``w`` from its release's preloader; cold when preloading does not apply."""
        if not cfg.preload:
            return await self.cold.start(cfg, w, log)
        key = (w.generation, w.release)
        entry = self._entries.get(key)
        if entry is None or not entry.preloader.alive:
            try:
                entry = self._new_entry(cfg, w, key, log)
            except NotPreloadable as exc:
                return await self._cold(cfg, w, log, exc.reason)
        entry.users += 1
        try:
            try:
                await asyncio.shield(entry.starting)
            except PreloadError as exc:
                if self._entries.get(key) is entry:
                    del self._entries[key]
                w.output.extend(exc.output[-OUTPUT_LINES:])
                raise SpawnError(f"preloader: {exc.reason}") from None
            try:
                proc: ProcessHandle = await self._fork(entry.preloader, cfg, w, log)
            except PreloadUnavailable as exc:
                proc = await self._cold(cfg, w, log, exc.reason)
        finally:
            entry.users -= 1
            self._sweep_soon()
        self.watch(proc)
        return proc

    def _new_entry(self, cfg: AppConfig, w: Worker, key: Key, log: FilteringBoundLogger) -> _Entry:
        """A preloader for ``key``, its import started; raises NotPreloadable."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._retire(old, "it is gone")
        ident = spawner.worker_identity(cfg)
        if ident is not None and spawner.SETPRIV is None:
            raise SpawnError("user/group need util-linux setpriv, which is not installed")
        # The cold command's wrapper (setpriv: pdeathsig, uid/gid) around the
        # preloader: its workers inherit the identity at fork.
        wrapped = spawner.build_argv(cfg, "", ident)
        prefix = wrapped[: len(wrapped) - len(cfg.command)]
        preloader = Preloader.for_command(
            cfg.command,
            modules=cfg.preload,
            release=w.release,
            env=_preloader_env(cfg, ident),
            prefix=prefix,
            log=log,
        )
        loop = asyncio.get_running_loop()
        starting = loop.create_task(preloader.start(cfg.start_timeout))
        # Awaited by every spawn of this key; a failure is theirs to report.
        starting.add_done_callback(_consume)
        entry = _Entry(preloader, key[0], starting)
        self._entries[key] = entry
        log.info(
            "starting preloader",
            release=w.release,
            generation=w.generation,
            modules=list(cfg.preload),
        )
        return entry

    async def _fork(
        self, preloader: Preloader, cfg: AppConfig, w: Worker, log: FilteringBoundLogger
    ) -> PreloadedProcess:
        if w.address.startswith("/"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(w.address)
        ident = spawner.worker_identity(cfg)
        env = spawner.build_env(cfg, w.number, w.address)
        if ident is not None:
            env.update(HOME=ident.home, USER=ident.name, LOGNAME=ident.name)
        port = w.address.rpartition(":")[2] if not w.address.startswith("/") else ""
        argv = [a.replace("{socket}", w.address).replace("{port}", port) for a in cfg.command]
        with spawner.output_pipes() as (out_r, out_w, err_r, err_w):
            proc = await preloader.spawn(argv, env=env, cwd=w.release, stdout=out_w, stderr=err_w)
        w.proc = proc
        w.pid = proc.pid
        w.spawn = "preload"
        w.fanout = LineFanout()
        await spawner.follow_output(w, out_r, err_r, cfg.name, log)
        return proc

    async def _cold(
        self, cfg: AppConfig, w: Worker, log: FilteringBoundLogger, reason: str
    ) -> ProcessHandle:
        log.warning("spawning cold", worker=w.number, release=w.release, reason=reason)
        return await self.cold.start(cfg, w, log)

    # ------------------------------------------------------------------ stopping

    def watch(self, proc: ProcessHandle) -> None:
        """Look for preloaders to stop once ``proc`` exits."""
        self._task(self._wait_exit(proc))

    async def _wait_exit(self, proc: ProcessHandle) -> None:
        await proc.wait()
        self._sweep_soon()

    def _sweep_soon(self) -> None:
        if not self._sweep_scheduled:
            self._sweep_scheduled = True
            asyncio.get_running_loop().call_soon(self._sweep)

    def _sweep(self) -> None:
        """Stop every preloader no worker of its generation and release is left of."""
        self._sweep_scheduled = False
        live = {
            (w.generation, w.release)
            for w in self.pool.workers
            if w.state is not WorkerState.EXITED and (w.proc is None or w.proc.returncode is None)
        }
        for key, entry in list(self._entries.items()):
            if entry.users or key in live:
                continue
            del self._entries[key]
            self._retire(entry, "no worker of its generation is left")

    def _retire(self, entry: _Entry, reason: str) -> None:
        t = self._task(self._stop(entry, reason))
        self._stops.add(t)
        t.add_done_callback(self._stops.discard)

    async def _stop(self, entry: _Entry, reason: str) -> None:
        p = entry.preloader
        if p.state is PreloaderState.EXITED:
            return
        self._stopping.add(p)
        try:
            await p.stop(STOP_TIMEOUT)
        finally:
            self._stopping.discard(p)
        self.log.info(
            "preloader stopped",
            pid=p.pid,
            release=p.release,
            generation=entry.generation,
            reason=reason,
            status=p.exit_code,
        )

    async def close(self) -> None:
        """Stop every preloader (the daemon is stopping; its workers are gone)."""
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            self._retire(entry, "daemon stopping")
        while self._stops:
            await asyncio.gather(*list(self._stops), return_exceptions=True)

    # ------------------------------------------------------------------ status and USR2

    def status(self) -> list[dict[str, Any]]:
        """The preloaders running now (status JSON)."""
        return [
            {**e.preloader.status(), "generation": e.generation}
            for e in self._entries.values()
            if e.preloader.state is not PreloaderState.EXITED
        ]

    def handover_pids(self) -> list[int]:
        """Pids of preloader processes not yet reaped: the next image reaps them.

        Their control channel closes at ``execv`` (close-on-exec), so they
        exit; their workers keep running and are adopted by their pidfds.
        """
        every = [e.preloader for e in self._entries.values()] + list(self._stopping)
        return [p.pid for p in every if p.pid and p.exit_code is None]

    def _task(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t


def _consume(task: asyncio.Task[None]) -> None:
    """Mark a start's outcome as seen (each waiting spawn reports it)."""
    if not task.cancelled():
        task.exception()


def _preloader_env(cfg: AppConfig, ident: spawner.Identity | None) -> dict[str, str]:
    """The app's environment without what belongs to one worker (set at each fork)."""
    env = spawner.build_env(cfg, 0, "")
    for key in ("FLYPOOL_WORKER", "FLYPOOL_SOCKET", "PORT"):
        env.pop(key, None)
    if ident is not None:
        env.update(HOME=ident.home, USER=ident.name, LOGNAME=ident.name)
    return env


def reap_previous(pids: list[int], log: FilteringBoundLogger) -> None:
    """After a USR2 hand-over: reap the previous image's preloaders as they exit."""
    for pid in pids:
        try:
            handle = spawner.AdoptedProcess(pid)
        except ProcessLookupError:
            continue
        task = asyncio.get_running_loop().create_task(_reaped(handle, log))
        _REAPING.add(task)
        task.add_done_callback(_REAPING.discard)


async def _reaped(handle: spawner.AdoptedProcess, log: FilteringBoundLogger) -> None:
    code = await handle.wait()
    log.info("preloader of the previous image exited", pid=handle.pid, status=code)

"""One app: its router and its pool controller, wired together.

The router (:mod:`flypool.http.router`) reads the worker list to route; the
controller (:mod:`flypool.pool.controller`) is the only code that changes
it. The router reports to the controller through three hooks:

- every slot given back (``on_slot_freed``): how a draining worker's last
  request ends its drain, tunnels and abandoned requests included;
- every finished attempt (``on_request_done``): status and latency, for a
  canary's judge;
- every queue wait (``queue_waits``): the elastic pool's evidence.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from flypool.config import AppConfig
from flypool.http.router import Router
from flypool.pool.controller import Controller, now_iso
from flypool.pool.spawner import Launcher
from flypool.pool.stuck_stack import HeldRequest
from flypool.pool.worker import Worker

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = ["AppPool", "now_iso"]


def held_by(router: Router, w: Worker) -> list[HeldRequest]:
    """The requests ``w`` holds (a stuck worker's stack event names them)."""
    return [
        HeldRequest(method.decode("latin-1"), target.decode("latin-1"), seconds)
        for method, target, seconds in router.held_by(w)
    ]


class AppPool:
    """Workers, router and controller of one app."""

    def __init__(
        self,
        cfg: AppConfig,
        loop: asyncio.AbstractEventLoop,
        runtime_dir: str,
        log: FilteringBoundLogger,
        launcher: Launcher | None = None,
    ) -> None:
        self.loop = loop
        self.log = log.bind(app=cfg.name)
        self.workers: list[Worker] = []
        self.router = Router(
            loop,
            cfg.name,
            self.workers,
            concurrency=cfg.worker_concurrency,
            max_queue=cfg.max_queue,
            queue_timeout=cfg.queue_timeout,
            health_path=cfg.health_path,
            max_request_time=cfg.max_request_time,
            retry_idempotent=cfg.retry_idempotent,
            proxy_protocol=cfg.proxy_protocol,
        )
        self.router.max_requests = cfg.max_requests
        self.controller = Controller(
            cfg, loop, runtime_dir, self.log, self.router, self.workers, launcher
        )
        ctl = self.controller
        router = self.router
        router.on_slot_freed = ctl.slot_freed
        router.on_request_done = ctl.request_done
        # The elastic pool's window is the only reader of queue waits here.
        router.queue_waits = ctl.elastic.window
        router.recycle = lambda w: ctl.replace(w, "max_requests reached")
        router.stuck = lambda w: ctl.stuck(w, "max_request_time exceeded", held_by(router, w))
        self.started_at = loop.time()

    @property
    def name(self) -> str:
        """The app's name."""
        return self.controller.cfg.name

    @property
    def cfg(self) -> AppConfig:
        """The app's configuration as last applied."""
        return self.controller.cfg

    @property
    def stopping(self) -> bool:
        """True once the daemon has begun stopping this app."""
        return self.controller.stop_plan is not None

    @property
    def target(self) -> int:
        """The worker count the controller keeps."""
        return self.controller.target

    def start(self) -> None:
        """Spawn the initial workers."""
        self.controller.start()

    def request_restart(self, mode: str | None, reason: str, canary: int | None = None) -> int:
        """Restart (coalesced with a running one); the restart id.

        ``canary`` overrides the app's ``canary`` key for this restart (0 = none).
        """
        options = None if canary is None else {"canary": canary}
        return self.controller.request_restart(mode, reason, options)

    def end_canary(self, outcome: str) -> bool:
        """Promote or roll back a running canary now; False when none runs."""
        return self.controller.end_canary(outcome)

    def scale(self, n: int) -> None:
        """Change the worker count live."""
        self.controller.scale(n)

    def replace_worker(self, w: Worker, reason: str) -> None:
        """Replace ``w`` gracefully (memory_limit)."""
        self.controller.replace(w, reason)

    def apply_config(self, cfg: AppConfig) -> None:
        """Use ``cfg`` for routing and the next spawns (after a reload)."""
        self.router.configure(
            concurrency=cfg.worker_concurrency,
            max_queue=cfg.max_queue,
            queue_timeout=cfg.queue_timeout,
            health_path=cfg.health_path,
            max_request_time=cfg.max_request_time,
            retry_idempotent=cfg.retry_idempotent,
            proxy_protocol=cfg.proxy_protocol,
        )
        self.router.max_requests = cfg.max_requests
        self.controller.apply_config(cfg)

    async def stop(self, *, graceful: bool, deadline: float) -> None:
        """Stop every worker (drained until ``deadline`` when graceful); return when all exited."""
        self.controller.stop(graceful=graceful, deadline=deadline)
        await self.controller.wait_stopped()

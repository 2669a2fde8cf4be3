"""Driving one pool controller directly: real worker processes, a fake router, no daemon.

Tests build a :class:`Harness` inside ``asyncio.run`` and call the
controller's methods the way the daemon would (``request_restart``,
``scale``, ``stop``), from the same loop turn when they need to.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from flypool.config import AppConfig, config_from_dict
from flypool.pool.controller import Controller
from flypool.pool.worker import Worker, WorkerState

MEM_WORKER = [sys.executable, str(Path(__file__).parent / "apps" / "mem_worker.py"), "{socket}"]


class FakeRouter:
    """The controller's RouterPort, recording what it was asked to do."""

    def __init__(self) -> None:
        self.queue: deque[object] = deque()
        self.max_queue = 100
        self.failing = False
        self.cut_calls: list[tuple[int, int, str]] = []
        # What the controller last asked the router to report (Router.watch).
        self.watching: tuple[bool, bool] | None = None

    def retire_idle(self, w: Worker) -> None:
        return None

    def serve_queue(self) -> None:
        return None

    def set_failing(self, failing: bool) -> None:
        self.failing = failing

    def fail_worker(self, w: Worker, status: int, detail: str) -> None:
        self.cut_calls.append((w.pid, status, detail))
        w.inflight = 0

    def reroute_connecting(self, w: Worker) -> None:
        return None

    def watch(self, *, every_slot: bool, outcomes: bool) -> None:
        self.watching = (every_slot, outcomes)


class EventLog:
    """A structlog-shaped logger that keeps every event for assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _rec(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    info = warning = error = debug = _rec

    def exception(self, event: str, **kw: Any) -> None:
        self._rec(event, **kw)
        raise AssertionError(f"controller raised: {event}")

    def bind(self, **kw: Any) -> EventLog:
        return self

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for e, kw in self.events if e == event]


def app_config(root: Path, **app: Any) -> AppConfig:
    """One app running ``mem_worker.py`` from ``root`` (quick timeouts)."""
    base: dict[str, Any] = {
        "name": "app",
        "root": str(root),
        "command": MEM_WORKER,
        "listen": [f"unix:{root}/app.sock"],
        "workers": 2,
        "start_timeout": "10s",
        "drain_timeout": "5s",
        "stop_timeout": "3s",
    }
    if os.geteuid() == 0:
        base["user"] = "root"
    base.update(app)
    data = {"daemon": {"admin_socket": f"{root}/admin.sock"}, "app": [base]}
    return config_from_dict(data, "test").apps[0]


class Harness:
    """One controller over real processes; tracks the most processes seen at once."""

    def __init__(self, cfg: AppConfig, runtime_dir: Path) -> None:
        self.loop = asyncio.get_running_loop()
        self.log = EventLog()
        self.router = FakeRouter()
        self.workers: list[Worker] = []
        log: Any = self.log
        self.ctl = Controller(cfg, self.loop, str(runtime_dir), log, self.router, self.workers)
        self.peak_workers = 0
        self.peak_children = 0
        # Serving workers (SPEC §1 "live"): all but those signalled with
        # nothing in flight, whose process is only exiting.
        self.peak_serving = 0

    def ready(self) -> list[Worker]:
        return [w for w in self.workers if w.state is WorkerState.READY]

    def serving(self) -> list[Worker]:
        """Workers spawning, ready or draining (or stopping with requests in flight)."""
        return [
            w
            for w in self.workers
            if w.state is not WorkerState.EXITED
            and not (w.state is WorkerState.STOPPING and not w.inflight)
        ]

    def children(self) -> list[int]:
        """Live (non-zombie) child processes of this test process."""
        out = []
        for c in psutil.Process().children():
            try:
                if c.status() != psutil.STATUS_ZOMBIE:
                    out.append(c.pid)
            except psutil.NoSuchProcess:
                continue
        return out

    def note(self) -> None:
        self.peak_workers = max(self.peak_workers, len(self.workers))
        self.peak_serving = max(self.peak_serving, len(self.serving()))
        self.peak_children = max(self.peak_children, len(self.children()))

    async def until(
        self, pred: Callable[[], object], timeout: float = 20.0, what: str = ""
    ) -> None:
        """Wait, reconcile by reconcile, until ``pred()`` holds."""
        deadline = self.loop.time() + timeout
        while True:
            self.note()
            if pred():
                return
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}: {self.workers}")
            try:
                await asyncio.wait_for(self.ctl.changed(), min(remaining, 0.05))
            except TimeoutError:
                pass

    async def settled(self, n: int, timeout: float = 20.0) -> None:
        """``n`` ready workers, nothing else, no restart running."""
        await self.until(
            lambda: len(self.ready()) == n and len(self.workers) == n and self.ctl.restart is None,
            timeout,
            f"{n} ready workers and nothing else",
        )

    async def close(self) -> None:
        """Stop fast and check no process is left."""
        self.ctl.stop(graceful=False, deadline=0.0)
        await asyncio.wait_for(self.ctl.wait_stopped(), 15)
        deadline = self.loop.time() + 10
        while self.children() and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert not self.children(), self.children()


def run(cfg: AppConfig, runtime_dir: Path, body: Callable[[Harness], Any]) -> None:
    """Run ``body(harness)`` with a started controller; always stop it."""

    async def main() -> None:
        h = Harness(cfg, runtime_dir)
        h.ctl.start()
        try:
            await body(h)
        finally:
            await h.close()

    asyncio.run(main())

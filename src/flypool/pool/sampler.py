"""CPU and memory of every worker, sampled on a timer off the request path.

psutil reads /proc synchronously, so each sample runs in a worker thread;
results are written back on the event loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import psutil

from flypool.pool.worker import Worker

Sample = tuple[Worker, float, int]


class Sampler:
    """Keeps one psutil.Process per pid so cpu_percent has a previous reading."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def _rss_tree(self, proc: psutil.Process) -> tuple[float, int]:
        # A worker may be a master with children (gunicorn, puma): the memory
        # that matters for memory_limit is the whole tree's.
        cpu = proc.cpu_percent(None)
        rss = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return cpu, rss

    def sample(self, workers: list[Worker]) -> list[Sample]:
        """Read CPU % and RSS for ``workers``; runs in a thread."""
        out: list[Sample] = []
        seen = set()
        for w in workers:
            pid = w.pid
            if not pid:
                continue
            seen.add(pid)
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = psutil.Process(pid)
                    self._procs[pid] = proc
                cpu, rss = self._rss_tree(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            out.append((w, cpu, rss))
        for pid in list(self._procs):
            if pid not in seen:
                del self._procs[pid]
        return out


async def run_sampler(
    interval: Callable[[], float],
    workers: Callable[[], Iterable[Worker]],
    on_sample: Callable[[list[Sample]], None],
) -> None:
    """Sample every ``interval()`` seconds until cancelled (measurement, not a wait)."""
    sampler = Sampler()
    loop = asyncio.get_running_loop()
    while True:
        snapshot = list(workers())
        samples = await loop.run_in_executor(None, sampler.sample, snapshot)
        for w, cpu, rss in samples:
            w.cpu_percent = round(cpu, 1)
            if rss:
                w.rss_bytes = rss
        on_sample(samples)
        await asyncio.sleep(interval())

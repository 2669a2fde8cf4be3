"""Passenger's tmp/restart.txt: a restart when the file appears or its mtime changes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flypool.pool.app import AppPool


def _stamp(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


async def watch_restart_file(pool: AppPool, on_change: Callable[[AppPool], None]) -> None:
    """Poll ``root/restart_file`` (through the current symlink) every interval."""
    cfg = pool.cfg
    # One stat per interval is cheap; the path is joined each time because
    # root may be a symlink that moves between checks. The loop runs even
    # while restart_file is "", so a reload can switch it on.
    last = _stamp(os.path.join(cfg.root, cfg.restart_file)) if cfg.restart_file else None
    while not pool.stopping:
        await asyncio.sleep(pool.cfg.restart_check_interval)
        cfg = pool.cfg
        if not cfg.restart_file:
            last = None
            continue
        now = _stamp(os.path.join(cfg.root, cfg.restart_file))
        if now is not None and now != last:
            pool.log.info("restart file changed", path=cfg.restart_file)
            on_change(pool)
        last = now

"""The status document (SPEC §8) built from the live pools."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from flypool import __version__
from flypool.pool.worker import WorkerState

if TYPE_CHECKING:
    from flypool.pool.app import AppPool


def app_state(pool: AppPool) -> str:
    """One of starting, serving, restarting, deployment_error, stopping."""
    if pool.stopping:
        return "stopping"
    if pool.rollout is not None:
        return "restarting"
    if pool.deployment_error is not None:
        return "deployment_error"
    if any(w.state is WorkerState.READY for w in pool.workers):
        return "serving"
    return "starting"


def app_status(pool: AppPool, now: float) -> dict[str, Any]:
    """One app's entry in ``apps``."""
    cfg = pool.cfg
    try:
        release = os.path.realpath(cfg.root)
    except OSError:
        release = ""
    rollout = pool.rollout
    workers = [
        {
            "pid": w.pid,
            "number": w.number,
            "state": w.state.value,
            "generation": w.generation,
            "sessions": w.inflight,
            "processed": w.processed,
            "uptime_s": round(now - w.started_at, 3),
            "cpu_percent": w.cpu_percent,
            "rss_bytes": w.rss_bytes,
            "last_used_s": round(now - w.last_used, 3),
            "release": w.release,
            "restarts": w.restarts,
        }
        for w in sorted(pool.workers, key=lambda w: w.number)
    ]
    return {
        "name": cfg.name,
        "root": cfg.root,
        "release": release,
        "state": app_state(pool),
        "listen": [str(a) for a in cfg.listen],
        "queue": len(pool.router.queue),
        "workers_target": pool.target,
        "upstream_connections": pool.router.upstream_connections(),
        "upstream_connects_total": pool.router.stats.connects,
        "drained": pool.router.drained,
        "restart": rollout.progress() if rollout is not None else None,
        "last_restart": pool.last_restart,
        "deployment_error": pool.deployment_error,
        "spawn_error": pool.spawn_error,
        "workers": workers,
    }


def build_status(
    pools: list[AppPool], started_at: float, now: float, instance: str
) -> dict[str, Any]:
    """The whole document returned by ``GET /status``."""
    return {
        "version": __version__,
        "pid": os.getpid(),
        "instance": instance,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "uptime_s": round(now - started_at, 3),
        "max_pool_size": sum(p.target for p in pools),
        "apps": [app_status(p, now) for p in pools],
    }

"""The status document (SPEC §8) built from the live pools."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from flypool import __version__, _impl
from flypool.pool.preload_launcher import PreloadLauncher

if TYPE_CHECKING:
    from flypool.pool.app import AppPool


def app_state(pool: AppPool) -> str:
    """One of starting, serving, restarting, deployment_error, stopping."""
    return pool.controller.state_name()


def app_status(pool: AppPool, now: float) -> dict[str, Any]:
    """One app's entry in ``apps``."""
    ctl = pool.controller
    cfg = ctl.cfg
    try:
        release = os.path.realpath(cfg.root)
    except OSError:
        release = ""
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
            "spawn": w.spawn,
            "extra": w.extra,
            "replacing": w.replace_reason,
        }
        for w in sorted(pool.workers, key=lambda w: w.number)
    ]
    el = ctl.elastic
    launcher = ctl.launcher
    preloaders = launcher.status() if isinstance(launcher, PreloadLauncher) else []
    return {
        "name": cfg.name,
        "root": cfg.root,
        "release": release,
        "state": ctl.state_name(),
        "listen": [str(a) for a in cfg.listen],
        "queue": len(pool.router.queue),
        "workers_target": ctl.target,
        "workers_min": el.floor if el.enabled else ctl.target,
        "workers_max": el.ceiling if el.enabled else ctl.target,
        "upstream_connections": pool.router.upstream_connections(),
        "upstream_connects_total": pool.router.stats.connects,
        "drained": pool.router.drained,
        "restart": ctl.restart.progress() if ctl.restart is not None else None,
        "last_restart": ctl.last_restart,
        "deployment_error": (
            ctl.deployment_error.as_dict(backoff=False) if ctl.deployment_error else None
        ),
        "spawn_error": ctl.procs.spawn_error.as_dict(backoff=True)
        if ctl.procs.spawn_error
        else None,
        "workers": workers,
        "preloaders": preloaders,
    }


def build_status(
    pools: list[AppPool], started_at: float, now: float, instance: str, max_pool_size: int = 0
) -> dict[str, Any]:
    """The whole document returned by ``GET /status``."""
    return {
        "version": __version__,
        "hot_path": _impl.describe(),
        "pid": os.getpid(),
        "instance": instance,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "uptime_s": round(now - started_at, 3),
        "max_pool_size": max_pool_size or sum(p.target for p in pools),
        "apps": [app_status(p, now) for p in pools],
    }

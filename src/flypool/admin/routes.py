"""What each admin URL does (SPEC §4); the transport is flypool.admin.server."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from flypool.admin.metrics import render_metrics
from flypool.status import build_status

if TYPE_CHECKING:
    from flypool.admin.control import DaemonControl
    from flypool.pool.app import AppPool

Reply = tuple[int, Any]
MODES = ("rolling", "blocking")


class AdminRoutes:
    """Maps admin requests onto daemon operations."""

    def __init__(self, daemon: DaemonControl) -> None:
        self.daemon = daemon

    async def handle(self, method: str, path: str, query: dict[str, str]) -> Reply:
        """Answer one admin request with (status, JSON-able payload or text)."""
        d = self.daemon
        parts = [p for p in path.split("/") if p]
        if method == "GET" and parts == ["status"]:
            loop = asyncio.get_running_loop()
            cfg = d.config.daemon
            return 200, build_status(
                list(d.pools.values()),
                d.started_at,
                loop.time(),
                cfg.admin_socket,
                cfg.max_pool_size,
            )
        if method == "GET" and parts == ["metrics"]:
            return 200, render_metrics(list(d.pools.values()))
        if method != "POST":
            return (405 if parts else 404), {"error": f"no route for {method} {path}"}
        if parts == ["reload"]:
            error = await d.reload_and_restart("flypool reload")
            return (400, {"error": error}) if error else (200, {"ok": True})
        if parts == ["stop"]:
            mode = query.get("mode", "graceful")
            if mode not in ("graceful", "fast"):
                return 400, {"error": "mode must be graceful or fast"}
            asyncio.get_running_loop().call_soon(lambda: d.request_stop(fast=mode == "fast"))
            return 202, {"ok": True}
        if parts in (["restart"], ["drain"], ["undrain"], ["promote"], ["rollback"]):
            return self._each(parts[0], list(d.pools.values()), query)
        if len(parts) == 3 and parts[0] == "apps":
            pool = d.pools.get(parts[1])
            if pool is None:
                return 404, {"error": f'no app named "{parts[1]}"'}
            action = parts[2]
            if action == "scale":
                return self._scale(pool, query)
            if action in ("restart", "drain", "undrain", "promote", "rollback"):
                code, body = self._each(action, [pool], query)
                return code, (
                    body["restarts"][0]
                    if action == "restart" and code == 202
                    else body["apps"][0]
                    if code == 200
                    else body
                )
        return 404, {"error": f"no route for {method} {path}"}

    def _scale(self, pool: AppPool, query: dict[str, str]) -> Reply:
        limit = self.daemon.config.daemon.max_pool_size
        try:
            n = int(query["workers"])
        except (KeyError, ValueError):
            return 400, {"error": f"workers=N (an integer from 1 to {limit}) is required"}
        error = self.daemon.scale_app(pool.name, n)
        if error is not None:
            return 400, {"error": error}
        return 200, {"app": pool.name, "workers": pool.target}

    def _each(self, action: str, pools: list[AppPool], query: dict[str, str]) -> Reply:
        if action == "restart":
            mode = query.get("mode") or None
            if mode is not None and mode not in MODES:
                return 400, {"error": "mode must be rolling or blocking"}
            canary: int | None = None
            if "canary" in query:
                limit = self.daemon.config.daemon.max_pool_size
                try:
                    canary = int(query["canary"])
                except ValueError:
                    canary = -1
                if not 0 <= canary <= limit:
                    return 400, {"error": f"canary=N must be an integer from 0 to {limit}"}
                if canary and mode == "blocking":
                    return 400, {"error": "a canary needs a rolling restart, not mode=blocking"}
            out = [
                {"app": p.name, "restart_id": p.request_restart(mode, "admin request", canary)}
                for p in pools
            ]
            return 202, {"restarts": out}
        if action in ("promote", "rollback"):
            ended = [p.name for p in pools if p.end_canary(action)]
            if not ended:
                return 409, {"error": f"no canary is running to {action}"}
            return 200, {"apps": [{"app": name, action: True} for name in ended]}
        drained = action == "drain"
        for p in pools:
            p.router.drained = drained
            p.log.info("drained" if drained else "undrained")
        return 200, {"apps": [{"app": p.name, "drained": drained} for p in pools]}

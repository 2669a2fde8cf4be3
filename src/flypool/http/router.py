"""Per-app request routing: pick a worker, queue when all are busy, connect.

The router owns no processes; it reads the worker list the pool keeps and
the ``inflight`` counters on each worker. It is the only place that changes
``inflight``, so a slot is taken and released exactly once per request
(see :meth:`Router.take` and :meth:`Router.release`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from flypool.http.request import worker_gone
from flypool.pool.balancer import pick
from flypool.pool.worker import Worker

if TYPE_CHECKING:
    from flypool.http.request import Request


# A worker whose connection broke is re-checked this much later (its exit
# status usually arrives well within it).
SUSPECT_CHECK_DELAY = 0.05


class RouterStats:
    """Counters read by status and /metrics; plain ints, bumped on the hot path."""

    __slots__ = (
        "by_class",
        "connects",
        "queue_wait_count",
        "queue_wait_total",
        "rejected_full",
        "timeouts",
    )

    def __init__(self) -> None:
        # index = status // 100 (0 unused): 1xx..5xx responses sent to clients
        self.by_class = [0, 0, 0, 0, 0, 0]
        self.queue_wait_total = 0.0
        self.queue_wait_count = 0
        self.rejected_full = 0
        self.timeouts = 0
        # Upstream connections opened: low when keep-alive reuse works.
        self.connects = 0


class Router:
    """Routes the requests of one app to its workers (SPEC §6)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: str,
        workers: list[Worker],
        *,
        concurrency: int,
        max_queue: int,
        queue_timeout: float,
        health_path: str,
        max_request_time: float,
    ) -> None:
        self.loop = loop
        self.app = app
        # Shared with the pool: the pool appends/removes, the router only reads.
        self.workers = workers
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.health_path = health_path.encode()
        self.max_request_time = max_request_time
        self.drained = False
        # Set by the pool while no worker is ready and spawns keep failing:
        # nothing can serve, so waiting in the queue would only end in 504.
        self.failing = False
        # Worker recycling (max_requests); the pool installs the callback.
        self.max_requests = 0
        self.recycle: Callable[[Worker], None] = lambda w: None
        # Stuck workers (max_request_time); the pool installs the callback.
        self.stuck: Callable[[Worker], None] = lambda w: None
        # Called once per finished request when the access log is on.
        self.access_log: Callable[[Request, int, Worker | None], None] | None = None
        self.queue: deque[Request] = deque()
        self.stats = RouterStats()
        # Requests in flight on a worker, for max_request_time and shutdown.
        self.active: set[Request] = set()

    def configure(
        self,
        *,
        concurrency: int,
        max_queue: int,
        queue_timeout: float,
        health_path: str,
        max_request_time: float,
    ) -> None:
        """Apply reloaded settings; takes effect for the next request."""
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.health_path = health_path.encode()
        self.max_request_time = max_request_time
        self.serve_queue()

    # -- dispatch -------------------------------------------------------------

    def dispatch(self, req: Request) -> None:
        """Send ``req`` to a worker now, or queue it (503 when the queue is full)."""
        w = pick(self.workers, self.concurrency, req.tried)
        if w is not None and not self.queue:
            self.take(req, w)
            return
        if w is not None:
            # FIFO: someone is already waiting; they go first.
            self.serve_queue()
        if self.failing:
            req.conn.fail_request(req, 503, "no worker can serve: the app fails to start")
            return
        if len(self.queue) >= self.max_queue:
            self.stats.rejected_full += 1
            req.conn.fail_request(req, 503, "queue full")
            return
        req.queued_at = self.loop.time()
        req.timer = self.loop.call_later(self.queue_timeout, self._queue_timed_out, req)
        self.queue.append(req)
        self.serve_queue()

    def take(self, req: Request, w: Worker) -> None:
        """Give ``req`` one of ``w``'s slots and an upstream connection."""
        w.inflight += 1
        req.worker = w
        self.active.add(req)
        conns = w.idle_conns
        if conns and not req.fresh:
            up = conns.pop()
            up.attach(req, reused=True)
        else:
            self.loop.create_task(self._connect(req, w))

    def release(self, req: Request) -> None:
        """Free ``req``'s worker slot (idempotent) and serve the queue."""
        w = req.worker
        if w is None:
            return
        req.worker = None
        self.active.discard(req)
        w.inflight -= 1
        w.last_used = self.loop.time()
        if self.queue:
            self.serve_queue()

    def serve_queue(self) -> None:
        """Hand queued requests to workers with free slots, oldest first."""
        q = self.queue
        while q:
            w = pick(self.workers, self.concurrency)
            if w is None:
                return
            req = q.popleft()
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
            req.queue_wait = self.loop.time() - req.queued_at
            self.stats.queue_wait_total += req.queue_wait
            self.stats.queue_wait_count += 1
            self.take(req, w)

    def set_failing(self, failing: bool) -> None:
        """Enter or leave the "no worker can serve" state (queued requests get 503)."""
        self.failing = failing
        while failing and self.queue:
            req = self.queue.popleft()
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
            req.conn.fail_request(req, 503, "no worker can serve: the app fails to start")

    def cancel(self, req: Request) -> None:
        """The client went away: drop ``req`` from the queue and free its slot."""
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
            try:
                self.queue.remove(req)
            except ValueError:
                pass
        self.release(req)

    def _queue_timed_out(self, req: Request) -> None:
        req.timer = None
        try:
            self.queue.remove(req)
        except ValueError:
            return
        self.stats.timeouts += 1
        req.conn.fail_request(req, 504, "timed out waiting for a free worker")

    # -- upstream connections ------------------------------------------------------

    async def _connect(self, req: Request, w: Worker) -> None:
        from flypool.http.upstream import UpstreamConnection

        loop = self.loop
        try:
            if w.address.startswith("/"):
                _, up = await loop.create_unix_connection(
                    lambda: UpstreamConnection(self, w), w.address
                )
            else:
                host, _, port = w.address.rpartition(":")
                _, up = await loop.create_connection(
                    lambda: UpstreamConnection(self, w), host, int(port)
                )
        except OSError:
            self._connect_failed(req, w)
            return
        self.stats.connects += 1
        if req.worker is not w or req.done:
            # The client left (or the request timed out) while we connected.
            up.park()
            return
        up.attach(req, reused=False)

    def exclude(self, req: Request, w: Worker) -> None:
        """Don't send ``req`` to ``w`` again (it failed there before reaching it)."""
        if req.tried is None:
            req.tried = set()
        req.tried.add(w)

    def retry_elsewhere(self, req: Request) -> None:
        """``req`` never reached its worker (still connecting when it died): go on."""
        w = req.worker
        if w is None or req.done:
            return
        self.release(req)
        self.exclude(req, w)
        self.dispatch(req)

    def _connect_failed(self, req: Request, w: Worker) -> None:
        if req.worker is not w or req.done:
            return
        self.release(req)
        self.exclude(req, w)
        # A worker that refuses connections gets no more requests until the
        # pool decides what it is; try the others (SPEC §6).
        tried = req.tried or set()
        alt = pick(self.workers, self.concurrency, tried)
        if alt is not None:
            self.take(req, alt)
        elif any(x.state.value == "ready" and x not in tried for x in self.workers):
            # All other ready workers are busy: wait in line like everyone else.
            self.dispatch(req)
        else:
            req.conn.fail_request(req, 502, "no worker accepted the connection")

    def suspect(self, w: Worker) -> None:
        """Route around ``w`` until a liveness check clears it (see Worker.suspect)."""
        if w.suspect:
            return
        w.suspect = True
        self.loop.call_later(SUSPECT_CHECK_DELAY, self._check_suspect, w)

    def _check_suspect(self, w: Worker) -> None:
        if not worker_gone(w):
            w.suspect = False
            self.serve_queue()

    def retire_idle(self, w: Worker) -> None:
        """Close ``w``'s pooled idle connections (before it is signalled)."""
        conns = w.idle_conns
        w.idle_conns = []
        for up in conns:
            up.close()

    def sweep_idle(self, now: float, max_idle: float) -> None:
        """Close upstream connections idle longer than ``max_idle``.

        Kept shorter than typical worker keep-alive timeouts so that the
        worker never closes a connection the router is about to reuse.
        """
        for w in self.workers:
            conns = w.idle_conns
            if conns and conns[0].idle_since + max_idle < now:
                keep = [c for c in conns if c.idle_since + max_idle >= now]
                for c in conns:
                    if c.idle_since + max_idle < now:
                        c.close()
                w.idle_conns = keep

    def sweep_request_time(self, now: float) -> None:
        """Answer 504 for requests over ``max_request_time`` and replace their workers."""
        limit = self.max_request_time
        if not limit:
            return
        # Tunnels (WebSocket) are long-lived by design; only drain_timeout bounds them.
        stuck = [
            r
            for r in self.active
            if r.started_at and now - r.started_at > limit and not r.conn.tunnel
        ]
        workers = {r.worker for r in stuck if r.worker is not None}
        # Take the workers out of routing first: failing their requests frees
        # slots that the queue would otherwise hand straight back to them.
        for w in workers:
            self.stuck(w)
        for r in stuck:
            r.conn.fail_request(r, 504, "max_request_time exceeded")

    def upstream_connections(self) -> int:
        """Idle plus busy upstream connections (tests use this)."""
        return sum(len(w.idle_conns) for w in self.workers) + sum(
            1 for r in self.active if r.upstream is not None
        )

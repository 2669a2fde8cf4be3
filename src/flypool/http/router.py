"""Per-app request routing: pick a worker, queue when all are busy, connect, retry.

The router owns no processes; it reads the worker list the pool keeps and
the ``inflight`` counter on each worker. It is the only place that changes
``inflight``: a slot is taken in :meth:`Router.take` and given back in
:meth:`Router._settle`, exactly once per attempt, when the worker's answer
ended or its connection is gone (never earlier: a client that leaves does
not free a worker that is still working on its request).

It is also where the retry policy of :mod:`flypool.http.retry` is carried
out: worker connections report how they failed, the policy decides, the
router resends, retries elsewhere or answers 502.

Hooks for the pool controller (cheap, one call per finished attempt):
``on_slot_freed(worker)`` (every slot given back: how a draining worker's
last request ends its drain), ``on_request_done(worker, status, seconds,
failed)`` and ``queue_waits`` (see :mod:`flypool.http.waits`). They are
attributes, not methods to override: this module is compiled (mypyc), and an
interpreted class cannot subclass a compiled one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from flypool.http import retry
from flypool.http.request import Request
from flypool.http.retry import Failure, Verdict
from flypool.http.state import CLIENT_ANSWERING, ClientState, UpstreamState
from flypool.http.upstream import UpstreamConnection
from flypool.http.waits import QueueWaits, WaitRecorder
from flypool.logging import get_logger
from flypool.pool.balancer import pick
from flypool.pool.worker import Worker, WorkerState

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

# A worker whose connection broke is re-checked this much later (its exit
# status usually arrives well within it).
SUSPECT_CHECK_DELAY = 0.05

_READY = WorkerState.READY
_CLOSED = ClientState.CLOSED
_DONE = UpstreamState.DONE
_TUNNEL = UpstreamState.TUNNEL


def worker_gone(w: Worker) -> bool:
    """True when the worker process has exited (or is a zombie not yet reaped)."""
    if w.state is WorkerState.EXITED or (w.proc is not None and w.proc.returncode is not None):
        return True
    # Off the hot path: only when a worker connection broke before any answer.
    try:
        with open(f"/proc/{w.pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


class RouterStats:
    """Counters read by status and /metrics; plain ints, bumped on the hot path."""

    __slots__ = (
        "by_class",
        "connects",
        "queue_wait_count",
        "queue_wait_total",
        "rejected_full",
        "retries",
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
        # Requests sent again after their worker failed (resends and retries).
        self.retries = 0


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
        retry_idempotent: bool = True,
        proxy_protocol: bool = False,
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
        self.retry_idempotent = retry_idempotent
        # Read by the front listeners when they accept a TCP connection.
        self.proxy_protocol = proxy_protocol
        self.drained = False
        # Set by the pool while no worker is ready and spawns keep failing:
        # nothing can serve, so waiting in the queue would only end in 503.
        self.failing = False
        # Worker recycling (max_requests); the pool installs the callback.
        self.max_requests = 0
        self.recycle: Callable[[Worker], None] = lambda w: None
        # Stuck workers (max_request_time); the pool installs the callback.
        self.stuck: Callable[[Worker], None] = lambda w: None
        # Called once per finished request when the access log is on.
        self.access_log: Callable[[Request, int, Worker | None], None] | None = None
        # Pool controller hooks: once per slot given back; once per attempt a
        # worker finished or failed, with the seconds since it took the request.
        self.on_slot_freed: Callable[[Worker], None] | None = None
        self.on_request_done: Callable[[Worker, int, float, bool], None] | None = None
        # What the hooks hear (see watch()): by default everything.
        self.every_slot = True
        self.outcomes = True
        # Queue waits of the last seconds (elastic pool, SPEC §10).
        self.queue_waits: WaitRecorder = QueueWaits()
        self.log: FilteringBoundLogger = get_logger(app=app)
        self.queue: deque[Request] = deque()
        self.stats = RouterStats()
        # Requests holding a worker slot, for max_request_time and shutdown.
        self.active: set[Request] = set()

    def configure(
        self,
        *,
        concurrency: int,
        max_queue: int,
        queue_timeout: float,
        health_path: str,
        max_request_time: float,
        retry_idempotent: bool | None = None,
        proxy_protocol: bool | None = None,
    ) -> None:
        """Apply reloaded settings; takes effect for the next request."""
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.health_path = health_path.encode()
        self.max_request_time = max_request_time
        if retry_idempotent is not None:
            self.retry_idempotent = retry_idempotent
        if proxy_protocol is not None:
            self.proxy_protocol = proxy_protocol
        self.serve_queue()

    # -- dispatch -----------------------------------------------------------------------------

    def _exclusions(self, req: Request) -> set[Worker] | None:
        if not req.canary_free:
            return req.tried
        out = set(req.tried or ())
        out.update(w for w in self.workers if w.canary)
        return out

    def dispatch(self, req: Request, *, front: bool = False) -> None:
        """Send ``req`` to a worker now, or queue it (503 when the queue is full).

        ``front``: a request sent again after its worker failed goes first
        (it has waited its turn already).
        """
        w = pick(
            self.workers, self.concurrency, self._exclusions(req) if req.canary_free else req.tried
        )
        if w is not None and not self.queue:
            self.take(req, w)
            return
        if w is not None and not front:
            # FIFO: someone is already waiting; they go first.
            self.serve_queue()
        if self.failing:
            self.fail(req, 503, "no worker can serve: the app fails to start")
            return
        if len(self.queue) >= self.max_queue and not front:
            self.stats.rejected_full += 1
            self.fail(req, 503, "queue full")
            return
        if not req.queued_at:
            req.queued_at = self.loop.time()
        req.timer = self.loop.call_later(
            max(0.0, req.queued_at + self.queue_timeout - self.loop.time()),
            self._queue_timed_out,
            req,
        )
        if front:
            self.queue.appendleft(req)
        else:
            self.queue.append(req)
        self.serve_queue()

    def take(self, req: Request, w: Worker) -> None:
        """Give ``req`` one of ``w``'s slots and a worker connection."""
        now = self.loop.time()
        w.inflight += 1
        req.worker = w
        req.taken_at = now
        self.active.add(req)
        first = not (req.resends or req.retries)
        if first:
            if req.queued_at:
                wait = req.queue_wait = now - req.queued_at
                self.stats.queue_wait_total += wait
                self.stats.queue_wait_count += 1
            else:
                wait = 0.0
            self.queue_waits.add(now, wait)
        conns = w.idle_conns
        if conns and first:
            up = conns.pop()
            up.attach(req, req.conn.transport, reused=True)
            req.conn.attached(req)
        else:
            self.loop.create_task(self._connect(req, w))

    def serve_queue(self) -> None:
        """Hand queued requests to workers with free slots, oldest first."""
        q = self.queue
        while q:
            req = q[0]
            w = pick(self.workers, self.concurrency, self._exclusions(req))
            if w is None:
                return
            q.popleft()
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
            self.take(req, w)

    def set_failing(self, failing: bool) -> None:
        """Enter or leave the "no worker can serve" state (queued requests get 503)."""
        self.failing = failing
        while failing and self.queue:
            req = self.queue.popleft()
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
            self.fail(req, 503, "no worker can serve: the app fails to start")

    def _queue_timed_out(self, req: Request) -> None:
        req.timer = None
        try:
            self.queue.remove(req)
        except ValueError:
            return
        self.stats.timeouts += 1
        self.fail(req, 504, "timed out waiting for a free worker")

    # -- the end of an attempt ------------------------------------------------------------------

    def release(self, req: Request) -> None:
        """Give back ``req``'s worker slot (once per attempt) and serve the queue."""
        w = req.worker
        if w is None:
            return
        req.worker = None
        self.active.discard(req)
        w.inflight -= 1
        w.last_used = self.loop.time()
        if self.queue:
            self.serve_queue()
        hook = self.on_slot_freed
        if hook is not None and (self.every_slot or w.state is not _READY):
            hook(w)

    def watch(self, *, every_slot: bool, outcomes: bool) -> None:
        """What the pool's hooks hear: every slot given back (else only a
        worker's that is no longer READY: a drain's end), and every request's
        outcome (else none). Each call of an interpreted hook costs more than
        this module's work for a request, so the pool asks only for what it uses.
        """
        self.every_slot = every_slot
        self.outcomes = outcomes

    def _settle(
        self, req: Request, status: int, failed: bool, *, report: bool = True
    ) -> Worker | None:
        """End ``req``'s attempt: release its slot and report it to the hook."""
        w = req.worker
        if w is None:
            return None
        self.release(req)
        hook = self.on_request_done
        if hook is not None and report and self.outcomes:
            hook(w, status, self.loop.time() - req.taken_at, failed)
        return w

    def answer_end(self, req: Request, up: UpstreamConnection, status: int) -> None:
        """The worker finished its answer to ``req``."""
        req.upstream = None
        w = req.worker
        # The connection goes back before the slot, so that a request the
        # slot lets in (this client's next one) can reuse it.
        if up.state is _DONE:
            up.park()
        else:
            up.close()
        if w is not None:
            w.processed += 1
            self.release(req)
            hook = self.on_request_done
            if hook is not None and self.outcomes:
                hook(w, status, self.loop.time() - req.taken_at, False)
            if self.max_requests and w.processed >= self.max_requests:
                self.recycle(w)
        if self.access_log is not None:
            self.access_log(req, status, w)
        req.done = True
        req.conn.answer_ends(req)

    def _unqueue(self, req: Request) -> None:
        # A request with a queue timer is (or was) queued: out of the queue.
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
            try:
                self.queue.remove(req)
            except ValueError:
                pass

    def fail(self, req: Request, status: int, detail: str) -> None:
        """End ``req`` with the daemon's own error (or a cut answer) and free what it holds."""
        if req.done:
            return
        req.done = True
        self._unqueue(req)
        up = req.upstream
        if up is not None:
            req.upstream = None
            up.abort()
        w = self._settle(req, status, True)
        if self.access_log is not None:
            self.access_log(req, status, w)
        req.conn.refuse(req, status, detail)

    def fail_worker(self, w: Worker, status: int, detail: str) -> None:
        """Fail every request ``w`` holds (drain_timeout ran out, the worker is cut)."""
        for req in [r for r in self.active if r.worker is w]:
            self.fail(req, status, detail)

    def abandon(self, req: Request) -> None:
        """The client is gone (reset or closed): stop everything that needs it.

        A request the worker has in full keeps its slot, and its answer is
        read and dropped, until the worker is done with it: the worker is
        busy either way, and must not get a request more than its
        ``worker_concurrency``.
        """
        if req.done:
            return
        up = req.upstream
        if up is not None and up.request_complete and up.state is not UpstreamState.TUNNEL:
            up.sink = None
            up.resume_reading()
            return
        req.done = True
        self._unqueue(req)
        if up is not None:
            req.upstream = None
            up.abort()
        # The worker neither answered nor failed: nothing to report.
        self._settle(req, 499, False, report=False)

    # -- worker connections ---------------------------------------------------------------------

    async def _connect(self, req: Request, w: Worker) -> None:
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
            if req.worker is w and not req.done:
                self.suspect(w)
                self._resend(req, Failure.CONNECT, "no worker accepted the connection")
            return
        self.stats.connects += 1
        if req.worker is not w or req.done or req.conn.state is _CLOSED:
            # The client left (or the request timed out) while we connected.
            up.keep()
            if not req.done and req.worker is w:
                self.abandon(req)
            return
        up.attach(req, req.conn.transport, reused=False)
        req.conn.attached(req)

    def upstream_failed(
        self, req: Request, up: UpstreamConnection, failure: Failure, why: str
    ) -> None:
        """A worker connection broke before its answer ended: apply the retry policy."""
        req.upstream = None
        if req.done:
            return
        w = req.worker
        if failure != Failure.BROKEN and w is not None:
            # Route around it until a liveness check says whether it died.
            self.suspect(w)
        self._resend(req, failure, why)

    def _resend(self, req: Request, failure: Failure, why: str) -> None:
        client = req.conn.state
        if client is _CLOSED:
            # Nobody waits for an answer: free what the request holds.
            self.fail(req, 502, why)
            return
        replayable = client not in CLIENT_ANSWERING and retry.replayable(
            req.method, enabled=self.retry_idempotent, kept=req.kept, upgrade=req.upgrade
        )
        verdict = retry.decide(
            failure, replayable=replayable, resends=req.resends, retries=req.retries
        )
        w = req.worker
        if verdict == Verdict.RESEND or verdict == Verdict.RETRY:
            self._settle(req, 502, True)
            if w is not None:
                if req.tried is None:
                    req.tried = set()
                req.tried.add(w)
            if verdict == Verdict.RESEND:
                req.resends += 1
            else:
                req.retries += 1
            self.stats.retries += 1
            req.rewind()
            self.dispatch(req, front=True)
            return
        if verdict == Verdict.KILLED_TWO:
            self.log.error(
                "request killed two workers",
                method=req.method.decode("latin-1"),
                path=req.target.decode("latin-1"),
                pid=w.pid if w is not None else None,
            )
        self.fail(req, 502, why)

    def reask(self, req: Request, up: UpstreamConnection, status: int) -> None:
        """A canary answered 5xx before the client saw a byte: an old worker answers instead."""
        req.upstream = None
        up.abort()
        w = self._settle(req, status, False)
        if w is not None:
            w.processed += 1
        req.canary_free = True
        req.rewind()
        self.stats.retries += 1
        self.dispatch(req, front=True)

    def canary_reaskable(self, req: Request) -> bool:
        """Whether a canary's 5xx to ``req`` may go to an old worker (SPEC §6)."""
        if req.conn.state is _CLOSED:
            return False  # nobody waits for the answer
        kept = retry.replayable(
            req.method, enabled=self.retry_idempotent, kept=req.kept, upgrade=req.upgrade
        )
        return retry.reask_canary(500, canary=True, replayable=kept, answered=False)

    def upgraded(self, req: Request, up: UpstreamConnection, rest: bytes) -> None:
        """The worker switched protocols: the client relays raw bytes from now on."""
        req.conn.start_tunnel(req, rest)

    def tunnel_closed(self, req: Request, up: UpstreamConnection) -> None:
        """The worker's end of a tunnel closed: end the request."""
        req.upstream = None
        w = req.worker
        if w is not None:
            w.processed += 1
        self._settle(req, 101, False, report=False)
        req.done = True
        req.conn.tunnel_closed(req)

    def idle_lost(self, up: UpstreamConnection) -> None:
        """A pooled connection closed: the worker's idle timeout, or its death."""
        w = up.worker
        try:
            w.idle_conns.remove(up)
        except ValueError:
            return  # closed by us (retired, swept, aborted)
        # Route around it until a liveness check says which, so requests
        # don't go to a process that is already gone.
        self.suspect(w)

    def reroute_connecting(self, w: Worker) -> None:
        """Requests still connecting to the dead ``w`` were never sent: go elsewhere (SPEC §6)."""
        for req in [r for r in self.active if r.worker is w and r.upstream is None]:
            self.retry_elsewhere(req)

    def held_by(self, w: Worker) -> list[tuple[bytes, bytes, float]]:
        """(method, target, seconds since the worker had it whole) of each request ``w`` holds."""
        now = self.loop.time()
        return [
            (r.method, r.target, now - r.clock_at if r.clock_at else 0.0)
            for r in self.active
            if r.worker is w
        ]

    def retry_elsewhere(self, req: Request) -> None:
        """``req`` never reached its worker (still connecting when it died): go on."""
        if req.worker is None or req.done or req.upstream is not None:
            return
        self._resend(req, Failure.CONNECT, "worker exited")

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
        """Close worker connections idle longer than ``max_idle``.

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
        """Answer 504 for requests over ``max_request_time`` and replace their workers.

        The clock starts when the worker has the whole request (SPEC §3):
        neither the queue wait nor the upload counts.
        """
        limit = self.max_request_time
        if not limit:
            return
        stuck = [
            r
            for r in self.active
            if r.clock_at
            and now - r.clock_at > limit
            and (r.upstream is None or r.upstream.state is not UpstreamState.TUNNEL)
        ]
        workers = {r.worker for r in stuck if r.worker is not None}
        # Take the workers out of routing first: failing their requests frees
        # slots that the queue would otherwise hand straight back to them.
        for w in workers:
            self.stuck(w)
        for r in stuck:
            self.fail(r, 504, "max_request_time exceeded")

    def upstream_connections(self) -> int:
        """Idle plus busy worker connections (tests use this)."""
        return sum(len(w.idle_conns) for w in self.workers) + sum(
            1 for r in self.active if r.upstream is not None
        )

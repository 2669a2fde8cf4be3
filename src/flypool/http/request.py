"""One request's cycle, from its complete head to the end of its answer, and shared state.

A :class:`Request` is uvicorn's ``RequestResponseCycle`` for a proxy: it
holds the bytes still to be written to a worker, what was written (while a
retry may still need it), the worker and the connection serving it, and
the request's flow control: it pauses the client when the worker takes
body bytes slower than they arrive (or while a held body waits for a
worker), and pauses the worker when the client reads the answer slower than
it comes.

Imports point one way: this module knows the client connection and the
router only through the small interfaces below (:class:`ClientSide`,
:class:`RouterSide`); ``upstream`` imports this module, ``router`` imports
both, ``client`` imports the router.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from flypool.http.retry import IDEMPOTENT, REPLAY_LIMIT
from flypool.http.state import ClientState, UpstreamState

if TYPE_CHECKING:
    from flypool.pool.worker import Worker

# Reasons to stop reading from the client (aiohttp's accounting: reading
# resumes only when none is left).
PAUSE_UPSTREAM: Final = 1  # the worker takes body bytes slower than they arrive
PAUSE_PIPELINE: Final = 2  # pipelined bytes wait for the answer in progress
PAUSE_BUFFER: Final = 4  # a held body reached its limit before a worker took it

# A body is held back from the workers until it is complete or this large,
# so that a slow uploader does not occupy a worker slot.
HOLD_LIMIT: Final = 65536


class ClientSide(Protocol):
    """What a request needs from its client connection (``client.ClientConnection``)."""

    @property
    def state(self) -> ClientState:
        """The connection's state."""

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client's transport while connected."""

    def pause(self, reason: int) -> None:
        """Stop reading from the client for ``reason``."""

    def unpause(self, reason: int) -> None:
        """``reason`` no longer applies; read again if nothing else holds."""

    def attached(self, req: Request) -> None:
        """A worker connection was given to ``req``."""

    def answer_begins(self, req: Request) -> None:
        """The final answer head of ``req`` went out."""

    def answer_ends(self, req: Request) -> None:
        """The answer of ``req`` is complete."""

    def refuse(self, req: Request, status: int, detail: str) -> None:
        """Answer ``req`` with the daemon's own error (or cut an answer in progress)."""

    def start_tunnel(self, req: Request, rest: bytes) -> None:
        """The worker switched protocols: relay raw bytes from now on."""

    def tunnel_closed(self, req: Request) -> None:
        """The worker's end of the tunnel closed."""

    def fail_request(self, req: Request, status: int, detail: str) -> None:
        """End ``req`` with the daemon's own error (frees what it holds)."""


class Upstream(Protocol):
    """What a request and the router use of a worker connection (``UpstreamConnection``)."""

    transport: asyncio.Transport | None
    # The transport's write() and is_closing(), bound once.
    transport_write: Callable[[bytes], object]
    transport_closing: Callable[[], bool]
    # The client's transport while the answer goes to a client.
    sink: asyncio.Transport | None

    @property
    def state(self) -> UpstreamState:
        """The connection's state."""

    @property
    def request_complete(self) -> bool:
        """Every request byte was written."""

    def abort(self) -> None:
        """Drop the connection now."""

    def request_sent(self) -> None:
        """The last request byte was written."""

    def pause_reading(self) -> None:
        """Stop reading the answer (the client is slow)."""

    def resume_reading(self) -> None:
        """Read the answer again."""


class _App(Protocol):
    app: str


class FrontConnection(Protocol):
    """What the daemon and the USR2 hand-over use of a client connection."""

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client's transport while connected."""

    @property
    def router(self) -> _App:
        """The router of the app whose listener accepted it."""

    @property
    def frozen(self) -> bool:
        """Handed over: no longer read."""

    @property
    def tunnel(self) -> bool:
        """Relaying a tunnel."""

    def shutdown(self) -> None:
        """Graceful stop: close if idle, else after the current answer."""

    def is_idle(self) -> bool:
        """Nothing in progress: safe to hand over."""

    def freeze(self) -> None:
        """Stop reading for good (USR2)."""

    def thaw(self) -> None:
        """The hand-over failed: read again."""

    def check_timeout(self, now: float) -> None:
        """Enforce the connection's timeouts."""


class ServerState:
    """What all client connections of the daemon share."""

    __slots__ = (
        "body_timeout",
        "connections",
        "handing_over",
        "header_timeout",
        "keepalive_timeout",
        "max_header_size",
        "send_timeout",
        "shutting_down",
        "underscores",
    )

    def __init__(
        self,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        body_timeout: float,
        max_header_size: int,
        send_timeout: float = 60.0,
        underscores_in_headers: str = "drop",
    ) -> None:
        self.connections: set[FrontConnection] = set()
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.max_header_size = max_header_size
        self.send_timeout = send_timeout
        # "drop" | "pass" | "refuse" (SPEC §3 underscores_in_headers)
        self.underscores = underscores_in_headers
        self.shutting_down = False
        # USR2: connections freeze (stop reading) as soon as they are idle.
        self.handing_over = False


class Request:
    """One request's cycle; owns the bytes bound for the worker and the flow control."""

    __slots__ = (
        "body_done",
        "canary_free",
        "chunked",
        "clock_at",
        "conn",
        "done",
        "expect",
        "head_request",
        "http10",
        "keep_alive",
        "local",
        "method",
        "out",
        "out_size",
        "queue_wait",
        "queued_at",
        "replay",
        "replay_size",
        "resends",
        "retries",
        "sent_any",
        "started_at",
        "taken_at",
        "target",
        "timer",
        "tried",
        "upgrade",
        "upstream",
        "worker",
    )

    def __init__(self, conn: ClientSide, head: bytes, method: bytes, target: bytes) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        # Bytes not yet written to the worker (the head first), and their size.
        self.out: list[bytes] = [head]
        self.out_size = len(head)
        # Everything written to the current worker, kept while a resend may
        # need it (at most REPLAY_LIMIT bytes); None once too large.
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.sent_any = False
        self.body_done = False
        self.chunked = False
        self.expect = False
        self.head_request = method == b"HEAD"
        self.http10 = False
        self.keep_alive = True
        self.upgrade = False
        # Answered by the daemon itself (health_path), never sent to a worker.
        self.local = False
        # Answered (or failed) and released: later events are ignored.
        self.done = False
        # Loop times: head complete, queued (0: never), taken by a worker, sent in full.
        self.started_at = 0.0
        self.queued_at = 0.0
        self.taken_at = 0.0
        self.clock_at = 0.0
        self.queue_wait = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.worker: Worker | None = None
        self.upstream: Upstream | None = None
        # Workers this request must not go to again, and the retry counts.
        self.tried: set[Worker] | None = None
        self.resends = 0
        self.retries = 0
        # A canary answered it with a 5xx: only old-generation workers now.
        self.canary_free = False

    # -- bytes toward the worker ----------------------------------------------------------------

    def body(self, data: bytes) -> None:
        """Queue body bytes (already framed for the worker)."""
        self.out.append(data)
        self.out_size += len(data)

    def flush(self) -> None:
        """Write what is queued to the worker connection, if there is one."""
        up = self.upstream
        if up is None:
            return
        transport = up.transport
        out = self.out
        if transport is None:
            return
        if not out:
            if self.body_done and self.sent_any:
                up.request_sent()
            return
        if not self.sent_any:
            # The first write of an attempt shows whether the worker's end was
            # already closed (EPIPE at once): then nothing was delivered, and
            # the bytes stay here for a resend.
            closing = up.transport_closing
            if closing():
                return
            if len(out) == 1:
                up.transport_write(out[0])
            else:
                transport.writelines(out)
            if closing():
                return
            self.sent_any = True
        elif len(out) == 1:
            up.transport_write(out[0])
        else:
            transport.writelines(out)
        replay = self.replay
        if replay is not None:
            self.replay_size += self.out_size
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None
            else:
                replay.extend(out)
        out.clear()
        self.out_size = 0
        if self.body_done:
            up.request_sent()

    def rewind(self) -> None:
        """Make every byte sent so far pending again, for a resend (needs ``replay``)."""
        if self.sent_any:
            assert self.replay is not None
            self.out = self.replay + self.out
            self.out_size += self.replay_size
        self.replay = []
        self.replay_size = 0
        self.sent_any = False

    @property
    def idempotent(self) -> bool:
        """A method a proxy may send twice (RFC 9110 §9.2.2)."""
        return self.method in IDEMPOTENT

    @property
    def kept(self) -> bool:
        """The body is read in full and every byte of the request is still at hand."""
        return self.body_done and (not self.sent_any or self.replay is not None)

    # -- flow control -----------------------------------------------------------------------

    def upstream_write_paused(self, paused: bool) -> None:
        """The worker's socket buffer filled (or drained): pause (resume) the client."""
        if paused:
            self.conn.pause(PAUSE_UPSTREAM)
        else:
            self.conn.unpause(PAUSE_UPSTREAM)

    def client_write_paused(self, paused: bool) -> None:
        """The client's socket buffer filled (or drained): pause (resume) the worker."""
        up = self.upstream
        if up is not None:
            if paused:
                up.pause_reading()
            else:
                up.resume_reading()

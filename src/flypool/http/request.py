"""Per-request and shared state of the front side, and the worker liveness check.

Kept apart from :mod:`flypool.http.client` (the protocol itself) so that the
router and upstream modules can name these types without importing it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from flypool.http.parsing import IDEMPOTENT

if TYPE_CHECKING:
    from flypool.http.client import ClientConnection
    from flypool.http.upstream import UpstreamConnection
    from flypool.pool.worker import Worker


def worker_gone(w: Worker) -> bool:
    """True when the worker process has exited (or is a zombie not yet reaped)."""
    if w.state.value == "exited" or (w.proc is not None and w.proc.returncode is not None):
        return True
    # Off the hot path: only when a reused connection broke before any answer.
    try:
        with open(f"/proc/{w.pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


class ServerState:
    """What all client connections of the daemon share."""

    __slots__ = (
        "body_timeout",
        "connections",
        "handing_over",
        "header_timeout",
        "keepalive_timeout",
        "max_header_size",
        "shutting_down",
    )

    def __init__(
        self,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        body_timeout: float,
        max_header_size: int,
    ) -> None:
        self.connections: set[ClientConnection] = set()
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.max_header_size = max_header_size
        self.shutting_down = False
        # USR2: connections freeze (stop reading) as soon as they are idle.
        self.handing_over = False


class Request:
    """One request from arrival to the end of its response."""

    __slots__ = (
        "awaiting_body",
        "body_started",
        "buf",
        "buffered",
        "chunked",
        "complete",
        "conn",
        "done",
        "fresh",
        "head_request",
        "http10",
        "keep_alive",
        "local",
        "method",
        "queue_wait",
        "queued_at",
        "replay",
        "response_started",
        "started_at",
        "target",
        "timer",
        "tried",
        "upgrade",
        "upstream",
        "worker",
    )

    def __init__(self, conn: ClientConnection, head: bytes, method: bytes) -> None:
        self.conn = conn
        self.method = method
        # Bytes not yet written to the worker (the head first).
        self.buf: list[bytes] = [head]
        self.buffered = len(head)
        # Everything written so far, kept while a resend is still allowed.
        self.replay: list[bytes] | None = [] if method in IDEMPOTENT else None
        self.body_started = False
        # Held back from the workers until the body is in (or 64 KiB of it),
        # so a slow uploader does not occupy a worker slot.
        self.awaiting_body = False
        self.chunked = False
        self.complete = False
        self.done = False
        self.fresh = False
        self.head_request = method == b"HEAD"
        self.http10 = False
        self.keep_alive = True
        # Answered by the daemon itself (health_path), never sent to a worker.
        self.local = False
        self.upgrade = False
        self.queued_at = 0.0
        self.queue_wait = 0.0
        self.started_at = 0.0
        self.target = b""
        self.response_started = False
        self.timer: asyncio.TimerHandle | None = None
        self.tried: set[Worker] | None = None
        self.upstream: UpstreamConnection | None = None
        self.worker: Worker | None = None

"""The front side of the proxy: one protocol object per client connection.

Each client connection parses requests with httptools and hands each request
to the app's :class:`~flypool.http.router.Router`. Request heads are
forwarded as the raw bytes the client sent whenever those bytes are at hand
(the usual case: a head at the start of a read); bodies stream through as
they arrive, with backpressure both ways. Pipelined requests wait, in order,
while reading from the client is paused.

Pause reasons are kept as bits so that reading resumes only when none of
them applies any more (aiohttp's accounting).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from flypool.http.parsing import (
    LAST_CHUNK,
    build_request_head,
    chunk,
    error_response,
    simple_response,
    target_path,
)
from flypool.http.request import Request, ServerState, worker_gone

if TYPE_CHECKING:
    from flypool.http.router import Router
    from flypool.http.upstream import UpstreamConnection
    from flypool.pool.worker import Worker

# Reasons to stop reading from the client.
PAUSE_UPSTREAM = 1  # the worker isn't taking body bytes as fast as they come
PAUSE_PIPELINE = 2  # a further request waits for the current one
PAUSE_BUFFER = 4  # body bytes are buffered while the request waits for a worker

# Timeout kinds checked by the sweeper (flypool.http.server).
T_NONE = 0
T_HEAD = 1
T_BODY = 2
T_IDLE = 3

# How long after a reused connection broke to look whether its worker died.
REPLAY_CHECK_DELAY = 0.05

BUFFER_LIMIT = 65536
REPLAY_LIMIT = 65536
MAX_HEADERS = 100


class _HeadTooLarge(Exception):
    pass


class _BadVersion(Exception):
    pass


class _BadFraming(Exception):
    pass


class ClientConnection(asyncio.Protocol):
    """An HTTP/1.1 client connection on a front listener."""

    def __init__(self, router: Router, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        # Shared state.
        self.router = router
        self.state = state
        self.loop = loop
        # Per-connection state.
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # Bytes after a "Connection: close" request are ignored, not an error
        # that would cost the request already on its way to a worker.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.pause_reasons = 0
        self.write_paused = False
        self.deadline = 0.0
        self.timeout_kind = T_NONE
        self.closing = False
        self.active: Request | None = None
        self.pipeline: deque[Request] | None = None
        self.tunnel = False
        self.frozen = False
        # Per-request (parsing) state.
        self.parsing: Request | None = None
        self._in_head = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_pending = 0
        self._chunked = False
        self._has_body = False
        self._expect = False
        self._last: Request | None = None
        self.read_eof = False
        # A later pipelined request was malformed: answer it after the current one.
        self.pending_error = 0
        self._data = b""
        self._raw_ok = False
        self._feeding = False

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=65536)
        self.state.connections.add(self)
        self._arm(T_HEAD, self.state.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self.transport = None
        self.closing = True
        for req in self._requests():
            self._abandon(req)
        self.active = None
        self.pipeline = None

    def eof_received(self) -> bool | None:
        # A client may send its request and shut its write side: answer it
        # before closing (HAProxy and the example worker do the same).
        if (
            self.active is not None
            and self.active.complete
            and not self._in_head
            and not self.tunnel
            and not self.active.upgrade
        ):
            self.read_eof = True
            return True
        return None

    def pause_writing(self) -> None:
        # The client reads slower than the worker writes: stop reading the worker.
        self.write_paused = True
        req = self.active
        if req is not None and req.upstream is not None and req.upstream.transport is not None:
            req.upstream.read_paused = True
            req.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        req = self.active
        if req is not None and req.upstream is not None and req.upstream.transport is not None:
            req.upstream.read_paused = False
            req.upstream.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            req = self.active
            if req is not None and req.upstream is not None and req.upstream.transport:
                req.upstream.transport.write(data)
            return
        if self.closing:
            return
        if self.timeout_kind == T_BODY:
            self.deadline = self.loop.time() + self.state.body_timeout
        self._data = data
        self._raw_ok = not self._in_head and self.parsing is None
        self._feeding = True
        try:
            try:
                self.parser.feed_data(data)
            finally:
                # Writes to the worker are batched while parsing, flushed after.
                self._feeding = False
        except httptools.HttpParserUpgrade as exc:
            # httptools completes the message before raising, so the request
            # is the last one made, not self.parsing.
            req = self._last
            if req is not None and not req.done:
                rest = data[int(exc.args[0]) :]
                if rest:
                    req.buf.append(rest)
                # Bytes after an upgrade head belong to the tunnel; wait for
                # the worker's answer before reading more.
                self._pause(PAUSE_PIPELINE)
            self._flush_active()
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            status = (
                431
                if isinstance(cause, _HeadTooLarge)
                else (505 if isinstance(cause, _BadVersion) else 400)
            )
            self._protocol_error(status)
            return
        except httptools.HttpParserError:
            self._protocol_error(400)
            return
        if self._in_head:
            # A head split over several reads: bound what we accept of it.
            self._head_pending += len(data)
            if self._head_pending > self.state.max_header_size:
                self._protocol_error(431)
                return
        self._flush_active()

    # -- parser callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_pending = 0
        self._chunked = False
        self._has_body = False
        self._expect = False
        if self.timeout_kind == T_IDLE:
            self._arm(T_HEAD, self.state.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        n = len(name)
        if n == 17 and name.lower() == b"transfer-encoding":
            self._chunked = True
        elif n == 14 and value != b"0" and name.lower() == b"content-length":
            self._has_body = True
        elif n == 6 and name.lower() == b"expect":
            self._expect = True
        if len(headers) > MAX_HEADERS:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        if self._head_size + len(self._url) > self.state.max_header_size:
            raise _HeadTooLarge
        method = parser.get_method()
        version = parser.get_http_version()
        data = self._data
        if version != "1.1" and version != "1.0":
            raise _BadVersion
        if self._chunked and version == "1.0":
            # RFC 9112 section 6.1: chunked framing on HTTP/1.0 is faulty.
            raise _BadFraming
        head: bytes | None = None
        if self._raw_ok:
            # The raw bytes are used only when they are exactly
            # "METHOD SP target SP HTTP/x.y" at the very start of the read;
            # anything llhttp tolerated (leading blank lines, extra spaces) is
            # rebuilt, so the worker parses exactly what we parsed.
            url = self._url
            m = len(method)
            line = m + len(url) + 12  # METHOD SP url SP HTTP/x.y CRLF
            if (
                data.startswith(method)
                and data[m : m + 1] == b" "
                and data[m + 1 : m + 1 + len(url)] == url
                and data[m + 1 + len(url) : m + 2 + len(url)] == b" "
                and data[line - 2 : line] == b"\r\n"
            ):
                end = data.find(b"\r\n\r\n", line - 2)
                if end >= 0:
                    head = data[: end + 4]
        if head is None:
            head = build_request_head(method, self._url, version.encode(), self._headers)
        self._raw_ok = False
        req = Request(self, head, method)
        self._last = req
        req.target = self._url
        req.http10 = version == "1.0"
        req.keep_alive = parser.should_keep_alive() and not self.state.shutting_down
        req.upgrade = parser.should_upgrade()
        req.chunked = self._chunked
        # Held until the body is in -- unless the client waits for the worker's
        # "100 Continue" before sending it.
        req.awaiting_body = (
            (self._chunked or self._has_body) and not req.upgrade and not self._expect
        )
        self.parsing = req
        router = self.router
        if router.health_path and target_path(self._url) == router.health_path:
            req.local = True
            req.replay = None
            req.buf = []
            self._queue_or_start(req)
            return
        self._arm(T_BODY, self.state.body_timeout)
        self._queue_or_start(req)

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None:
            return
        if req.chunked:
            body = chunk(body)
        if req.local:
            return  # body of a request answered by the daemon: discard
        req.buf.append(body)
        req.buffered += len(body)
        if req.awaiting_body and req.buffered >= BUFFER_LIMIT:
            # A large upload: stream it through a worker from here on.
            self._release_body(req)
        if req.upstream is None and req.buffered > BUFFER_LIMIT:
            self._pause(PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        req = self.parsing
        self.parsing = None
        self._raw_ok = False
        if req is None:
            return
        if req.chunked:
            req.buf.append(LAST_CHUNK)
        req.complete = True
        if self.timeout_kind == T_BODY:
            self._arm(T_NONE, 0.0)
        if req.awaiting_body:
            self._release_body(req)
        if req.local and req is self.active:
            self._answer_health(req)

    # -- request lifecycle ----------------------------------------------------------------

    def _queue_or_start(self, req: Request) -> None:
        if self.active is None:
            self._start(req)
        else:
            if self.pipeline is None:
                self.pipeline = deque()
            self.pipeline.append(req)
            self._pause(PAUSE_PIPELINE)

    def _start(self, req: Request) -> None:
        self.active = req
        if req.local:
            # A health-check request answered by the daemon, once it is complete.
            if req.complete:
                self._answer_health(req)
            return
        req.started_at = self.loop.time()
        if req.awaiting_body and not req.complete:
            return  # dispatched by _release_body once the body is in
        req.awaiting_body = False
        self.router.dispatch(req)

    def _release_body(self, req: Request) -> None:
        req.awaiting_body = False
        if req is self.active and req.worker is None and not req.done:
            self.router.dispatch(req)

    def _answer_health(self, req: Request) -> None:
        router = self.router
        serving = not router.drained and any(w.state.value == "ready" for w in router.workers)
        status = 200 if serving else 503
        body = b"serving\n" if serving else (b"drained\n" if router.drained else b"no worker\n")
        router.stats.by_class[status // 100] += 1
        assert self.transport is not None
        self.transport.write(
            simple_response(status, body, keep_alive=req.keep_alive, head_only=req.head_request)
        )
        self._finish(req, close=not req.keep_alive)

    def upstream_attached(self, req: Request) -> None:
        """The router found a connection for ``req``: send what we have."""
        if req.done:
            return
        if not self._feeding:
            self._write_pending(req)
        if self.write_paused and req.upstream is not None and req.upstream.transport:
            req.upstream.read_paused = True
            req.upstream.transport.pause_reading()

    def _flush_active(self) -> None:
        req = self.active
        if req is not None and req.upstream is not None and req.buf:
            self._write_pending(req)

    def _write_pending(self, req: Request) -> None:
        up = req.upstream
        if up is None or up.transport is None:
            return
        buf = req.buf
        if not buf:
            return
        transport = up.transport
        if transport.is_closing():
            # The worker's end closed before we could write: it never saw this.
            up.unread = True
        if len(buf) == 1:
            transport.write(buf[0])
        else:
            transport.writelines(buf)
        if transport.is_closing() and not up.got_bytes:
            # The write failed at once (EPIPE): the worker is gone and never read it.
            up.unread = True
        replay = req.replay
        if replay is not None:
            replay.extend(buf)
            if req.body_started or not req.complete or req.buffered > REPLAY_LIMIT:
                req.replay = None
        req.body_started = True
        req.buf = []
        req.buffered = 0
        if self.pause_reasons & PAUSE_BUFFER:
            self._unpause(PAUSE_BUFFER)

    def pause_for_upstream(self, paused: bool) -> None:
        """Backpressure from the worker side."""
        if paused:
            self._pause(PAUSE_UPSTREAM)
        else:
            self._unpause(PAUSE_UPSTREAM)

    def response_done(self, req: Request, up: UpstreamConnection) -> None:
        """The worker finished its response to ``req``."""
        w = req.worker
        router = self.router
        if w is not None:
            w.processed += 1
            if router.max_requests and w.processed >= router.max_requests:
                router.recycle(w)
        req.upstream = None
        if up.must_close or not req.complete:
            up.close()
            up.req = None
        else:
            up.park()
        close = not req.keep_alive or not req.complete or (req.upgrade and not up.tunnel)
        if router.access_log is not None:
            router.access_log(req, up.status, w)
        router.release(req)
        self._finish(req, close=close)

    def upstream_failed(self, req: Request, up: UpstreamConnection, why: str) -> None:
        """The worker connection broke before the response ended."""
        req.upstream = None
        up.req = None
        router = self.router
        if not up.got_bytes and req.worker is not None:
            router.suspect(req.worker)
        if not up.got_bytes and up.unread and req.replay is not None and not req.response_started:
            # The worker never read the request (it was already dead, e.g.
            # SIGKILLed a moment ago): send it to another worker right away.
            w = req.worker
            router.release(req)
            if w is not None:
                router.exclude(req, w)
            self._replay(req)
            return
        if not up.got_bytes and up.reused and req.replay is not None and not req.response_started:
            # Either the worker closed an idle keep-alive connection just as we
            # reused it (PITFALLS: gunicorn #712) -- resend once, on a fresh
            # connection -- or the request killed the worker, and resending it
            # would kill the next one. Tell them apart by whether the worker
            # process is still alive a moment later.
            w = req.worker
            router.release(req)
            self.loop.call_later(REPLAY_CHECK_DELAY, self._replay_or_fail, req, w, why)
            return
        router.release(req)
        if req.response_started:
            # Part of the response is out; all we can do is cut the client off.
            req.done = True
            if self.transport is not None:
                self.transport.close()
            return
        self.fail_request(req, 502, why)

    def _replay_or_fail(self, req: Request, w: Worker | None, why: str) -> None:
        if req.done or self.transport is None:
            return
        if w is None or worker_gone(w):
            self.fail_request(req, 502, why)
            return
        self._replay(req)

    def _replay(self, req: Request) -> None:
        assert req.replay is not None
        req.buf = req.replay + req.buf
        req.buffered = sum(len(b) for b in req.buf)
        req.replay = None
        req.body_started = False
        req.fresh = True
        self.router.dispatch(req)

    def fail_request(self, req: Request, status: int, detail: str) -> None:
        """Answer ``req`` with an error of the daemon's own and close."""
        if req.done:
            return
        router = self.router
        router.stats.by_class[status // 100] += 1
        if router.access_log is not None:
            router.access_log(req, status, req.worker)
        up = req.upstream
        if up is not None:
            req.upstream = None
            up.abort()
        router.release(req)
        if self.transport is not None and not req.response_started:
            self.transport.write(error_response(status, detail))
        self._finish(req, close=True)

    def start_tunnel(self, req: Request, rest: bytes) -> None:
        """The worker switched protocols: relay raw bytes both ways from now on."""
        self.tunnel = True
        req.response_started = True
        transport = self.transport
        if transport is None:
            return
        if rest:
            transport.write(rest)
        self._arm(T_NONE, 0.0)
        self._flush_active()
        self.pause_reasons = 0
        transport.resume_reading()

    def tunnel_closed(self, req: Request) -> None:
        """Either side of a tunnel closed: close the other and free the slot."""
        if req.worker is not None:
            req.worker.processed += 1
        self.router.release(req)
        req.done = True
        self.active = None
        if self.transport is not None:
            self.transport.close()

    def _finish(self, req: Request, *, close: bool) -> None:
        req.done = True
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        if self.active is req:
            self.active = None
        transport = self.transport
        if transport is None:
            return
        if self.pending_error:
            self._protocol_error(self.pending_error)
            return
        if close or self.state.shutting_down or not req.complete or self.read_eof:
            self.closing = True
            transport.close()
            return
        pipeline = self.pipeline
        if pipeline:
            nxt = pipeline.popleft()
            if not pipeline:
                self._unpause(PAUSE_PIPELINE)
            self._start(nxt)
            if self.active is nxt and nxt.upstream is not None:
                self._write_pending(nxt)
            return
        if self.state.handing_over:
            self.freeze()
            return
        self._arm(T_IDLE, self.state.keepalive_timeout)

    def is_idle(self) -> bool:
        """No request in progress and nothing half-parsed: safe to hand over."""
        return (
            self.active is None
            and not self.pipeline
            and self.parsing is None
            and not self._in_head
            and not self.tunnel
            and not self.closing
            and self.transport is not None
        )

    def freeze(self) -> None:
        """Stop reading for good: the next request waits in the kernel for the next image."""
        self.frozen = True
        self.timeout_kind = T_NONE
        if self.transport is not None:
            self.transport.pause_reading()

    def _abandon(self, req: Request) -> None:
        """The client is gone: release everything ``req`` holds."""
        if req.done:
            return
        req.done = True
        up = req.upstream
        if up is not None:
            req.upstream = None
            up.abort()
        self.router.cancel(req)

    def _requests(self) -> list[Request]:
        reqs = [self.active] if self.active is not None else []
        if self.pipeline:
            reqs.extend(self.pipeline)
        if self.parsing is not None and self.parsing not in reqs:
            reqs.append(self.parsing)
        return reqs

    # -- flow control and timeouts --------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.pause_reasons and self.transport is not None:
            self.transport.pause_reading()
        self.pause_reasons |= reason

    def _unpause(self, reason: int) -> None:
        if not self.pause_reasons & reason:
            return
        self.pause_reasons &= ~reason
        if not self.pause_reasons and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def _arm(self, kind: int, timeout: float) -> None:
        self.timeout_kind = kind
        if kind != T_NONE:
            self.deadline = self.loop.time() + timeout

    def check_timeout(self, now: float) -> None:
        """Called by the sweeper about once a second."""
        kind = self.timeout_kind
        if kind == T_NONE or now < self.deadline or self.transport is None:
            return
        if kind == T_IDLE:
            self.closing = True
            self.transport.close()
        elif kind == T_HEAD:
            if self._in_head:
                self._protocol_error(408)
            else:
                self.closing = True
                self.transport.close()
        elif kind == T_BODY:
            req = self.active
            if req is not None and not req.response_started:
                self.fail_request(req, 408, "request body timed out")
            else:
                self._protocol_error(408)

    def shutdown(self) -> None:
        """Graceful stop: close if idle, else close after the current response."""
        if self.active is None and not self.pipeline and self.transport is not None:
            self.closing = True
            self.transport.close()

    def _protocol_error(self, status: int) -> None:
        active = self.active
        if active is not None and active.complete and not active.done and not self.tunnel:
            # The request in progress is fine and may already be with a worker:
            # let it finish, then answer the bad one and close.
            for req in self._requests():
                if req is not active:
                    self._abandon(req)
            self.pipeline = None
            self.parsing = None
            self.pending_error = status
            self._pause(PAUSE_PIPELINE)
            # The error came mid-read: what the good request buffered in that
            # read has not been written to its worker yet.
            self._flush_active()
            return
        self.timeout_kind = T_NONE
        for req in self._requests():
            self._abandon(req)
        self.active = None
        self.pipeline = None
        self.parsing = None
        transport = self.transport
        if transport is not None and not self.closing:
            self.router.stats.by_class[status // 100] += 1
            transport.write(error_response(status))
            self.closing = True
            transport.close()

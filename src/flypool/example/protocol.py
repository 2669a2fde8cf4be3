"""The example worker's HTTP/1.1 connection: one `asyncio.Protocol` per client.

Standard library only, so that the example runs under a bare ``python3``.

Theory of operation
-------------------
Bytes arrive in `HttpConnection.data_received` and are appended to one
buffer. `_process` then runs a small loop over that buffer:

1. No request in progress: find the end of the head (``\\r\\n\\r\\n``), parse
   it by hand and start a request (`_start_request`). A head larger than
   64 KiB is answered 431, a malformed one 400; both close the connection.
2. A request whose body is still arriving: feed whatever is buffered to the
   body decoder (Content-Length or chunked). Data goes straight into the
   request's sink (a byte counter, a sha256 or, for ``/echo`` only, a list),
   so memory stays bounded whatever the body size.
3. The body is complete: run the route. Small answers are written at once,
   synchronously (the fast path used by router benchmarks). Delays and large
   bodies run as one task per connection; while it runs, later pipelined
   requests wait in the buffer, so responses always leave in request order.

Reading is paused while the buffered bytes exceed `HIGH_WATER` or while the
transport's write buffer is above its high-water mark, and resumed when both
clear. After a 101 Switching Protocols answer the connection becomes a raw
byte echo and the HTTP machinery above is bypassed.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import sys
import traceback
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

from flypool.example.http11 import (
    ECHO_LIMIT,
    MAX_HEAD,
    ChunkedDecoder,
    HttpError,
    Request,
    param_float,
    param_int,
    parse_head,
    status_line,
    websocket_accept,
)

PIECE = 64 * 1024
"""Large response bodies are written in pieces of this size."""
HIGH_WATER = 64 * 1024
"""Buffered, not yet processed request bytes above which reading pauses."""

_FILL = b"x" * PIECE
_FULL_CHUNK = b"%x\r\n" % PIECE + _FILL + b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# Memory held on purpose by GET /grow.
_HOARD: list[bytearray] = []


@dataclass(frozen=True, slots=True)
class Settings:
    """What the connection protocol needs to know about this worker."""

    pid: int
    worker: str
    """Value of FLYPOOL_WORKER (``-`` when unset)."""
    release: str
    """Absolute working directory: the release this worker was started in."""
    default_delay: float = 0.0
    """EXAMPLE_DELAY: per-request delay when the query has no ``delay``."""
    ready_status: int = 200
    """EXAMPLE_READY_STATUS: the status ``/ready`` answers."""
    keepalive_timeout: float = 75.0
    """EXAMPLE_KEEPALIVE_TIMEOUT: idle connections are closed after this; 0 = never."""


class ServerState:
    """State shared by every connection of one listener."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.shutting_down = False
        self.default_body = (
            f"pid={settings.pid} worker={settings.worker} release={settings.release}\n"
        ).encode("utf-8", "surrogateescape")
        release_name = os.path.basename(settings.release.rstrip("/")) or "/"
        self.identity = b"X-Worker-Pid: %d\r\nX-Worker-Id: %s\r\nX-Release: %s\r\n" % (
            settings.pid,
            settings.worker.encode("latin-1", "replace"),
            release_name.encode("latin-1", "replace"),
        )
        self.date_line = b""
        self.fast_response = b""
        self._clock: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        self.refresh_date()

    def refresh_date(self) -> None:
        """Rebuild the cached Date header and the prebuilt ``GET /`` answer."""
        self.date_line = b"Date: %s\r\n" % email.utils.formatdate(usegmt=True).encode("ascii")
        # The whole keep-alive answer to a plain `GET /` is one constant per
        # second, so the hot path is a dict lookup and one transport.write.
        self.fast_response = b"".join(
            (
                status_line(200),
                self.date_line,
                b"Content-Type: ",
                _TEXT,
                b"\r\nContent-Length: %d\r\n" % len(self.default_body),
                self.identity,
                b"\r\n",
                self.default_body,
            )
        )

    def start_clock(self, loop: asyncio.AbstractEventLoop) -> None:
        """Refresh the Date header every second until `stop_clock`."""
        self.refresh_date()
        self._clock = loop.call_later(1.0, self.start_clock, loop)

    def stop_clock(self) -> None:
        """Cancel the Date refresh timer."""
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    def begin_shutdown(self) -> None:
        """Close idle connections now; busy ones close after their current response."""
        self.shutting_down = True
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.shutdown()
        if not self.connections:
            self._all_closed.set()

    def connection_closed(self, conn: HttpConnection) -> None:
        """Forget `conn`; wake `wait_closed` when it was the last one."""
        self.connections.discard(conn)
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    async def wait_closed(self) -> None:
        """Wait until every connection is closed (after `begin_shutdown`)."""
        if self._all_closed is not None:
            await self._all_closed.wait()

    def close_all(self) -> None:
        """Close whatever is left (the graceful deadline has passed)."""
        for conn in list(self.connections):
            conn.close()


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, runs routes, writes answers."""

    def __init__(self, state: ServerState) -> None:
        # Shared state.
        self._state = state
        self._settings = state.settings
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # Per-connection state.
        self._buf = b""
        self._scanned = 0  # how far the buffer was already searched for the head's end
        self._processing = False  # guards _process against re-entry
        self._closing = False
        self._eof = False
        self._upgraded = False
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle_deadline = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        # Per-request state.
        self._req: Request | None = None
        self._reading_body = False
        self._body_left = 0  # Content-Length bytes still to read
        self._dechunker: ChunkedDecoder | None = None

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the connection and arm the idle timer."""
        # A cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._state.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop everything that still refers to this connection."""
        self._closing = True
        self._state.connection_closed(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._wake_drain()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def data_received(self, data: bytes) -> None:
        """Buffer `data` and process every complete request in it."""
        if self._upgraded:
            assert self._transport is not None
            self._transport.write(data)
            return
        if self._buf:
            self._buf += data
        else:
            self._buf = data
        self._process()

    def eof_received(self) -> bool:
        """Half-close: finish the answer in progress, then close."""
        self._eof = True
        # False (close now) when there is nothing to answer or the request can
        # never be complete; True keeps the transport open for the pending answer.
        return not (self._upgraded or self._req is None or self._reading_body)

    def pause_writing(self) -> None:
        """The client reads slower than we write: stop reading too."""
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        """The write buffer drained: wake a streaming body and read again."""
        self._write_paused = False
        self._wake_drain()
        if self._upgraded:
            self._update_reading()
        else:
            self._process()

    # Used by the server

    @property
    def closing(self) -> bool:
        """Whether the connection is closed or closing."""
        return self._closing

    def shutdown(self) -> None:
        """Graceful stop: close if idle; otherwise the current answer closes it."""
        if self._closing or self._upgraded:
            return  # an Upgrade tunnel is in flight until the deadline
        if self._req is None and not self._buf:
            self.close()

    def close(self) -> None:
        """Close the transport after flushing what is buffered."""
        if not self._closing:
            self._closing = True
            if self._transport is not None:
                self._transport.close()

    # Flow control

    def _update_reading(self) -> None:
        if self._closing or self._transport is None:
            return
        pause = self._write_paused or len(self._buf) > HIGH_WATER
        if pause and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()
        elif not pause and self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark."""
        if self._write_paused and not self._closing:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            await waiter

    def _arm_idle(self) -> None:
        timeout = self._settings.keepalive_timeout
        if timeout <= 0:
            return
        # One TimerHandle per connection that re-arms itself when it fires
        # early, instead of cancelling and re-creating a timer per request.
        self._idle_deadline = self._loop.time() + timeout
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(self._idle_deadline, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self._closing or self._upgraded or self._req is not None:
            return  # busy: re-armed when the answer is complete
        if self._loop.time() < self._idle_deadline:
            self._idle_timer = self._loop.call_at(self._idle_deadline, self._on_idle)
        else:
            self.close()

    # Request processing

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            self._process_buffer()
        except HttpError as err:
            self._fail(err.status, err.message)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._fail(500, "internal error in the example worker")
        finally:
            self._processing = False
        if self._closing:
            return
        if self._eof and self._req is None:
            self.close()  # the peer sent everything it will; all of it is answered
        else:
            self._update_reading()

    def _process_buffer(self) -> None:
        while not self._closing:
            req = self._req
            if req is not None:
                if not self._reading_body:
                    return  # an async answer is running; pipelined data waits
                if not self._feed_body(req):
                    return
                self._reading_body = False
                self._run(req)
                continue
            if self._write_paused:
                return  # don't produce answers the client is not reading
            buf = self._buf
            if not buf:
                return
            if buf[0] in b"\r\n":
                # RFC 9112 §2.2: ignore empty lines before a request line.
                buf = self._buf = buf.lstrip(b"\r\n")
                if not buf:
                    return
            end = buf.find(b"\r\n\r\n", self._scanned)
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HttpError(431, "request head larger than 64 KiB")
                self._scanned = max(0, len(buf) - 3)
                return
            if end > MAX_HEAD:
                raise HttpError(431, "request head larger than 64 KiB")
            head = buf[: end + 2]
            self._buf = buf[end + 4 :]
            self._scanned = 0
            self._start_request(head)

    def _start_request(self, head: bytes) -> None:
        """Parse one head (ending in its last header's CRLF) and start its request."""
        req = parse_head(head)
        if self._state.shutting_down:
            req.keep_alive = False
        self._req = req
        path = req.path
        if path == b"/crash":
            os._exit(1)  # die mid-request without answering, as a crashing app would
        if (
            path == b"/ws"
            and req.upgrade
            and b"upgrade" in req.connection
            and req.version == b"HTTP/1.1"
            and not req.has_body
        ):
            self._upgrade(req.upgrade, req.ws_key)
            return
        if path == b"/upload" or path == b"/echo-sha":
            req.hasher = hashlib.sha256()
        elif path == b"/echo":
            if req.content_length > ECHO_LIMIT:
                raise HttpError(413, "/echo takes at most 16 MiB")
            req.chunks = []

        if not req.has_body:
            self._run(req)
            return
        self._reading_body = True
        if req.chunked:
            self._dechunker = ChunkedDecoder()
        else:
            self._dechunker = None
            self._body_left = req.content_length
        if req.expect_continue and req.version == b"HTTP/1.1" and not self._buf:
            assert self._transport is not None
            self._transport.write(_CONTINUE)

    def _feed_body(self, req: Request) -> bool:
        """Consume buffered body bytes; return True once the body is complete."""
        if self._dechunker is not None:
            done, self._buf = self._dechunker.feed(self._buf, req.consume)
            return done
        buf = self._buf
        left = self._body_left
        if len(buf) <= left:
            data, self._buf = buf, b""
        else:
            data, self._buf = buf[:left], buf[left:]
        if data:
            req.consume(data)
            self._body_left = left = left - len(data)
        return left == 0

    def _run(self, req: Request) -> None:
        """The request is complete: answer now, or start a task that will."""
        path = req.path
        if (
            path == b"/"
            and req.method == b"GET"
            and not req.params
            and req.keep_alive
            and req.version == b"HTTP/1.1"
            and self._settings.default_delay <= 0
            and not self._state.shutting_down
        ):
            # Fast path, the router benchmarks' request: one prebuilt answer.
            assert self._transport is not None
            self._transport.write(self._state.fast_response)
            self._end_response(req)
            return
        default = 0.0 if path == b"/ready" else self._settings.default_delay
        delay = param_float(req.params, "delay", default)
        if delay > 0:
            self._spawn(self._delayed(req, delay))
        else:
            coro = self._route(req)
            if coro is not None:
                self._spawn(coro)

    async def _delayed(self, req: Request, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._closing:
            coro = self._route(req)
            if coro is not None:
                await coro

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(self._guard(coro))
        self._task = task
        # The loop keeps only weak references to tasks.
        self._state.tasks.add(task)
        task.add_done_callback(self._state.tasks.discard)

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except HttpError as err:
            self._fail(err.status, err.message)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            if self._transport is not None:
                self._transport.abort()  # the answer may be half written: cut it

    def _end_response(self, req: Request) -> None:
        """The answer to `req` is fully written: close, or go on with the next request."""
        self._req = None
        if not req.keep_alive:
            self.close()
            return
        self._arm_idle()
        if not self._processing:
            self._process()  # we are in a task: handle what was pipelined meanwhile

    # Answers

    def _connection_header(self, req: Request) -> bytes:
        if self._state.shutting_down:
            req.keep_alive = False
        if not req.keep_alive:
            return b"Connection: close\r\n"
        if req.version == b"HTTP/1.0":
            return b"Connection: keep-alive\r\n"
        return b""

    def _head(self, req: Request, status: int, ctype: bytes, length: int | None) -> bytes:
        """Serialize a response head; `length` None means chunked."""
        framing = (
            b"Transfer-Encoding: chunked\r\n"
            if length is None
            else b"Content-Length: %d\r\n" % length
        )
        return b"".join(
            (
                status_line(status),
                self._state.date_line,
                b"Content-Type: ",
                ctype,
                b"\r\n",
                framing,
                self._state.identity,
                self._connection_header(req),
                b"\r\n",
            )
        )

    def _send(self, req: Request, status: int, body: bytes, ctype: bytes = _TEXT) -> None:
        """Write a complete answer with a body in memory."""
        assert self._transport is not None
        if status == 204 or status == 304:
            # These never have a body, and a 204 must not carry Content-Length.
            head = b"".join(
                (
                    status_line(status),
                    self._state.date_line,
                    self._state.identity,
                    self._connection_header(req),
                    b"\r\n",
                )
            )
            self._transport.write(head)
        elif req.head_only:
            self._transport.write(self._head(req, status, ctype, len(body)))
        else:
            self._transport.write(self._head(req, status, ctype, len(body)) + body)
        self._end_response(req)

    def _fail(self, status: int, message: str) -> None:
        """Answer an error outside the normal flow, then close."""
        if self._closing or self._transport is None:
            return
        body = message.encode() + b"\n"
        self._transport.write(
            b"".join(
                (
                    status_line(status),
                    self._state.date_line,
                    b"Content-Type: ",
                    _TEXT,
                    b"\r\nContent-Length: %d\r\n" % len(body),
                    self._state.identity,
                    b"Connection: close\r\n\r\n",
                    body,
                )
            )
        )
        self._req = None
        self.close()

    def _upgrade(self, proto: bytes, ws_key: bytes) -> None:
        """Answer 101 and turn the connection into a raw byte echo."""
        assert self._transport is not None
        extra = b"Upgrade: %s\r\nConnection: Upgrade\r\n" % proto
        if proto.lower() == b"websocket" and ws_key:
            extra += b"Sec-WebSocket-Accept: %s\r\n" % websocket_accept(ws_key)
        self._transport.write(
            status_line(101) + self._state.date_line + self._state.identity + extra + b"\r\n"
        )
        self._upgraded = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        rest, self._buf = self._buf, b""
        if rest:
            self._transport.write(rest)  # the peer may have sent tunnel bytes with the head

    def _route(self, req: Request) -> Coroutine[Any, Any, None] | None:
        """Answer `req`; return a coroutine when the answer must be streamed."""
        path = req.path
        if path == b"/upload" or path == b"/echo-sha":
            assert req.hasher is not None  # set in _start_request for these paths
            digest = req.hasher.hexdigest()
            body = json.dumps({"sha256": digest, "bytes": req.body_bytes}).encode()
            self._send(req, 200, body, _JSON)
        elif path == b"/echo":
            ctype = _TEXT
            for name, value in req.headers():
                if name.lower() == b"content-type":
                    ctype = value
            self._send(req, 200, b"".join(req.chunks or ()), ctype)
        elif path == b"/headers":
            self._send(req, 200, self._headers_json(req), _JSON)
        elif path == b"/ready":
            status = self._settings.ready_status
            self._send(req, status, b"ok" if 200 <= status < 300 else b"not ready")
        elif path == b"/close":
            req.keep_alive = False
            self._send(req, 200, self._state.default_body)
        elif path == b"/grow":
            # Holds N MiB until the process exits: lets tests trip memory_limit.
            mb = param_int(req.params, "mb", 1, 0, 4096)
            _HOARD.append(bytearray(os.urandom(1024)) * (mb * 1024))
            self._send(req, 200, b"grew %d MiB\n" % mb)
        elif path == b"/chunked":
            size = param_int(req.params, "size", 0, 0, 1 << 50)
            if req.version == b"HTTP/1.0":
                return self._send_sized(req, 200, size)  # 1.0 has no chunked encoding
            return self._send_chunked(req, size)
        else:
            status = param_int(req.params, "status", 200, 200, 599)
            if "size" in req.params:
                return self._send_sized(req, status, param_int(req.params, "size", 0, 0, 1 << 50))
            self._send(req, status, self._state.default_body)
        return None

    def _headers_json(self, req: Request) -> bytes:
        return json.dumps(
            {
                "method": req.method.decode("latin-1"),
                "target": req.target.decode("latin-1"),
                "version": req.version.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in req.headers()],
                "body_bytes": req.body_bytes,
            }
        ).encode()

    def _send_sized(self, req: Request, status: int, size: int) -> Coroutine[Any, Any, None] | None:
        """Answer `size` bytes of ``x``; large bodies are streamed by the returned coroutine."""
        if status == 204 or status == 304:
            self._send(req, status, b"")
        elif req.head_only:
            assert self._transport is not None
            self._transport.write(self._head(req, status, _TEXT, size))
            self._end_response(req)
        elif size <= PIECE:
            self._send(req, status, _FILL[:size])
        else:
            return self._stream_sized(req, status, size)
        return None

    async def _stream_sized(self, req: Request, status: int, size: int) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(self._head(req, status, _TEXT, size))
        left = size
        while left > 0:
            if self._closing:
                return
            piece = _FILL if left >= PIECE else _FILL[:left]
            transport.write(piece)
            left -= len(piece)
            await self._drain()
        self._end_response(req)

    def _send_chunked(self, req: Request, size: int) -> Coroutine[Any, Any, None] | None:
        """Answer `size` bytes of ``x`` with chunked framing, in 64 KiB chunks."""
        if size > PIECE and not req.head_only:
            return self._stream_chunked(req, size)
        assert self._transport is not None
        parts = [self._head(req, 200, _TEXT, None)]
        if not req.head_only:
            if size:
                parts.append(b"%x\r\n%s\r\n" % (size, _FILL[:size]))
            parts.append(_LAST_CHUNK)
        self._transport.write(b"".join(parts))
        self._end_response(req)
        return None

    async def _stream_chunked(self, req: Request, size: int) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(self._head(req, 200, _TEXT, None))
        left = size
        while left > 0:
            if self._closing:
                return
            if left >= PIECE:
                transport.write(_FULL_CHUNK)
                left -= PIECE
            else:
                transport.write(b"%x\r\n%s\r\n" % (left, _FILL[:left]))
                left = 0
            await self._drain()
        transport.write(_LAST_CHUNK)
        self._end_response(req)

"""The example worker's connection: one `asyncio.Protocol` per client, parsed by httptools.

What a worker behind flypool must get right, and where:

- pipelined requests are answered in order: the parser queues complete
  requests, and one task per connection (`_respond`) answers them one by one;
- backpressure: reading pauses while the client does not read our answers or
  has many requests queued, and large bodies are written piece by piece;
- keep-alive per HTTP/1.0 and 1.1 (the parser decides); idle connections
  close after ``keepalive_timeout``; on stop, idle connections close at once,
  busy ones after an answer that says ``Connection: close``.

Routes; ``?delay=S`` delays any answer by S seconds:

- ``/`` and unknown paths: ``pid=.. worker=.. release=..``, or ``?size=N``
  bytes of ``x``; ``?status=N`` sets the status;
- ``/ready``: ``ok``;
- ``/headers``: JSON of the method, target, version, header fields as
  received and body length;
- ``/upload``: JSON of the body's sha256 and length, hashed as it arrives;
- ``/grow?mb=N``: keeps N more MiB allocated until exit (``memory_limit`` tests);
- ``/crash``: the process exits at once with status 1, answering nothing;
- ``GET /ws`` with ``Connection: Upgrade``: ``101``, then every byte is echoed.

Every answer carries ``X-Worker-Pid``, ``X-Worker-Id`` and ``X-Release``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from email.utils import formatdate
from enum import Enum
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools

MAX_HEAD = 64 * 1024
"""Request heads larger than this are refused (431)."""
MAX_QUEUED = 16
"""Reading pauses while more pipelined requests than this wait for their answer."""
PIECE = 64 * 1024
"""Large bodies are written in pieces of this size, each once the client took the last."""

_FILL = b"x" * PIECE
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HOARD: list[bytearray] = []  # memory held on purpose by /grow


class HttpError(Exception):
    """A request refused with `status`; the connection closes after the answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Phase(Enum):
    """Where a connection is; `NEXT` lists the allowed transitions."""

    REQUESTS = "requests"  # reading requests, answering them in order
    HELD = "held"  # reading stopped (upgrade, refusal, EOF): answer the queue, then 101 or close
    TUNNEL = "tunnel"  # after 101: every byte is echoed
    CLOSED = "closed"


NEXT = {
    Phase.REQUESTS: {Phase.HELD, Phase.CLOSED},
    Phase.HELD: {Phase.TUNNEL, Phase.CLOSED},
    Phase.TUNNEL: {Phase.CLOSED},
    Phase.CLOSED: set(),
}


class Worker:
    """What the connections share: identity, keep-alive timeout, stopping, who is open."""

    def __init__(self, worker_id: str, release: str, keepalive_timeout: float) -> None:
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[Connection] = set()
        self.stopping = False
        self.all_closed = asyncio.Event()
        line = f"pid={os.getpid()} worker={worker_id} release={release}\n"
        self.body = line.encode(errors="surrogateescape")  # a path need not be UTF-8
        name = os.path.basename(release.rstrip("/")) or "/"
        self.identity = b"X-Worker-Pid: %d\r\nX-Worker-Id: %s\r\nX-Release: %s\r\n" % (
            os.getpid(),
            worker_id.encode("latin-1", "replace"),
            name.encode("latin-1", "replace"),
        )
        self._second, self._date = 0, b""

    def date(self) -> bytes:
        """The Date header's value, formatted once a second (formatting costs more than a write)."""
        if (now := int(time.time())) != self._second:
            self._second, self._date = now, formatdate(now, usegmt=True).encode()
        return self._date

    def stop(self) -> None:
        """Close idle connections now, busy ones after their answer."""
        self.stopping = True
        for conn in list(self.connections):
            conn.shutdown()
        if not self.connections:
            self.all_closed.set()

    def forget(self, conn: Connection) -> None:
        """`conn` closed; once stopping, wake the waiter when none is left."""
        self.connections.discard(conn)
        if self.stopping and not self.connections:
            self.all_closed.set()


@dataclass(slots=True)
class Request:
    """One request: its head, and what its body produced."""

    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    method: bytes = b""
    version: str = "1.1"
    path: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    keep_alive: bool = False
    upgrade: bool = False
    body_bytes: int = 0
    hasher: hashlib._Hash | None = None  # for /upload

    def header(self, name: bytes) -> bytes:
        """The value of the last field called `name` (lower case), stripped; b"" if none."""
        values = [v for k, v in self.headers if k.lower() == name]
        return values[-1].strip(b" \t") if values else b""


class Connection(asyncio.Protocol):
    """One client connection; also the parser's callback object."""

    _transport: asyncio.Transport
    _responder: asyncio.Task[None]

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._phase = Phase.REQUESTS
        self._req: Request | None = None  # being parsed
        self._head_size = 0
        self._queue: asyncio.Queue[Request | HttpError] = asyncio.Queue()  # to answer
        self._answering: Request | HttpError | None = None  # taken from the queue
        self._early = b""  # tunnel bytes that came with an upgrade request
        self._read_paused = self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._worker.connections.add(self)
        self._responder = self._loop.create_task(self._respond())

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = Phase.CLOSED
        self._worker.forget(self)
        self._responder.cancel()
        self._set_idle(False)

    def data_received(self, data: bytes) -> None:
        if self._phase is Phase.TUNNEL:
            self._transport.write(data)
            return
        if self._phase is not Phase.REQUESTS:
            return
        self._set_idle(False)
        try:
            self._parser.feed_data(data)  # calls the on_* methods below
        except httptools.HttpParserUpgrade as upgrade:
            self._early = data[upgrade.args[0] :]
            self._enter(Phase.HELD)
        except httptools.HttpParserError as err:
            refused = err.__context__  # what a callback raised, if one did
            if not isinstance(refused, HttpError):
                if refused is not None:
                    traceback.print_exception(refused, file=sys.stderr)  # a bug of ours
                refused = HttpError(400, f"bad request: {err}")
            self._queue.put_nowait(refused)
            self._enter(Phase.HELD)
        self._update_reading()

    def eof_received(self) -> bool:
        """Half-close: answer what was asked, then close (True keeps the transport)."""
        if self._phase is not Phase.REQUESTS or self._req is not None or not self._owed():
            return False
        self._enter(Phase.HELD)
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # Parser callbacks, called from feed_data

    def on_message_begin(self) -> None:
        self._req = Request()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        assert self._req is not None
        self._req.target += url  # a target split over two reads comes in two calls
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._req is not None
        self._req.headers.append((name, value))
        self._count_head(len(name) + len(value))

    def on_headers_complete(self) -> None:
        req, parser = self._req, self._parser
        assert req is not None
        req.method, req.version = parser.get_method(), parser.get_http_version()
        if req.version not in ("1.1", "1.0"):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        if req.header(b"transfer-encoding").lower() not in (b"", b"chunked"):
            # llhttp takes "identity, chunked"; a proxy in front might frame it otherwise.
            raise HttpError(400, "only a plain chunked Transfer-Encoding is understood")
        req.upgrade = parser.should_upgrade()
        req.keep_alive = parser.should_keep_alive() and not req.upgrade
        path, _, query = req.target.partition(b"?")
        if not path.startswith(b"/") and path != b"*":  # absolute-form, or CONNECT's authority
            try:
                path = httptools.parse_url(path).path or b"/"
            except httptools.HttpParserInvalidURLError:
                raise HttpError(400, "the target is neither a path nor a URL") from None
        req.path = path
        if query:
            req.params = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        if path == b"/upload":
            req.hasher = hashlib.sha256()
        expect = req.header(b"expect").lower() == b"100-continue"
        if expect and req.version == "1.1" and not self._owed():  # never ahead of an answer
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        assert self._req is not None
        self._req.body_bytes += len(body)
        if self._req.hasher is not None:
            self._req.hasher.update(body)

    def on_message_complete(self) -> None:
        assert self._req is not None
        self._queue.put_nowait(self._req)
        self._req = None

    # Connection state

    def shutdown(self) -> None:
        """Close now if idle or a tunnel; otherwise the answer in progress closes it."""
        if self._phase is Phase.TUNNEL or (self._req is None and not self._owed()):
            self._close()

    def abort(self) -> None:
        """Close at once, dropping unsent bytes."""
        self._transport.abort()

    def _enter(self, phase: Phase) -> None:
        if phase not in NEXT[self._phase]:
            raise RuntimeError(f"a connection cannot go from {self._phase} to {phase}")
        self._phase = phase
        self._update_reading()

    def _owed(self) -> bool:
        """Whether answers to complete requests are still to be written."""
        return not self._queue.empty() or self._answering is not None

    def _close(self) -> None:
        if self._phase is not Phase.CLOSED:
            self._enter(Phase.CLOSED)
            self._transport.close()

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD:
            raise HttpError(431, "request head larger than 64 KiB")

    def _update_reading(self) -> None:
        if self._phase is Phase.CLOSED:
            return
        pause = self._phase is Phase.HELD or self._write_paused
        pause = pause or self._queue.qsize() > MAX_QUEUED
        if pause != self._read_paused:
            self._read_paused = pause
            (self._transport.pause_reading if pause else self._transport.resume_reading)()

    async def _drain(self) -> None:
        if self._write_paused:
            self._drained = self._loop.create_future()
            await self._drained

    def _set_idle(self, idle: bool) -> None:
        """Start (or stop) the keep-alive clock."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if idle and self._worker.keepalive_timeout > 0:
            self._idle_timer = self._loop.call_later(self._worker.keepalive_timeout, self._close)

    # Answers

    async def _respond(self) -> None:
        """Answer queued requests in order, until the connection closes or becomes a tunnel."""
        while self._phase in (Phase.REQUESTS, Phase.HELD):
            if self._phase is Phase.HELD and self._queue.empty():
                self._close()  # nothing more will be asked
                return
            self._set_idle(self._req is None and self._queue.empty())
            item = self._answering = await self._queue.get()
            self._update_reading()
            try:
                await self._drain()  # don't answer a client that isn't reading
                if isinstance(item, HttpError):
                    raise item
                await self._answer(item)
            except HttpError as err:
                self._refuse(err)
            except Exception:
                traceback.print_exc(file=sys.stderr)
                self._transport.abort()  # the answer may be half written: cut it
                return
            finally:
                self._answering = None

    async def _answer(self, req: Request) -> None:
        path, params = req.path, req.params
        if delay := _number(params, "delay", 0, 3600, float):
            await asyncio.sleep(delay)
        if req.upgrade and path == b"/ws" and req.method == b"GET":
            self._switch(req)
        elif path == b"/ready":
            self._send(req, 200, b"ok")
        elif path == b"/headers":
            self._send(req, 200, _describe(req), b"application/json")
        elif path == b"/upload":
            assert req.hasher is not None  # set with the path
            digest = {"sha256": req.hasher.hexdigest(), "bytes": req.body_bytes}
            self._send(req, 200, json.dumps(digest).encode(), b"application/json")
        elif path == b"/grow":
            mb = _number(params, "mb", 1, 4096, int)
            _HOARD.append(bytearray(b"x") * (mb << 20))  # written, so it is resident
            self._send(req, 200, b"grew %d MiB\n" % mb)
        elif path == b"/crash":
            os._exit(1)  # die mid-request without answering, as a crashing app would
        elif "size" in params:
            status = _number(params, "status", 200, 599, int)
            await self._stream(req, status, _number(params, "size", 0, 1 << 50, int))
        else:
            self._send(req, _number(params, "status", 200, 599, int), self._worker.body)

    def _head(self, req: Request, status: int, length: int, ctype: bytes) -> bytes:
        req.keep_alive = req.keep_alive and not self._worker.stopping
        if not req.keep_alive:
            connection = b"Connection: close\r\n"
        else:
            connection = b"Connection: keep-alive\r\n" if req.version == "1.0" else b""
        framing = b"Content-Type: %s\r\nContent-Length: %d\r\n" % (ctype, length)
        return b"HTTP/1.1 %d %s\r\nDate: %s\r\n%s%s%s\r\n" % (
            status,
            _REASONS.get(status, b"Unknown"),
            self._worker.date(),
            b"" if status in (204, 304) else framing,
            self._worker.identity,
            connection,
        )

    def _send(self, req: Request, status: int, body: bytes, ctype: bytes = b"text/plain") -> None:
        head = self._head(req, status, len(body), ctype)
        no_body = req.method == b"HEAD" or status in (204, 304)
        self._transport.write(head if no_body else head + body)
        if not req.keep_alive:
            self._close()

    async def _stream(self, req: Request, status: int, size: int) -> None:
        self._transport.write(self._head(req, status, size, b"text/plain"))
        if req.method == b"HEAD" or status in (204, 304):
            size = 0
        while size > 0:
            piece = _FILL[:size]  # all of _FILL, not a copy, while size >= PIECE
            self._transport.write(piece)
            size -= len(piece)
            await self._drain()
        if not req.keep_alive:
            self._close()

    def _refuse(self, err: HttpError) -> None:
        body = str(err).encode() + b"\n"
        self._send(Request(), err.status, body)  # a Request() is not kept alive

    def _switch(self, req: Request) -> None:
        """Answer 101, then echo bytes (the first may have come with the head)."""
        head = b"HTTP/1.1 101 Switching Protocols\r\n%sUpgrade: %s\r\nConnection: Upgrade\r\n"
        head %= (self._worker.identity, req.header(b"upgrade"))
        if key := req.header(b"sec-websocket-key"):
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            head += b"Sec-WebSocket-Accept: %s\r\n" % accept
        self._transport.write(head + b"\r\n" + self._early)
        self._early = b""
        self._enter(Phase.TUNNEL)


def _describe(req: Request) -> bytes:
    """The ``/headers`` JSON."""
    fields = [[n.decode("latin-1"), v.decode("latin-1").strip(" \t")] for n, v in req.headers]
    target, version = req.target.decode("latin-1"), f"HTTP/{req.version}"
    body = {"method": req.method.decode(), "target": target, "version": version}
    return json.dumps(body | {"headers": fields, "body_bytes": req.body_bytes}).encode()


def _number(params: dict[str, str], name: str, low: float, high: float, kind: type) -> Any:
    """Query parameter `name` as `kind` in low..high (low when absent); 400 when not."""
    raw = params.get(name)
    try:
        value = low if raw is None else kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:  # also NaN
        raise HttpError(400, f"bad {name}={raw!r}: expected {low}..{high}")
    return value

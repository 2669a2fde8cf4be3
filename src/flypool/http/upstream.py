"""The connection from the daemon to one worker: relays one answer at a time.

The answer is parsed with httptools only to find where it ends; its bytes
are passed to the client unchanged when possible (one write per read). The
head is rebuilt only when the worker's connection headers must not reach the
client (a worker that closes after every answer must not make the client
close too).

The connection's life is :class:`~flypool.http.state.UpstreamState`; every
change goes through :func:`~flypool.http.state.upstream_next`. When the
connection fails, it reports *how* (:class:`~flypool.http.retry.Failure`,
read from the socket: EPIPE, ECONNRESET or a clean close, with or without
answer bytes) to its owner, the router, which applies the retry policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NoReturn, Protocol, cast

import httptools

from flypool.http.parsing import LAST_CHUNK, build_response_head, chunk
from flypool.http.retry import Failure
from flypool.http.state import UPSTREAM_TABLE, UpstreamEvent, UpstreamState, upstream_next
from flypool.pool.worker import WorkerState

if TYPE_CHECKING:
    from flypool.http.request import Request
    from flypool.pool.worker import Worker

_READY = WorkerState.READY


def _no_write(data: bytes) -> None:
    """``transport_write`` without a transport (never called: callers check first)."""


def _gone() -> bool:
    """``transport_closing`` without a transport."""
    return True


# Enum members as module constants (a class attribute read of an enum costs ~20x more).
U_CLOSED: Final = UpstreamState.CLOSED
U_DONE: Final = UpstreamState.DONE
U_EARLY: Final = UpstreamState.EARLY
U_IDLE: Final = UpstreamState.IDLE
U_RECEIVING: Final = UpstreamState.RECEIVING
U_SENDING: Final = UpstreamState.SENDING
U_TUNNEL: Final = UpstreamState.TUNNEL
U_WAITING: Final = UpstreamState.WAITING
UE_ABORT: Final = UpstreamEvent.ABORT
UE_ANSWER: Final = UpstreamEvent.ANSWER
UE_ATTACH: Final = UpstreamEvent.ATTACH
UE_END: Final = UpstreamEvent.END
UE_END_CLOSE: Final = UpstreamEvent.END_CLOSE
UE_LOST: Final = UpstreamEvent.LOST
UE_PARK: Final = UpstreamEvent.PARK
UE_SENT: Final = UpstreamEvent.SENT
UE_UPGRADE: Final = UpstreamEvent.UPGRADE
_REWRITE = 1  # the worker sent connection headers that are not for the client
_CHUNKED = 2
_LENGTH = 4


class Counters(Protocol):
    """The router's status counters."""

    by_class: list[int]


class Owner(Protocol):
    """What a worker connection reports to (``router.Router``)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop."""

    @property
    def stats(self) -> Counters:
        """Status counters."""

    def answer_end(self, req: Request, up: UpstreamConnection, status: int) -> None:
        """The answer to ``req`` is complete."""

    def upstream_failed(
        self, req: Request, up: UpstreamConnection, failure: Failure, why: str
    ) -> None:
        """The connection broke before the answer ended."""

    def upgraded(self, req: Request, up: UpstreamConnection, rest: bytes) -> None:
        """The worker switched protocols (101)."""

    def tunnel_closed(self, req: Request, up: UpstreamConnection) -> None:
        """The worker's end of a tunnel closed."""

    def reask(self, req: Request, up: UpstreamConnection, status: int) -> None:
        """A canary answered 5xx: ask another worker instead."""

    def canary_reaskable(self, req: Request) -> bool:
        """Whether a canary's 5xx to ``req`` may be asked again elsewhere."""

    def idle_lost(self, up: UpstreamConnection) -> None:
        """A connection with no request attached closed."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a worker."""

    __slots__ = (
        "_data",
        "_flags",
        "_headers",
        "_in_head",
        "_interim",
        "_out",
        "_raw_ok",
        "_reask",
        "_reason",
        "_verbatim",
        "complete",
        "idle_since",
        "must_close",
        "owner",
        "parser",
        "read_paused",
        "req",
        "reused",
        "sink",
        "state",
        "status",
        "transport",
        "transport_closing",
        "transport_write",
        "worker",
    )

    def __init__(self, owner: Owner, worker: Worker) -> None:
        self.owner = owner
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        # The transport's write() and is_closing(), bound once: called for
        # every request, and a method call on uvloop's transport looks the
        # method up each time (~300 instructions).
        self.transport_write: Callable[[bytes], object] = _no_write
        self.transport_closing: Callable[[], bool] = _gone
        self.parser = httptools.HttpResponseParser(self)
        self.state = U_IDLE
        self.req: Request | None = None
        # The client's transport while the answer goes to a client (None for
        # a request whose client left: the answer is read and dropped).
        self.sink: asyncio.Transport | None = None
        self.reused = False
        self.idle_since = 0.0
        self.read_paused = False
        # Per-answer state.
        self._headers: list[tuple[bytes, bytes]] = []
        self._flags = 0
        self._reason = b""
        self._interim = False
        self._in_head = False
        self._reask = False
        # Forwarding this answer's bytes unchanged (see on_headers_complete).
        self._verbatim = False
        self._out: list[bytes] = []
        self._data = b""
        self._raw_ok = False
        self.complete = False
        self.must_close = False
        self.status = 0

    def _illegal(self, event: UpstreamEvent) -> NoReturn:
        upstream_next(self.state, event)  # raises IllegalTransition
        raise AssertionError(event)

    def _go(self, event: UpstreamEvent) -> None:
        # Hot call sites do the same lookup inline (a call costs more than it).
        state = UPSTREAM_TABLE[self.state][event]
        if state is None:
            self._illegal(event)
        self.state = state

    # -- used by the router and the request ------------------------------------------------------

    def attach(self, req: Request, sink: asyncio.Transport | None, *, reused: bool) -> None:
        """Start relaying ``req`` on this connection."""
        nxt = UPSTREAM_TABLE[self.state][UE_ATTACH]
        if nxt is None:
            self._illegal(UE_ATTACH)
        self.state = nxt
        self.req = req
        self.sink = sink
        self.reused = reused
        self.complete = False
        self.must_close = False
        self.status = 0
        self._reask = False
        req.upstream = self

    def request_sent(self) -> None:
        """The last request byte was written: the worker has it all."""
        if self.state is U_SENDING or self.state is U_EARLY:
            nxt = UPSTREAM_TABLE[self.state][UE_SENT]
            if nxt is None:
                self._illegal(UE_SENT)
            self.state = nxt
            req = self.req
            if req is not None:
                # max_request_time counts from here (SPEC §3).
                req.clock_at = self.owner.loop.time()

    @property
    def answering(self) -> bool:
        """Answer bytes have arrived for the attached request."""
        return self.state is U_RECEIVING or self.state is U_EARLY or self.state is U_TUNNEL

    @property
    def request_complete(self) -> bool:
        """Every request byte was written."""
        return self.state is U_WAITING or self.state is U_RECEIVING or self.state is U_DONE

    def park(self) -> None:
        """Keep this connection for the worker's next request (it is DONE)."""
        self.req = None
        self.sink = None
        nxt = UPSTREAM_TABLE[self.state][UE_PARK]
        if nxt is None:
            self._illegal(UE_PARK)
        self.state = nxt
        w = self.worker
        transport = self.transport
        if transport is None or self.transport_closing() or w.state is not _READY:
            self.close()
            return
        self.idle_since = self.owner.loop.time()
        if self.read_paused:
            # Paused for a slow client of the previous request.
            self.read_paused = False
            transport.resume_reading()
        w.idle_conns.append(self)

    def keep(self) -> None:
        """A new connection no request needs any more: into the worker's pool."""
        w = self.worker
        transport = self.transport
        if (
            self.state is not U_IDLE
            or transport is None
            or transport.is_closing()
            or w.state is not _READY
        ):
            self.close()
            return
        self.idle_since = self.owner.loop.time()
        w.idle_conns.append(self)

    def close(self) -> None:
        """Close after pending writes; the connection is not reused."""
        self.req = None
        self.sink = None
        if self.state is not U_CLOSED:
            self._go(UE_ABORT)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (the request was cut short)."""
        self.req = None
        self.sink = None
        if self.state is not U_CLOSED:
            self._go(UE_ABORT)
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        """The client is slow: stop reading the answer."""
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the answer again."""
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        t = self.transport = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=65536)
        self.transport_write = t.write
        self.transport_closing = t.is_closing

    def pause_writing(self) -> None:
        req = self.req
        if req is not None:
            req.upstream_write_paused(True)

    def resume_writing(self) -> None:
        req = self.req
        if req is not None:
            req.upstream_write_paused(False)

    def data_received(self, data: bytes) -> None:
        req = self.req
        if req is None:
            # A worker talking on an idle connection is broken; don't reuse it.
            self.close()
            return
        state = self.state
        if state is U_TUNNEL:
            if self.sink is not None:
                self.sink.write(data)
            return
        if state is U_SENDING or state is U_WAITING:
            nxt = UPSTREAM_TABLE[self.state][UE_ANSWER]
            if nxt is None:
                self._illegal(UE_ANSWER)
            self.state = nxt
        self._data = data
        # Raw bytes are usable only when no head is half-read from an earlier read.
        self._raw_ok = not self._in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._flush()
            self._go(UE_UPGRADE)
            self.owner.upgraded(req, self, data[int(exc.args[0]) :])
            return
        except httptools.HttpParserError:
            self._out.clear()
            self.must_close = True
            self.owner.upstream_failed(req, self, Failure.BROKEN, "invalid response from worker")
            return
        if self._reask:
            self._out.clear()
            self.owner.reask(req, self, self.status)
            return
        if self._verbatim:
            # Nothing to change in this answer: the worker's bytes go out as
            # they came, one write, no copies.
            if self.sink is not None:
                self.sink.write(data)
            if self.complete:
                self._verbatim = False
        else:
            self._flush()
        if self.complete:
            self._end(req)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.transport_write = _no_write
        self.transport_closing = _gone
        state = self.state
        req = self.req
        self.req = None
        self.sink = None
        if state is U_CLOSED:
            return
        self._go(UE_LOST)
        if req is None:
            if state is U_IDLE:
                # Pooled: the worker's idle timeout, or its death. (One we
                # closed is MUST_CLOSE: nothing to tell.)
                self.owner.idle_lost(self)
            return
        if state is U_TUNNEL:
            self.owner.tunnel_closed(req, self)
        elif state is U_SENDING or state is U_WAITING:
            # No answer byte: what the socket says is what the worker saw.
            # EPIPE at the first write (or a closing socket) means nothing
            # was delivered; ECONNRESET means bytes were left unread; a clean
            # close means the worker read the request and then hung up.
            if not req.sent_any:
                failure = Failure.NOT_SENT
            elif exc is not None:
                failure = Failure.UNREAD
            else:
                failure = Failure.SILENT
            self.owner.upstream_failed(req, self, failure, "worker closed the connection")
        elif self.status and not self.complete and not (self._flags & (_CHUNKED | _LENGTH)):
            # An answer delimited by the end of the connection: it is complete.
            self.must_close = True
            self.owner.answer_end(req, self, self.status)
        else:
            self.owner.upstream_failed(req, self, Failure.BROKEN, "worker closed the connection")

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._verbatim = False
        self._headers = []
        self._flags = 0
        self._reason = b""
        self.status = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        n = len(name)
        if n == 14:
            if name == b"Content-Length" or name.lower() == b"content-length":
                self._flags |= _LENGTH
        elif n == 10 or n == 16:
            low = name.lower()
            if low == b"connection" or low == b"keep-alive" or low == b"proxy-connection":
                self._flags |= _REWRITE
        elif n == 17 and name.lower() == b"transfer-encoding":
            self._flags |= _CHUNKED

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        self._in_head = False
        parser = self.parser
        status = parser.get_status_code()
        flags = self._flags
        if status < 200:
            if status == 101:
                self.status = status
                self._emit_head(req, raw=True, connection=b"")
                return
            self._interim = True
            if req.http10:
                # An HTTP/1.0 client does not know interim answers (RFC 9110 §15.2).
                self._raw_ok = False
            else:
                self._emit_head(req, raw=not flags & _REWRITE, connection=b"")
            return
        self.status = status
        if self.worker.canary and status >= 500 and self.owner.canary_reaskable(req):
            # Not a byte of it goes out: another worker answers instead.
            self._reask = True
            return
        self.owner.stats.by_class[status // 100 if status < 600 else 5] += 1
        bodiless = req.head_request or status == 204 or status == 304
        if not bodiless and not flags & (_CHUNKED | _LENGTH):
            # Ends when the worker closes: the client can't reuse its connection.
            req.keep_alive = False
        if not parser.should_keep_alive():
            self.must_close = True
        if req.keep_alive:
            conn_value = b"keep-alive" if req.http10 else b""
            raw = not flags & _REWRITE and not req.http10
        else:
            conn_value = b"close"
            raw = False
        if req.head_request:
            # llhttp would wait for the body a HEAD answer announces but never
            # sends: the answer ends here (the parser is replaced at the end).
            self.complete = True
            self._emit_head(req, raw=raw, connection=conn_value)
        elif raw and self._raw_ok and not self._out and self._data.startswith(b"HTTP/"):
            # The whole read starts with this head and nothing in the answer
            # needs changing: forward the worker's bytes verbatim.
            self._verbatim = True
            self._raw_ok = False
        else:
            self._emit_head(req, raw=raw, connection=conn_value)
        if self.sink is not None:
            req.conn.answer_begins(req)

    def _emit_head(self, req: Request, *, raw: bool, connection: bytes) -> None:
        data = self._data
        if raw and self._raw_ok:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                self._out.append(data[: end + 4])
                self._raw_ok = False
                return
        self._raw_ok = False
        # From the status line when it is plain: get_http_version() formats a str.
        if data.startswith(b"HTTP/1.1 "):
            version = b"1.1"
        elif data.startswith(b"HTTP/1.0 "):
            version = b"1.0"
        else:
            version = b"1.1" if self.parser.get_http_version() == "1.1" else b"1.0"
        self._out.append(
            build_response_head(
                version, self.parser.get_status_code(), self._reason, self._headers, connection
            )
        )

    def on_body(self, body: bytes) -> None:
        if self._verbatim or self._reask:
            return
        req = self.req
        if req is not None and req.head_request:
            # A body after a HEAD answer: the worker is confused; don't reuse.
            self.must_close = True
            return
        if self._flags & _CHUNKED:
            self._out.append(chunk(body))
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._raw_ok = False
            return
        if self._reask:
            return
        if self._flags & _CHUNKED and not self._verbatim:
            self._out.append(LAST_CHUNK)
        self.complete = True

    # -- helpers -------------------------------------------------------------------------------

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        sink = self.sink
        if sink is not None:
            if len(out) == 1:
                sink.write(out[0])
            else:
                sink.writelines(out)
        out.clear()

    def _end(self, req: Request) -> None:
        self.complete = False
        event = UE_END_CLOSE if self.must_close else UE_END
        nxt = UPSTREAM_TABLE[self.state][event]
        if nxt is None:
            self._illegal(event)
        self.state = nxt
        if req.head_request:
            # The parser still expects the announced body: a fresh one for the next answer.
            self.parser = httptools.HttpResponseParser(self)
        self.owner.answer_end(req, self, self.status)

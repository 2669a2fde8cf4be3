"""The front side of the proxy: one protocol object per client connection.

The connection's life is :class:`~flypool.http.state.ClientState`; every
change goes through :func:`~flypool.http.state.client_next` (:meth:`_go`),
and what a state implies (its timer, whether client bytes are parsed in it)
is read from the tables in :mod:`flypool.http.state`. This class moves
bytes, arms timers and carries out what the states call for; each request's
bytes and flow control belong to its :class:`~flypool.http.request.Request`.

Framing is found here, not guessed: the end of a head is the first CRLFCRLF
after the request line (llhttp is strict about line ends, so it agrees),
llhttp is fed exactly the head and validates it, Content-Length bodies are
counted and chunked bodies decoded (:mod:`flypool.http.framing`). So the
exact bytes of every head are at hand (forwarded unchanged unless a header
must go), and the bytes after a request stay unparsed, in order, until its
answer is complete: pipelined requests wait their turn as bytes.
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

import httptools

from flypool.http.framing import ChunkedDecoder, ChunkedError
from flypool.http.parsing import (
    FRAMING_ALIASES,
    HOP_BY_HOP,
    LAST_CHUNK,
    build_request_head,
    chunk,
    connection_tokens,
    error_response,
    simple_response,
    target_path,
)
from flypool.http.proxy_header import NEED_MORE, ProxyHeaderError, parse_proxy_header
from flypool.http.request import (
    HOLD_LIMIT,
    PAUSE_BUFFER,
    PAUSE_PIPELINE,
    PAUSE_UPSTREAM,
    Request,
    ServerState,
)
from flypool.http.router import Router
from flypool.http.state import (
    CLIENT_ANSWERING,
    CLIENT_READS,
    CLIENT_TIMER,
    ClientEvent,
    ClientState,
    Timer,
    client_next,
)
from flypool.pool.worker import WorkerState

_S = ClientState
_E = ClientEvent

MAX_HEADERS: Final = 100
# After an answer that ends the connection, or while dropping a body nobody
# will read, the client gets this long to finish sending (nginx: lingering_timeout).
LINGER_TIMEOUT: Final = 5.0
# Bytes of pipelined requests kept while an answer is in progress.
PIPELINE_LIMIT: Final = 65536


class _HeadTooLarge(Exception):
    pass


class ClientConnection(asyncio.Protocol):
    """An HTTP/1.1 client connection on a front listener."""

    __slots__ = (
        "_chunked",
        "_conn_values",
        "_consuming",
        "_decoder",
        "_expect",
        "_head_len",
        "_headers",
        "_held",
        "_hosts",
        "_keep_alive",
        "_left",
        "_length",
        "_method",
        "_parts",
        "_pieces",
        "_rewrite",
        "_sync",
        "_underscore",
        "_upgrade",
        "_url",
        "_version",
        "_xff_index",
        "buffer",
        "client_addr",
        "cycle",
        "deadline",
        "eof",
        "head_complete",
        "loop",
        "parser",
        "pause_reasons",
        "router",
        "send_deadline",
        "send_mark",
        "server",
        "state",
        "tcp",
        "transport",
        "xff_tail",
    )

    def __init__(
        self,
        router: Router,
        server: ServerState,
        loop: asyncio.AbstractEventLoop,
        *,
        proxy_protocol: bool = False,
    ) -> None:
        # Shared state.
        self.router = router
        self.server = server
        self.loop = loop
        # Per-connection state.
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # TCP listeners of a proxy_protocol app expect a PROXY header first
        # (settled in connection_made, once the socket's family is known).
        self.state = _S.PROXY if proxy_protocol else _S.IDLE
        self.deadline = 0.0
        # While the client's socket buffer is full: when it counts as silent.
        self.send_deadline = 0.0
        self.send_mark = 0
        self.pause_reasons = 0
        # Client bytes not parsed yet: pipelined requests wait here in order.
        self.buffer = b""
        # The client shut its write side: answer what is complete, then close.
        self.eof = False
        # TCP listeners append the client's address to X-Forwarded-For.
        self.tcp = False
        self.client_addr = b""
        self.xff_tail = b""
        self.cycle: Request | None = None
        self._consuming = False
        # Per-request (parsing) state.
        self._parts: list[bytes] = []
        self._head_len = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._hosts = 0
        self._length = b""
        self._chunked = False
        self._expect = False
        self._conn_values: list[bytes] | None = None
        self._rewrite = False
        self._underscore = False
        self._xff_index = -1
        self.head_complete = False
        self._keep_alive = True
        self._upgrade = False
        self._method = b""
        self._version = ""
        self._left = 0
        self._decoder: ChunkedDecoder | None = None
        self._pieces: list[bytes] = []
        self._held = False
        # llhttp is fed the body bytes too (it only counts them), to stay in step.
        self._sync = True

    # -- states and timers ------------------------------------------------------------------------

    def _go(self, event: ClientEvent) -> ClientState:
        """Apply ``event`` and arm the new state's timer."""
        state = client_next(self.state, event)
        self.state = state
        timer = CLIENT_TIMER[state]
        if timer is not Timer.NONE:
            server = self.server
            if timer is Timer.KEEPALIVE:
                timeout = server.keepalive_timeout
            elif timer is Timer.HEADER:
                timeout = server.header_timeout
            elif timer is Timer.BODY:
                timeout = server.body_timeout
            else:
                timeout = LINGER_TIMEOUT
            self.deadline = self.loop.time() + timeout
        return state

    @property
    def frozen(self) -> bool:
        """Handed over to the next image: no longer read (USR2)."""
        return self.state is _S.FROZEN

    @property
    def tunnel(self) -> bool:
        """Relaying a tunnel (after a 101)."""
        return self.state is _S.TUNNEL

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=65536)
        self.server.connections.add(self)
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.tcp = True
            self._set_client(str(peer[0]))
        elif self.state is _S.PROXY:
            # Unix listeners pass the web server's headers unchanged (SPEC §9).
            self.state = _S.IDLE
        self.deadline = self.loop.time() + (
            self.server.header_timeout if self.state is _S.PROXY else self.server.keepalive_timeout
        )

    def _set_client(self, host: str) -> None:
        self.client_addr = host.encode("ascii", "replace")
        self.xff_tail = b"X-Forwarded-For: " + self.client_addr + b"\r\n\r\n"

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self.state is not _S.CLOSED:
            self._go(_E.LOST)
        req = self.cycle
        self.cycle = None
        if req is not None and not req.done:
            self.router.abandon(req)

    def eof_received(self) -> bool | None:
        self.eof = True
        state = self.state
        if state is _S.CLOSED:
            return None
        if state is _S.WAITING or state is _S.SENDING:
            # A client may send its requests and shut its write side: every
            # request already received is answered before the close.
            return True
        if state is _S.EARLY:
            req = self.cycle
            if req is not None:
                req.keep_alive = False
            self._go(_E.EOF)
            return True
        req = self.cycle
        self.cycle = None
        self._go(_E.EOF)
        if req is not None and not req.done:
            # An unfinished body (or a tunnel) can't go on without the client.
            self.router.abandon(req)
        return None

    def pause_writing(self) -> None:
        # The client reads slower than the answer comes: stop reading the worker.
        transport = self.transport
        self.send_deadline = self.loop.time() + self.server.send_timeout
        self.send_mark = transport.get_write_buffer_size() if transport is not None else 0
        req = self.cycle
        if req is not None:
            req.client_write_paused(True)

    def resume_writing(self) -> None:
        self.send_deadline = 0.0
        req = self.cycle
        if req is not None:
            req.client_write_paused(False)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is _S.TUNNEL:
            req = self.cycle
            up = req.upstream if req is not None else None
            if up is not None and up.transport is not None:
                up.transport.write(data)
            return
        if not CLIENT_READS[state]:
            if state is not _S.CLOSED:
                # Pipelined: parsed once the answer in progress is complete.
                self.buffer += data
                if len(self.buffer) > PIPELINE_LIMIT:
                    self.pause(PAUSE_PIPELINE)
            return
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if CLIENT_TIMER[state] is Timer.BODY:
            # The body timeout is between two reads of body bytes.
            self.deadline = self.loop.time() + self.server.body_timeout
        self._consume(data)

    # -- parsing ----------------------------------------------------------------------------------

    def _consume(self, data: bytes) -> None:
        """Parse ``data`` as far as the current state allows; keep the rest in order."""
        self._consuming = True
        try:
            while data:
                state = self.state
                if state is _S.HEAD or state is _S.IDLE:
                    data = self._read_head(data)
                elif state is _S.BODY or state is _S.EARLY or state is _S.DISCARD:
                    data = self._read_body(data)
                elif state is _S.PROXY:
                    data = self._read_proxy(data)
                elif state is _S.CLOSING or state is _S.CLOSED:
                    return  # read and dropped (lingering close)
                elif state is _S.TUNNEL:
                    req = self.cycle
                    if req is not None:
                        req.body(data)
                    break
                else:
                    # WAITING, SENDING, FROZEN: the rest waits for its turn.
                    self.buffer = data
                    if len(data) > PIPELINE_LIMIT:
                        self.pause(PAUSE_PIPELINE)
                    break
        finally:
            self._consuming = False
        req = self.cycle
        if req is not None and req.upstream is not None and req.out:
            # Body bytes of this read go to the worker in one write.
            req.flush()
        if self.buffer == b"" and self.state in _WAITS_FOR_INPUT:
            if self.eof:
                self._input_ended()
            elif self.state is _S.IDLE and self.server.handing_over:
                self.freeze()

    def _read_proxy(self, data: bytes) -> bytes:
        try:
            result = parse_proxy_header(data)
        except ProxyHeaderError:
            # Not a PROXY header (or a malformed one): the connection never
            # reaches a worker, and gets no answer (it is not HTTP yet).
            self._cut()
            return b""
        if result is NEED_MORE:
            self.buffer = data
            return b""
        used, source = result
        if source is not None:
            self._set_client(source[0])
        self._go(_E.PROXY_DONE)
        return data[used:]

    def _read_head(self, data: bytes) -> bytes:
        if self.state is _S.IDLE:
            first = data[0]
            if first == 13 or first == 10:
                # Empty lines before a request line are ignored (RFC 9112 §2.2).
                data = data.lstrip(b"\r\n")
                if not data:
                    return b""
            self._begin_head()
        if self._head_len:
            tail = self._parts[-1][-3:]
            at = (tail + data).find(b"\r\n\r\n")
            end = at + 4 - len(tail) if at >= 0 else -1
        else:
            at = data.find(b"\r\n\r\n")
            end = at + 4 if at >= 0 else -1
        limit = self.server.max_header_size
        if end < 0:
            self._head_len += len(data)
            if self._head_len > limit:
                self._error(431)
                return b""
            self._parts.append(data)
            # Fed now so that a malformed head is refused before its end.
            self._feed_head(data)
            return b""
        if self._head_len + end > limit:
            self._error(431)
            return b""
        if end == len(data):
            piece, rest = data, b""
        else:
            piece, rest = data[:end], data[end:]
        if not self._feed_head(piece):
            return b""
        if not self.head_complete:
            self._error(400)
            return b""
        head = b"".join(self._parts) + piece if self._parts else piece
        self._parts = []
        self._head_len = 0
        return self._head_done(head, rest)

    def _begin_head(self) -> None:
        self._go(_E.HEAD_START)
        self._url = b""
        self._headers = []
        self._hosts = 0
        self._length = b""
        self._chunked = False
        self._expect = False
        self._conn_values = None
        self._rewrite = False
        self._underscore = False
        self._xff_index = -1
        self.head_complete = False

    def _feed_head(self, data: bytes) -> bool:
        """Feed head bytes to llhttp; False (and the error answered) if it refuses them."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # checked with should_upgrade() once the head is complete
        except httptools.HttpParserCallbackError as exc:
            self._error(431 if isinstance(exc.__context__, _HeadTooLarge) else 400)
            return False
        except httptools.HttpParserError:
            self._error(400)
            return False
        return True

    # Parser callbacks: collect what the head says; decisions come after it.

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        n = len(name)
        if n == 4:
            if name.lower() == b"host":
                self._hosts += 1
        elif n == 14:
            if name.lower() == b"content-length":
                self._length = value
        elif n == 17:
            if name.lower() == b"transfer-encoding":
                self._chunked = True
        elif n == 10:
            low = name.lower()
            if low == b"connection":
                if self._conn_values is None:
                    self._conn_values = []
                self._conn_values.append(value)
                self._rewrite = True
            elif low == b"keep-alive":
                self._rewrite = True
        elif n == 2 or n == 7 or n == 16:
            if name.lower() in HOP_BY_HOP:
                self._rewrite = True
        elif n == 15:
            if name.lower() == b"x-forwarded-for":
                self._xff_index = len(headers) - 1
        elif n == 6 and name.lower() == b"expect":
            self._expect = True
        if b"_" in name:
            self._underscore = True
            self._rewrite = True
        if len(headers) > MAX_HEADERS:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        # Read here: llhttp resets these once the message (a head without a
        # body) is complete, within the same feed.
        parser = self.parser
        self._keep_alive = parser.should_keep_alive()
        self._upgrade = parser.should_upgrade()
        self._method = parser.get_method()
        self._version = parser.get_http_version()
        self.head_complete = True

    def _head_done(self, head: bytes, rest: bytes) -> bytes:
        """A complete, valid head: check the rules llhttp doesn't, and start the request."""
        method = self._method
        version = self._version
        if version != "1.1" and version != "1.0":
            self._error(505)
            return b""
        http10 = version == "1.0"
        url = self._url
        # RFC 9112 §6.1: chunked framing on HTTP/1.0 is faulty. RFC 9110 §7.2:
        # one Host. RFC 9112 §3.2.4: asterisk-form is for OPTIONS only.
        if (
            (self._chunked and http10)
            or self._hosts > 1
            or (url == b"*" and method != b"OPTIONS")
            or (self._underscore and self.server.underscores == "refuse")
        ):
            self._error(400)
            return b""
        length = int(self._length) if self._length else 0
        has_body = self._chunked or length > 0
        upgrade = self._upgrade
        # After an upgrade head llhttp takes what follows for tunnel bytes; a
        # body is framed here instead, and the connection ends with the answer.
        self._sync = not (upgrade and has_body)
        req = Request(self, self._forward_head(head, method, url, version, upgrade), method, url)
        req.started_at = self.loop.time()
        req.http10 = http10
        req.keep_alive = self._keep_alive and not upgrade and not self.server.shutting_down
        req.upgrade = upgrade and not has_body
        req.chunked = self._chunked
        req.expect = self._expect
        self.cycle = req
        if self._chunked:
            self._decoder = ChunkedDecoder(self.server.max_header_size)
        else:
            self._left = length
        router = self.router
        local = router.health_path and target_path(url) == router.health_path
        if has_body:
            self._go(_E.HEAD_BODY)
        else:
            req.body_done = True
            self._go(_E.HEAD_END)
        if local:
            req.local = True
            if not has_body:
                self._answer_local(req)
            return rest
        if req.upgrade:
            # Bytes after an upgrade head belong to the tunnel: they follow
            # the head to the worker.
            if rest:
                req.body(rest)
            router.dispatch(req)
            return b""
        # A body is held back from the workers until it is in (or 64 KiB of
        # it), unless the client waits for the worker's "100 Continue".
        self._held = has_body and not self._expect
        if not self._held:
            router.dispatch(req)
        return rest

    def _forward_head(
        self, head: bytes, method: bytes, url: bytes, version: str, upgrade: bool
    ) -> bytes:
        """The head as the worker gets it: the client's, unless a header must change."""
        xff = self.tcp and self._xff_index < 0
        if not self._rewrite and not (self.tcp and self._xff_index >= 0) and version == "1.1":
            return head[:-2] + self.xff_tail if xff else head
        # Hop-by-hop headers and the names Connection lists stay on this hop
        # (RFC 9110 §7.6.1); underscored names per underscores_in_headers,
        # and never an alias of a framing header (WSGI folds "_" into "-").
        drop = set(HOP_BY_HOP)
        if self._conn_values is not None:
            drop |= connection_tokens(self._conn_values)
        if upgrade:
            drop.discard(b"upgrade")
        drop_underscored = self.server.underscores != "pass"
        kept = []
        xff_index = self._xff_index if self.tcp else -1
        for i, (name, value) in enumerate(self._headers):
            low = name.lower()
            if low in drop:
                continue
            if b"_" in name and (drop_underscored or low.replace(b"_", b"-") in FRAMING_ALIASES):
                continue
            if i == xff_index:
                value = value + b", " + self.client_addr
            kept.append((name, value))
        extra = b""
        if upgrade:
            extra += b"Connection: upgrade\r\n"
        elif version == "1.0":
            extra += b"Connection: keep-alive\r\n"
        if xff:
            extra += self.xff_tail[:-2]
        return build_request_head(method, url, version.encode(), kept, extra)

    def _read_body(self, data: bytes) -> bytes:
        req = self.cycle
        keep = req is not None and self.state is not _S.DISCARD and not req.local
        decoder = self._decoder
        if decoder is not None:
            pieces = self._pieces
            try:
                used = decoder.feed(data, pieces)
            except ChunkedError:
                self._bad_body()
                return b""
            if keep:
                assert req is not None
                for piece in pieces:
                    req.body(chunk(piece))
            pieces.clear()
            rest = data[used:] if used < len(data) else b""
            if decoder.done:
                self._decoder = None
                # llhttp saw the head only: finish its message for the next one.
                self._feed_body(b"0\r\n\r\n")
                if keep:
                    assert req is not None
                    req.body(LAST_CHUNK)
                self._body_end()
            elif keep:
                self._body_progress()
            return rest
        left = self._left
        if len(data) <= left:
            piece, rest = data, b""
        else:
            piece, rest = data[:left], data[left:]
        self._left = left - len(piece)
        self._feed_body(piece)
        if keep:
            assert req is not None
            req.body(piece)
        if not self._left:
            self._body_end()
        elif keep:
            self._body_progress()
        return rest

    def _feed_body(self, data: bytes) -> None:
        # Keeps llhttp in step for the next head (it only counts these bytes).
        if self._sync:
            self.parser.feed_data(data)

    def _body_progress(self) -> None:
        req = self.cycle
        assert req is not None
        if self._held and req.out_size >= HOLD_LIMIT:
            # A large upload: stream it through a worker from here on.
            self._held = False
            self.router.dispatch(req)
        if req.upstream is None and req.out_size > HOLD_LIMIT and not req.done:
            self.pause(PAUSE_BUFFER)

    def _bad_body(self) -> None:
        req = self.cycle
        if self.state is _S.BODY and req is not None:
            self.router.fail(req, 400, "malformed chunked body")
        else:
            self._cut()

    def _body_end(self) -> None:
        state = self.state
        if state is _S.DISCARD:
            self._go(_E.BODY_END)
            self._next_request()
            return
        req = self.cycle
        assert req is not None
        req.body_done = True
        self._go(_E.BODY_END)
        if req.local:
            self._answer_local(req)
        elif self._held:
            self._held = False
            self.router.dispatch(req)
        elif req.upstream is not None:
            req.flush()

    def _answer_local(self, req: Request) -> None:
        router = self.router
        serving = not router.drained and any(w.state is _READY for w in router.workers)
        status = 200 if serving else 503
        body = b"serving\n" if serving else (b"drained\n" if router.drained else b"no worker\n")
        router.stats.by_class[status // 100] += 1
        if self.transport is not None:
            self.transport.write(
                simple_response(status, body, keep_alive=req.keep_alive, head_only=req.head_request)
            )
        req.done = True
        self._go(_E.RESPONSE)
        self.answer_ends(req)

    # -- the answer (called by the router and the worker connection) ------------------------------

    def attached(self, req: Request) -> None:
        """The router found a worker connection for ``req``: send what we have."""
        if req is not self.cycle:
            return
        self.unpause(PAUSE_BUFFER)
        req.flush()
        if self.send_deadline:
            req.client_write_paused(True)

    def answer_begins(self, req: Request) -> None:
        """The final answer head of ``req`` went out to the client."""
        if req is self.cycle and (self.state is _S.WAITING or self.state is _S.BODY):
            self._go(_E.RESPONSE)

    def answer_ends(self, req: Request) -> None:
        """The answer of ``req`` is complete: next request, discard the body, or close."""
        if req is not self.cycle:
            return
        state = self.state
        if state is _S.CLOSED:
            return
        if state is _S.WAITING or state is _S.BODY:
            # An answer with no final head we saw (a local or cut one).
            state = self._go(_E.RESPONSE)
        keep = req.keep_alive and not self.server.shutting_down
        if state is _S.EARLY and req.expect:
            # The client may still wait for a 100 Continue that will never come.
            keep = False
        if self.eof and not self.buffer and state is _S.SENDING:
            keep = False
        self.cycle = None
        self._held = False
        self.unpause(PAUSE_UPSTREAM | PAUSE_BUFFER)
        state = self._go(_E.RESPONSE_END if keep else _E.RESPONSE_CLOSE)
        if state is _S.CLOSING:
            self._linger()
        elif state is _S.IDLE:
            self._next_request()

    def _next_request(self) -> None:
        """Back in IDLE: parse what waited, freeze for a hand-over, or wait."""
        if self._consuming:
            return  # the parsing loop goes on with the rest itself
        data = self.buffer
        self.buffer = b""
        if data:
            self._consume(data)
        elif self.eof:
            self._input_ended()
            return
        elif self.server.handing_over:
            self.freeze()
            return
        if CLIENT_READS[self.state]:
            self.unpause(PAUSE_PIPELINE)

    def _input_ended(self) -> None:
        """The client sent its last byte and everything it sent is dealt with."""
        req = self.cycle
        self.cycle = None
        self._go(_E.EOF)
        if req is not None and not req.done:
            self.router.abandon(req)
        if self.transport is not None:
            self.transport.close()

    def refuse(self, req: Request, status: int, detail: str) -> None:
        """The daemon answers ``req`` itself (503, 504, 502...); see :meth:`_error`."""
        if req is not self.cycle:
            return
        self._error(status, detail)

    def fail_request(self, req: Request, status: int, detail: str) -> None:
        """End ``req`` with an error of the daemon's own (kept for the pool's use)."""
        self.router.fail(req, status, detail)

    def start_tunnel(self, req: Request, rest: bytes) -> None:
        """The worker switched protocols: relay raw bytes both ways from now on."""
        transport = self.transport
        if req is not self.cycle or transport is None:
            self.router.fail(req, 502, "client gone")
            return
        self._go(_E.UPGRADE)
        if rest:
            transport.write(rest)
        buffered = self.buffer
        self.buffer = b""
        if buffered:
            req.body(buffered)
        req.flush()
        self.unpause(PAUSE_PIPELINE | PAUSE_BUFFER)

    def tunnel_closed(self, req: Request) -> None:
        """The worker's end of a tunnel closed: close the client's."""
        if req is self.cycle:
            self.cycle = None
            self._close()

    # -- ending --------------------------------------------------------------------------------

    def _error(self, status: int, detail: str = "") -> None:
        """Answer with the daemon's own error and close; cut an answer in progress instead."""
        state = self.state
        if state is _S.CLOSED:
            return
        if state in CLIENT_ANSWERING or state is _S.DISCARD or state is _S.CLOSING:
            # Never a second status line inside an answer already going out.
            self._cut()
            return
        req = self.cycle
        if req is not None and not req.done:
            # fail() frees what the request holds and calls refuse(), which
            # comes back here with the request done.
            self.router.fail(req, status, detail)
            return
        self.cycle = None
        self.router.stats.by_class[status // 100] += 1
        if self.transport is not None:
            self.transport.write(error_response(status, detail))
        self._go(_E.ERROR)
        self._linger()

    def _linger(self) -> None:
        """CLOSING: end our side after what is written; drop what the client still sends."""
        transport = self.transport
        self.buffer = b""
        if transport is None:
            return
        if self.eof or not transport.can_write_eof():
            self._close()
            return
        # Half-close: the client reads the whole answer, and its unsent body
        # bytes are read and dropped here (never an RST that could destroy
        # the answer, as closing with unread data would send over TCP).
        transport.write_eof()
        self.unpause(PAUSE_UPSTREAM | PAUSE_BUFFER | PAUSE_PIPELINE)

    def _close(self) -> None:
        if self.state is not _S.CLOSED:
            self._go(_E.CUT)
        if self.transport is not None:
            self.transport.close()

    def _cut(self, status: int = 502, detail: str = "answer cut") -> None:
        """Close now, dropping unsent bytes; the worker connection goes too."""
        req = self.cycle
        self.cycle = None
        if self.state is not _S.CLOSED:
            self._go(_E.CUT)
        if req is not None and not req.done:
            self.router.fail(req, status, detail)
        if self.transport is not None:
            self.transport.abort()

    # -- flow control ----------------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        """Stop reading from the client for ``reason``."""
        if not self.pause_reasons and self.transport is not None:
            self.transport.pause_reading()
        self.pause_reasons |= reason

    def unpause(self, reason: int) -> None:
        """``reason`` no longer holds; read again when no other reason does."""
        if not self.pause_reasons & reason:
            return
        self.pause_reasons &= ~reason
        if not self.pause_reasons and self.transport is not None and self.state is not _S.CLOSED:
            if self.state is _S.FROZEN:
                return
            self.transport.resume_reading()
            if CLIENT_TIMER[self.state] is Timer.BODY:
                # The client's silence is timed from now: we were not reading.
                self.deadline = self.loop.time() + self.server.body_timeout

    # -- timeouts, shutdown, hand-over ---------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """Called by the sweeper about once a second."""
        if self.transport is None:
            return
        state = self.state
        timer = CLIENT_TIMER[state]
        if timer is not Timer.NONE and now >= self.deadline:
            if timer is Timer.BODY and self.pause_reasons:
                # We are not reading (the worker is slow): not the client's silence.
                self.deadline = now + self.server.body_timeout
            elif timer is Timer.HEADER and state is _S.HEAD:
                self._error(408)
            elif timer is Timer.BODY and state is _S.BODY:
                self._error(408, "request body timed out")
            else:
                self._cut(504, "client timed out")
            return
        if self.send_deadline and now >= self.send_deadline:
            transport = self.transport
            size = transport.get_write_buffer_size()
            if size < self.send_mark:
                # The client took some bytes: it is slow, not gone.
                self.send_mark = size
                self.send_deadline = now + self.server.send_timeout
            else:
                self._cut(504, "client accepted no bytes for send_timeout")

    def shutdown(self) -> None:
        """Graceful stop: close if idle, else close after the current answer."""
        if self.state is _S.IDLE or self.state is _S.PROXY:
            self._close()
        elif self.cycle is not None:
            self.cycle.keep_alive = False

    def is_idle(self) -> bool:
        """No request in progress and nothing half-parsed: safe to hand over."""
        return self.state is _S.IDLE and not self.buffer and self.transport is not None

    def freeze(self) -> None:
        """Stop reading for good: the next request waits in the kernel for the next image."""
        if self.state is not _S.IDLE:
            return
        self._go(_E.FREEZE)
        if self.transport is not None:
            self.transport.pause_reading()

    def thaw(self) -> None:
        """The hand-over failed: read again (keep-alive timer from now)."""
        if self.state is not _S.FROZEN:
            return
        self._go(_E.THAW)
        if self.transport is not None:
            self.transport.resume_reading()


# Kept for handover.py's fallback path (it calls thaw() when present).
T_IDLE: Final = 3


_READY = WorkerState.READY
# States in which the connection waits for more client bytes.
_WAITS_FOR_INPUT = frozenset({_S.PROXY, _S.IDLE, _S.HEAD, _S.BODY, _S.DISCARD})

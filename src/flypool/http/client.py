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
from typing import Final, NoReturn, cast

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
    CLIENT_TABLE,
    CLIENT_TIMER,
    ClientEvent,
    ClientState,
    Timer,
    client_next,
)
from flypool.pool.worker import WorkerState

# Enum members as module constants: reading ClientState.X costs ~300 ns, a
# module global ~15 ns, and the hot path reads dozens per request.
S_BODY: Final = ClientState.BODY
S_CLOSED: Final = ClientState.CLOSED
S_CLOSING: Final = ClientState.CLOSING
S_DISCARD: Final = ClientState.DISCARD
S_EARLY: Final = ClientState.EARLY
S_FROZEN: Final = ClientState.FROZEN
S_HEAD: Final = ClientState.HEAD
S_IDLE: Final = ClientState.IDLE
S_PROXY: Final = ClientState.PROXY
S_SENDING: Final = ClientState.SENDING
S_TUNNEL: Final = ClientState.TUNNEL
S_WAITING: Final = ClientState.WAITING
E_BODY_END: Final = ClientEvent.BODY_END
E_CUT: Final = ClientEvent.CUT
E_EOF: Final = ClientEvent.EOF
E_ERROR: Final = ClientEvent.ERROR
E_FREEZE: Final = ClientEvent.FREEZE
E_HEAD_BODY: Final = ClientEvent.HEAD_BODY
E_HEAD_END: Final = ClientEvent.HEAD_END
E_HEAD_START: Final = ClientEvent.HEAD_START
E_LOST: Final = ClientEvent.LOST
E_PROXY_DONE: Final = ClientEvent.PROXY_DONE
E_RESPONSE: Final = ClientEvent.RESPONSE
E_RESPONSE_CLOSE: Final = ClientEvent.RESPONSE_CLOSE
E_RESPONSE_END: Final = ClientEvent.RESPONSE_END
E_THAW: Final = ClientEvent.THAW
E_UPGRADE: Final = ClientEvent.UPGRADE
T_BODY: Final = Timer.BODY
T_HEADER: Final = Timer.HEADER
T_KEEPALIVE: Final = Timer.KEEPALIVE
T_NONE: Final = Timer.NONE

MAX_HEADERS: Final = 100
# After an answer that ends the connection, or while dropping a body nobody
# will read, the client gets this long to finish sending (nginx: lingering_timeout).
LINGER_TIMEOUT: Final = 5.0
# Bytes of pipelined requests kept while an answer is in progress.
PIPELINE_LIMIT: Final = 65536


# What the headers of the head being parsed said (bits of _flags).
F_CHUNKED: Final = 1  # Transfer-Encoding
F_EXPECT: Final = 2  # Expect
F_REWRITE: Final = 4  # a header must not reach the worker as it is
F_UNDERSCORE: Final = 8  # a name with "_"
F_XFF: Final = 16  # X-Forwarded-For


def _has_underscore(name: bytes) -> bool:
    # A loop, not `b"_" in name` nor find(): CPython 3.11's bytes `in` first
    # tries its operand as an int and formats a TypeError (~2k instructions),
    # find() parses its arguments (~800); compiled, a few dozen.
    for i in range(len(name)):  # noqa: SIM110 (an index loop is mypyc's fastest)
        if name[i] == 95:
            return True
    return False


class _HeadTooLarge(Exception):
    pass


class ClientConnection(asyncio.Protocol):
    """An HTTP/1.1 client connection on a front listener."""

    __slots__ = (
        "_conn_values",
        "_consuming",
        "_decoder",
        "_fed",
        "_flags",
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
        "_sync",
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
        self.state = S_PROXY if proxy_protocol else S_IDLE
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
        self._flags = 0
        self._conn_values: list[bytes] | None = None
        self._xff_index = -1
        self.head_complete = False
        self._keep_alive = True
        self._upgrade = False
        self._method = b""
        self._version = ""
        # The bytes being fed to llhttp (its callbacks read the request line there).
        self._fed = b""
        self._left = 0
        self._decoder: ChunkedDecoder | None = None
        self._pieces: list[bytes] = []
        self._held = False
        # llhttp is fed the body bytes too (it only counts them), to stay in step.
        self._sync = True

    # -- states and timers ------------------------------------------------------------------------

    def _illegal(self, event: ClientEvent) -> NoReturn:
        client_next(self.state, event)  # raises IllegalTransition
        raise AssertionError(event)

    def _go(self, event: ClientEvent) -> ClientState:
        """Apply ``event`` and arm the new state's timer."""
        state = CLIENT_TABLE[self.state][event]
        if state is None:
            self._illegal(event)
        self.state = state
        timer = CLIENT_TIMER[state]
        if timer:
            server = self.server
            if timer is T_KEEPALIVE:
                timeout = server.keepalive_timeout
            elif timer is T_HEADER:
                timeout = server.header_timeout
            elif timer is T_BODY:
                timeout = server.body_timeout
            else:
                timeout = LINGER_TIMEOUT
            self.deadline = self.loop.time() + timeout
        return state

    @property
    def frozen(self) -> bool:
        """Handed over to the next image: no longer read (USR2)."""
        return self.state is S_FROZEN

    @property
    def tunnel(self) -> bool:
        """Relaying a tunnel (after a 101)."""
        return self.state is S_TUNNEL

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
        elif self.state is S_PROXY:
            # Unix listeners pass the web server's headers unchanged (SPEC §9).
            self.state = S_IDLE
        self.deadline = self.loop.time() + (
            self.server.header_timeout if self.state is S_PROXY else self.server.keepalive_timeout
        )

    def _set_client(self, host: str) -> None:
        self.client_addr = host.encode("ascii", "replace")
        self.xff_tail = b"X-Forwarded-For: " + self.client_addr + b"\r\n\r\n"

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self.state is not S_CLOSED:
            self._go(E_LOST)
        req = self.cycle
        self.cycle = None
        if req is not None and not req.done:
            self.router.abandon(req)

    def eof_received(self) -> bool | None:
        self.eof = True
        state = self.state
        if state is S_CLOSED:
            return None
        if state is S_WAITING or state is S_SENDING:
            # A client may send its requests and shut its write side: every
            # request already received is answered before the close.
            return True
        if state is S_EARLY:
            req = self.cycle
            if req is not None:
                req.keep_alive = False
            self._go(E_EOF)
            return True
        req = self.cycle
        self.cycle = None
        self._go(E_EOF)
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
        if state is S_IDLE and not self.buffer:
            # The common case: one whole head (a GET), nothing after it.
            end = len(data) - 4
            if (
                end > 0
                and data.find(b"\r\n\r\n") == end
                and data[0] != 13
                and data[0] != 10
                and end < self.server.max_header_size
            ):
                # HEAD is left within this call: no header timer to arm.
                nxt = CLIENT_TABLE[state][E_HEAD_START]
                if nxt is None:
                    self._illegal(E_HEAD_START)
                self.state = nxt
                self._reset_head()
                if not self._feed_head(data):
                    return
                if self.head_complete:
                    self._head_done(data, b"")
                else:
                    self._error(400)
                return
            self._consume(data)
            return
        if state is S_TUNNEL:
            req = self.cycle
            up = req.upstream if req is not None else None
            if up is not None and up.transport is not None:
                up.transport.write(data)
            return
        if not CLIENT_READS[state]:
            if state is not S_CLOSED:
                # Pipelined: parsed once the answer in progress is complete.
                self.buffer += data
                if len(self.buffer) > PIPELINE_LIMIT:
                    self.pause(PAUSE_PIPELINE)
            return
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if CLIENT_TIMER[state] is T_BODY:
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
                if state is S_HEAD or state is S_IDLE:
                    data = self._read_head(data)
                elif state is S_BODY or state is S_EARLY or state is S_DISCARD:
                    data = self._read_body(data)
                elif state is S_PROXY:
                    data = self._read_proxy(data)
                elif state is S_CLOSING or state is S_CLOSED:
                    return  # read and dropped (lingering close)
                elif state is S_TUNNEL:
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
        if req is not None and req.out and req.upstream is not None:
            # Body bytes of this read go to the worker in one write.
            req.flush()
        if (
            (self.eof or self.server.handing_over)
            and not self.buffer
            and self.state in _WAITS_FOR_INPUT
        ):
            if self.eof:
                self._input_ended()
            elif self.state is S_IDLE:
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
        self._go(E_PROXY_DONE)
        return data[used:]

    def _read_head(self, data: bytes) -> bytes:
        if self.state is S_IDLE:
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

    def _begin_head(self, timed: bool = True) -> None:
        if timed:
            self._go(E_HEAD_START)
        else:
            # The whole head is in this read: HEAD is left before any timer
            # could be looked at, so none is armed.
            state = CLIENT_TABLE[self.state][E_HEAD_START]
            assert state is not None
            self.state = state
        self._reset_head()

    def _reset_head(self) -> None:
        self._url = b""
        self._headers = []
        self._hosts = 0
        self._length = b""
        self._flags = 0
        self._conn_values = None
        self._xff_index = -1
        self.head_complete = False

    def _feed_head(self, data: bytes) -> bool:
        """Feed head bytes to llhttp; False (and the error answered) if it refuses them."""
        self._fed = data
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
        # Dispatch on length and first letter: most names are none of these.
        if n == 4:
            if name == b"Host" or name.lower() == b"host":
                self._hosts += 1
        elif n > 5:
            c = name[0] | 32
            if c == 99:  # c
                if n == 14 and name.lower() == b"content-length":
                    self._length = value
                elif n == 10 and name.lower() == b"connection":
                    if self._conn_values is None:
                        self._conn_values = []
                    self._conn_values.append(value)
                    self._flags |= F_REWRITE
            elif c == 116:  # t
                if n == 17 and name.lower() == b"transfer-encoding":
                    self._flags |= F_CHUNKED
            elif c == 120:  # x
                if n == 15 and name.lower() == b"x-forwarded-for":
                    self._xff_index = len(headers) - 1
                    self._flags |= F_XFF
            elif c == 101:  # e
                if n == 6 and name.lower() == b"expect":
                    self._flags |= F_EXPECT
            elif (c == 107 or c == 117 or c == 112) and name.lower() in HOP_BY_HOP:
                # keep-alive, upgrade, proxy-connection
                self._flags |= F_REWRITE
        elif n == 2 and name.lower() == b"te":
            self._flags |= F_REWRITE
        if _has_underscore(name):
            self._flags |= F_REWRITE | F_UNDERSCORE
        if len(headers) > MAX_HEADERS:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        # Read here: llhttp resets these once the message (a head without a
        # body) is complete, within the same feed.
        parser = self.parser
        self._keep_alive = parser.should_keep_alive()
        self._upgrade = parser.should_upgrade()
        method = self._method = parser.get_method()
        # "HTTP/1.1" read from the request line when it is where a plain line
        # has it: get_http_version() formats a str (~2k instructions).
        first = self._parts[0] if self._parts else self._fed
        at = len(method) + len(self._url) + 1
        if first[at : at + 11] == b" HTTP/1.1\r\n" and first[len(method)] == 32:
            self._version = "1.1"
        else:
            self._version = parser.get_http_version()
        self._fed = b""  # not kept while the connection idles
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
        flags = self._flags
        chunked = flags & F_CHUNKED
        # RFC 9110 §7.2: one Host. RFC 9112 §3.2.4: asterisk-form is for
        # OPTIONS only. And see _refused().
        if (
            self._hosts > 1
            or (url == b"*" and method != b"OPTIONS")
            or (flags and self._refused(flags, http10))
        ):
            self._error(400)
            return b""
        length = int(self._length) if self._length else 0
        has_body = chunked or length > 0
        upgrade = self._upgrade
        # After an upgrade head llhttp takes what follows for tunnel bytes; a
        # body is framed here instead, and the connection ends with the answer.
        self._sync = not (upgrade and has_body)
        # The exact bytes go on unless a header must change or the request
        # line is one of the variants llhttp tolerates (see _head_line).
        m = len(method)
        line = m + len(url) + 10  # METHOD SP url SP HTTP/1.1
        if flags or self.tcp or http10 or not head.startswith(b"\r\n", line) or head[m] != 32:
            head = self._forward_head(head, method, url, version, upgrade)
        req = Request(self, head, method, url)
        req.started_at = self.loop.time()
        if http10:
            req.http10 = True
        if upgrade:
            req.keep_alive = False
            req.upgrade = not has_body
        elif not self._keep_alive or self.server.shutting_down:
            req.keep_alive = False
        self.cycle = req
        router = self.router
        if has_body:
            if chunked:
                req.chunked = True
                self._decoder = ChunkedDecoder(self.server.max_header_size)
            else:
                self._left = length
            if flags & F_EXPECT:
                req.expect = True
            self._go(E_HEAD_BODY)
        else:
            req.body_done = True
            nxt = CLIENT_TABLE[self.state][E_HEAD_END]  # WAITING: no timer
            if nxt is None:
                self._illegal(E_HEAD_END)
            self.state = nxt
        if router.health_path and target_path(url) == router.health_path:
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
        if has_body and not flags & F_EXPECT:
            self._held = True
        else:
            router.dispatch(req)
        return rest

    def _refused(self, flags: int, http10: bool) -> bool:
        """Header rules that refuse a request (looked at only when a flag is set).

        RFC 9112 §6.1: chunked framing on HTTP/1.0 is faulty; names with
        "_" when underscores_in_headers = "refuse".
        """
        if flags & F_CHUNKED and http10:
            return True
        return bool(flags & F_UNDERSCORE) and self.server.underscores == "refuse"

    @staticmethod
    def _head_line(head: bytes, method: bytes, url: bytes) -> int:
        """``len(head)`` if its request line is exactly ``METHOD SP url SP HTTP/1.x``, else -1.

        llhttp tolerates a few variants of the request line (extra spaces);
        a head with one is rebuilt, so that the worker parses what we parsed.
        """
        m = len(method)
        end = m + len(url) + 10  # METHOD SP url SP HTTP/1.1
        if head.startswith(b"\r\n", end) and head[m] == 32:
            return len(head)
        return -1

    def _forward_head(
        self, head: bytes, method: bytes, url: bytes, version: str, upgrade: bool
    ) -> bytes:
        """The head as the worker gets it: the client's, unless a header must change."""
        flags = self._flags
        tcp = self.tcp
        xff = tcp and not flags & F_XFF
        change = flags & F_REWRITE or (tcp and flags & F_XFF)
        if not change and version == "1.1" and self._head_line(head, method, url) > 0:
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
            if _has_underscore(name) and (
                drop_underscored or low.replace(b"_", b"-") in FRAMING_ALIASES
            ):
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
        keep = req is not None and self.state is not S_DISCARD and not req.local
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
        if self.state is S_BODY and req is not None:
            self.router.fail(req, 400, "malformed chunked body")
        else:
            self._cut()

    def _body_end(self) -> None:
        state = self.state
        if state is S_DISCARD:
            self._go(E_BODY_END)
            self._next_request()
            return
        req = self.cycle
        assert req is not None
        req.body_done = True
        self._go(E_BODY_END)
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
        self._go(E_RESPONSE)
        self.answer_ends(req)

    # -- the answer (called by the router and the worker connection) ------------------------------

    def attached(self, req: Request) -> None:
        """The router found a worker connection for ``req``: send what we have."""
        if req is not self.cycle:
            return
        if self.pause_reasons:
            self.unpause(PAUSE_BUFFER)
        req.flush()
        if self.send_deadline:
            req.client_write_paused(True)

    def answer_begins(self, req: Request) -> None:
        """The final answer head of ``req`` went out to the client."""
        if req is self.cycle and (self.state is S_WAITING or self.state is S_BODY):
            nxt = CLIENT_TABLE[self.state][E_RESPONSE]  # SENDING or EARLY
            if nxt is None:
                self._illegal(E_RESPONSE)
            if nxt is S_EARLY:
                self._go(E_RESPONSE)  # EARLY times the body
            else:
                self.state = nxt

    def answer_ends(self, req: Request) -> None:
        """The answer of ``req`` is complete: next request, discard the body, or close."""
        if req is not self.cycle:
            return
        state = self.state
        if state is S_CLOSED:
            return
        if state is S_WAITING or state is S_BODY:
            # An answer with no final head we saw (a local or cut one).
            state = self._go(E_RESPONSE)
        keep = req.keep_alive and not self.server.shutting_down
        if state is S_EARLY and req.expect:
            # The client may still wait for a 100 Continue that will never come.
            keep = False
        if self.eof and not self.buffer and state is S_SENDING:
            keep = False
        self.cycle = None
        self._held = False
        if self.pause_reasons:
            self.unpause(PAUSE_UPSTREAM | PAUSE_BUFFER)
        state = self._go(E_RESPONSE_END if keep else E_RESPONSE_CLOSE)
        if state is S_CLOSING:
            self._linger()
        elif state is S_IDLE and (self.buffer or self.eof or self.server.handing_over):
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
        if CLIENT_READS[self.state] and self.pause_reasons:
            self.unpause(PAUSE_PIPELINE)

    def _input_ended(self) -> None:
        """The client sent its last byte and everything it sent is dealt with."""
        req = self.cycle
        self.cycle = None
        self._go(E_EOF)
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
        self._go(E_UPGRADE)
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
        if state is S_CLOSED:
            return
        if state in CLIENT_ANSWERING or state is S_DISCARD or state is S_CLOSING:
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
        self._go(E_ERROR)
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
        if self.state is not S_CLOSED:
            self._go(E_CUT)
        if self.transport is not None:
            self.transport.close()

    def _cut(self, status: int = 502, detail: str = "answer cut") -> None:
        """Close now, dropping unsent bytes; the worker connection goes too."""
        req = self.cycle
        self.cycle = None
        if self.state is not S_CLOSED:
            self._go(E_CUT)
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
        if not self.pause_reasons and self.transport is not None and self.state is not S_CLOSED:
            if self.state is S_FROZEN:
                return
            self.transport.resume_reading()
            if CLIENT_TIMER[self.state] is T_BODY:
                # The client's silence is timed from now: we were not reading.
                self.deadline = self.loop.time() + self.server.body_timeout

    # -- timeouts, shutdown, hand-over ---------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """Called by the sweeper about once a second."""
        if self.transport is None:
            return
        state = self.state
        timer = CLIENT_TIMER[state]
        if timer is not T_NONE and now >= self.deadline:
            if timer is T_BODY and self.pause_reasons:
                # We are not reading (the worker is slow): not the client's silence.
                self.deadline = now + self.server.body_timeout
            elif timer is T_HEADER and state is S_HEAD:
                self._error(408)
            elif timer is T_BODY and state is S_BODY:
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
        if self.state is S_IDLE or self.state is S_PROXY:
            self._close()
        elif self.cycle is not None:
            self.cycle.keep_alive = False

    def is_idle(self) -> bool:
        """No request in progress and nothing half-parsed: safe to hand over."""
        return self.state is S_IDLE and not self.buffer and self.transport is not None

    def freeze(self) -> None:
        """Stop reading for good: the next request waits in the kernel for the next image."""
        if self.state is not S_IDLE:
            return
        self._go(E_FREEZE)
        if self.transport is not None:
            self.transport.pause_reading()

    def thaw(self) -> None:
        """The hand-over failed: read again (keep-alive timer from now)."""
        if self.state is not S_FROZEN:
            return
        self._go(E_THAW)
        if self.transport is not None:
            self.transport.resume_reading()


_READY = WorkerState.READY
# States in which the connection waits for more client bytes.
_WAITS_FOR_INPUT = frozenset({S_PROXY, S_IDLE, S_HEAD, S_BODY, S_DISCARD})

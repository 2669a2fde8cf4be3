"""The connection from the daemon to one worker: relays one response at a time.

The response is parsed with httptools only to find where it ends; its bytes
are passed to the client unchanged when possible. The head is rebuilt only
when the worker's connection headers must not reach the client (a worker
that closes after every response must not make the client close too).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from flypool.http.parsing import LAST_CHUNK, build_response_head, chunk
from flypool.pool.worker import WorkerState

if TYPE_CHECKING:
    from flypool.http.request import Request
    from flypool.http.router import Router
    from flypool.pool.worker import Worker

_READY = WorkerState.READY
_REWRITE = 1  # the worker sent connection headers that are not for the client
_CHUNKED = 2
_LENGTH = 4


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
        "_reason",
        "_verbatim",
        "complete",
        "got_bytes",
        "idle_since",
        "must_close",
        "parser",
        "read_paused",
        "req",
        "reused",
        "router",
        "status",
        "transport",
        "tunnel",
        "unread",
        "worker",
    )

    def __init__(self, router: Router, worker: Worker) -> None:
        self.router = router
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.req: Request | None = None
        self.reused = False
        self.idle_since = 0.0
        self.tunnel = False
        self.read_paused = False
        # Per-response state.
        self._headers: list[tuple[bytes, bytes]] = []
        self._flags = 0
        self._reason = b""
        self._interim = False
        self._in_head = False
        # Forwarding this response's bytes unchanged (see on_headers_complete).
        self._verbatim = False
        self._out: list[bytes] = []
        self._data = b""
        self._raw_ok = False
        self.got_bytes = False
        self.complete = False
        self.must_close = False
        self.unread = False
        self.status = 0

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=65536)

    def attach(self, req: Request, *, reused: bool) -> None:
        """Start relaying ``req`` on this connection."""
        self.req = req
        self.reused = reused
        self.got_bytes = False
        self.complete = False
        self.must_close = False
        self.unread = False
        req.upstream = self
        req.conn.upstream_attached(req)

    def park(self) -> None:
        """Keep this connection for reuse by the next request to the worker."""
        self.req = None
        w = self.worker
        if self.transport is None or self.transport.is_closing() or w.state is not _READY:
            self.close()
            return
        self.idle_since = self.router.loop.time()
        if self.read_paused:
            # Paused for a slow client of the previous request.
            self.read_paused = False
            self.transport.resume_reading()
        w.idle_conns.append(self)

    def close(self) -> None:
        """Close without waiting; an attached request is failed by connection_lost."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (the client left or the request was cut short)."""
        self.req = None
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        req = self.req
        if req is not None:
            req.conn.pause_for_upstream(True)

    def resume_writing(self) -> None:
        req = self.req
        if req is not None:
            req.conn.pause_for_upstream(False)

    def data_received(self, data: bytes) -> None:
        req = self.req
        if req is None:
            # A worker talking on an idle connection is broken; don't reuse it.
            self.close()
            return
        client = req.conn.transport
        if self.tunnel:
            if client is not None:
                client.write(data)
            return
        self.got_bytes = True
        self._data = data
        # Raw bytes are usable only when no head is half-read from an earlier read.
        self._raw_ok = not self._in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            off = int(exc.args[0])
            self._flush(client)
            self.tunnel = True
            req.conn.start_tunnel(req, data[off:])
            return
        except httptools.HttpParserError:
            self._flush(client)
            self.must_close = True
            req.conn.upstream_failed(req, self, "invalid response from worker")
            return
        if self._verbatim:
            # Nothing to change in this response: the worker's bytes go out as
            # they came, one write, no copies.
            if client is not None and not client.is_closing():
                client.write(data)
            if self.complete:
                self._verbatim = False
        else:
            self._flush(client)
        if self.complete:
            self.complete = False
            req.conn.response_done(req, self)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        # EPIPE/ECONNRESET: the worker never read what we sent (it was gone,
        # or died with our bytes unread). A clean EOF means it may have --
        # unless our write already found the connection closing (see
        # ClientConnection._write_pending).
        self.unread = self.unread or exc is not None
        req = self.req
        if req is None:
            w = self.worker
            try:
                w.idle_conns.remove(self)
            except ValueError:
                return  # closed by us (retired, swept)
            # The worker closed a pooled connection: idle timeout, or it died.
            # Route around it until a liveness check says which, so requests
            # don't go to a process that is already gone.
            self.router.suspect(w)
            return
        self.req = None
        if self.tunnel:
            req.conn.tunnel_closed(req)
        elif self.status and not self.complete and not (self._flags & (_CHUNKED | _LENGTH)):
            # A response delimited by the end of the connection: it is complete.
            self.must_close = True
            req.conn.response_done(req, self)
        else:
            req.conn.upstream_failed(req, self, "worker closed the connection")

    # -- parser callbacks ----------------------------------------------------------

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
        if n == 10 or n == 16:
            low = name.lower()
            if low == b"connection" or low == b"keep-alive" or low == b"proxy-connection":
                self._flags |= _REWRITE
        elif n == 14:
            if name.lower() == b"content-length":
                self._flags |= _LENGTH
        elif n == 17 and name.lower() == b"transfer-encoding":
            self._flags |= _CHUNKED

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        self._in_head = False
        parser = self.parser
        status = parser.get_status_code()
        self.status = status
        flags = self._flags
        if status < 200:
            if status == 101:
                self._emit_head(req, raw=True, connection=b"")
                return
            self._interim = True
            self._emit_head(req, raw=not flags & _REWRITE, connection=b"")
            self.status = 0
            return
        self.router.stats.by_class[status // 100 if status < 600 else 5] += 1
        bodiless = req.head_request or status == 204 or status == 304
        if not bodiless and not flags & (_CHUNKED | _LENGTH):
            # Ends when the worker closes: the client can't reuse its connection.
            req.keep_alive = False
        if req.head_request:
            # llhttp would wait for the body a HEAD response announces but never
            # sends, so this connection can't be reused for a next response.
            self.must_close = True
            self.complete = True
        if not parser.should_keep_alive():
            self.must_close = True
        if req.keep_alive:
            conn_value = b"keep-alive" if req.http10 else b""
            raw = not flags & _REWRITE and not req.http10
        else:
            conn_value = b"close"
            raw = False
        if raw and self._raw_ok and not self._out and self._data.startswith(b"HTTP/"):
            # The whole read starts with this head and nothing in the response
            # needs changing: forward the worker's bytes verbatim.
            self._verbatim = True
            self._raw_ok = False
        else:
            self._emit_head(req, raw=raw, connection=conn_value)
        req.response_started = True

    def _emit_head(self, req: Request, *, raw: bool, connection: bytes) -> None:
        data = self._data
        if raw and self._raw_ok:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                self._out.append(data[: end + 4])
                self._raw_ok = False
                return
        self._raw_ok = False
        version = b"1.1" if self.parser.get_http_version() == "1.1" else b"1.0"
        self._out.append(
            build_response_head(
                version, self.parser.get_status_code(), self._reason, self._headers, connection
            )
        )

    def on_body(self, body: bytes) -> None:
        if self._verbatim:
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
        if self._flags & _CHUNKED and not self._verbatim:
            self._out.append(LAST_CHUNK)
        self.complete = True

    # -- helpers ----------------------------------------------------------------

    def _flush(self, client: asyncio.Transport | None) -> None:
        out = self._out
        if not out:
            return
        if client is not None and not client.is_closing():
            if len(out) == 1:
                client.write(out[0])
            else:
                client.writelines(out)
        out.clear()

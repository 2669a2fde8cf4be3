"""Sans-IO HTTP/1.1 pieces of the example worker: head parsing and body decoding.

Nothing here does IO or touches the event loop: functions take bytes and
return values, so they are cheap to test with plain bytes. The connection
protocol (`flypool.example.protocol`) feeds them.

Parsing is strict where request smuggling lives (framing headers, bare CR/LF,
chunk sizes) and lenient elsewhere (a missing Host is accepted), which is
what a test app behind a proxy should be.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from hashlib import _Hash

MAX_HEAD = 64 * 1024
"""Request line + headers larger than this are answered 431."""
MAX_CHUNK_LINE = 4096
"""A chunk-size line (with extensions) longer than this is answered 400."""
MAX_TRAILERS = 64 * 1024
"""A trailer section larger than this is answered 431."""
ECHO_LIMIT = 16 * 1024 * 1024
"""``/echo`` buffers the body, so it refuses bodies larger than this (413)."""

_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_HEX_CHARS = frozenset(b"0123456789abcdefABCDEF")
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_status_lines: dict[int, bytes] = {}


def status_line(code: int) -> bytes:
    """Return ``HTTP/1.1 <code> <reason>\\r\\n``, cached per code."""
    line = _status_lines.get(code)
    if line is None:
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = "Unknown"
        line = b"HTTP/1.1 %d %s\r\n" % (code, reason.encode("ascii"))
        _status_lines[code] = line
    return line


class HttpError(Exception):
    """A request the server refuses: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """One parsed request head, plus what its body produced so far."""

    __slots__ = (
        "body_bytes",
        "chunked",
        "chunks",
        "connection",
        "content_length",
        "expect_continue",
        "hasher",
        "head_only",
        "header_lines",
        "keep_alive",
        "method",
        "params",
        "path",
        "target",
        "upgrade",
        "version",
        "ws_key",
    )

    def __init__(self, method: bytes, target: bytes, version: bytes) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.path = target
        self.params: dict[str, str] = {}
        self.header_lines: list[bytes] = []
        self.head_only = method == b"HEAD"
        # Framing and connection handling, from the headers.
        self.content_length = -1  # -1: no Content-Length header
        self.chunked = False
        self.connection: set[bytes] = set()
        self.keep_alive = True
        self.upgrade = b""
        self.ws_key = b""
        self.expect_continue = False
        # What the body produced: a count always, a digest or the bytes if asked for.
        self.body_bytes = 0
        self.hasher: _Hash | None = None
        self.chunks: list[bytes] | None = None

    @property
    def has_body(self) -> bool:
        """Whether body bytes follow the head."""
        return self.chunked or self.content_length > 0

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The header fields as received: (name, value without surrounding whitespace)."""
        pairs = []
        for line in self.header_lines:
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip(b" \t")))
        return pairs

    def consume(self, data: bytes) -> None:
        """Take one piece of the body: count it, and hash or keep it if asked to."""
        self.body_bytes += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        elif self.chunks is not None:
            if self.body_bytes > ECHO_LIMIT:
                raise HttpError(413, "/echo takes at most 16 MiB")
            self.chunks.append(data)


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip(b" \t").lower() for t in value.split(b",")}


def parse_head(head: bytes) -> Request:
    """Parse a request head: the request line and header lines, each ending in CRLF.

    Raises `HttpError` (400 or 505) for anything malformed, including framing
    that a proxy could read differently (RFC 9112 §6.3).
    """
    # Bare CR, bare LF and NUL are never valid in a head (RFC 9112 §2.2);
    # three scans at C speed beat a check per header.
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf or b"\x00" in head:
        raise HttpError(400, "bare CR, LF or NUL in the request head")
    line_end = head.find(b"\r\n")
    parts = head[:line_end].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not method or not _TOKEN_CHARS.issuperset(method) or not target:
        raise HttpError(400, "malformed request line")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HttpError(400, "malformed request line")
    req = Request(method, target, version)

    lines = head[line_end + 2 :].split(b"\r\n")
    lines.pop()  # the head ends in CRLF, so the last element is empty
    req.header_lines = lines
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or not _TOKEN_CHARS.issuperset(name):
            raise HttpError(400, "malformed header line")
        lname = name.lower()
        if lname == b"content-length":
            # Repeated or listed values are fine as long as they agree.
            for item in value.split(b","):
                item = item.strip(b" \t")
                if not item.isdigit() or len(item) > 18:
                    raise HttpError(400, "bad Content-Length")
                if req.content_length not in (-1, int(item)):
                    raise HttpError(400, "conflicting Content-Length")
                req.content_length = int(item)
        elif lname == b"transfer-encoding":
            # Only plain chunked is understood; HTTP/1.0 has no transfer codings.
            if version == b"HTTP/1.0" or req.chunked or _tokens(value) != {b"chunked"}:
                raise HttpError(400, "unsupported Transfer-Encoding")
            req.chunked = True
        elif lname == b"connection":
            req.connection |= _tokens(value)
        elif lname == b"upgrade":
            req.upgrade = value.strip(b" \t")
        elif lname == b"expect":
            req.expect_continue = value.strip(b" \t").lower() == b"100-continue"
        elif lname == b"sec-websocket-key":
            req.ws_key = value.strip(b" \t")
    if req.chunked and req.content_length >= 0:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")

    if version == b"HTTP/1.1":
        req.keep_alive = b"close" not in req.connection
    else:
        req.keep_alive = b"keep-alive" in req.connection

    if target[0] != 0x2F and target.startswith((b"http://", b"https://")):
        # Absolute-form (what a forward proxy would send): keep the path part.
        slash = target.find(b"/", target.find(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    path, sep, query = target.partition(b"?")
    req.path = path
    if sep:
        req.params = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
    return req


def param_float(params: dict[str, str], name: str, default: float) -> float:
    """A non-negative number from the query (seconds), or `default`; 400 if malformed."""
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise HttpError(400, f"bad {name}={raw!r}: expected seconds") from None
    if not math.isfinite(value) or value < 0:
        raise HttpError(400, f"bad {name}={raw!r}: expected seconds")
    return value


def param_int(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer in ``low..high`` from the query, or `default`; 400 if malformed."""
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, f"bad {name}={raw!r}: expected an integer") from None
    if not low <= value <= high:
        raise HttpError(400, f"bad {name}={raw!r}: expected {low}..{high}")
    return value


def websocket_accept(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


class ChunkedDecoder:
    """Incremental decoder of a chunked request body (RFC 9112 §7.1).

    It never holds more than one chunk-size or trailer line: data bytes are
    handed to the sink as soon as they arrive, whatever the chunk size.
    """

    _SIZE = 0
    _DATA = 1
    _DATA_END = 2
    _TRAILER = 3

    def __init__(self) -> None:
        self._state = self._SIZE
        self._left = 0  # data bytes still expected in the current chunk
        self._trailer_bytes = 0

    def feed(self, buf: bytes, sink: Callable[[bytes], None]) -> tuple[bool, bytes]:
        """Decode what `buf` holds; return (body complete, bytes not consumed)."""
        while True:
            state = self._state
            if state == self._DATA:
                if not buf:
                    return False, buf
                left = self._left
                if len(buf) <= left:
                    data, buf = buf, b""
                else:
                    data, buf = buf[:left], buf[left:]
                self._left = left - len(data)
                if self._left == 0:
                    self._state = self._DATA_END
                sink(data)
            elif state == self._DATA_END:
                if len(buf) < 2:
                    return False, buf
                if buf[:2] != b"\r\n":
                    raise HttpError(400, "chunk data not followed by CRLF")
                buf = buf[2:]
                self._state = self._SIZE
            else:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > (MAX_CHUNK_LINE if state == self._SIZE else MAX_TRAILERS):
                        raise HttpError(400, "chunk line too long")
                    return False, buf
                line, buf = buf[:eol], buf[eol + 2 :]
                if state == self._TRAILER:
                    self._trailer_bytes += eol + 2
                    if self._trailer_bytes > MAX_TRAILERS:
                        raise HttpError(431, "trailers larger than 64 KiB")
                    if not line:
                        return True, buf
                    continue
                # chunk-size [ BWS ";" extensions ]: extensions are ignored.
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or len(size_text) > 16 or not _HEX_CHARS.issuperset(size_text):
                    raise HttpError(400, "bad chunk size")
                self._left = int(size_text, 16)
                self._state = self._DATA if self._left else self._TRAILER

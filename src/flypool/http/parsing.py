"""Sans-IO HTTP/1.1 helpers shared by the client and upstream protocols.

Nothing here touches a socket or the event loop, so every function can be
tested with plain bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Response headers the proxy rewrites when it rebuilds a head: the framing
# header (transfer-encoding) and upgrade are kept because the body and the
# tunnel are relayed unchanged.
RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
# b" 200 " for every status code: bytes % formatting costs thousands of instructions.
_CODES: Final = [b" %d " % code for code in range(600)]

REASONS: dict[int, bytes] = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def error_response(status: int, detail: str = "", *, close: bool = True) -> bytes:
    """A complete response the daemon itself sends (never forwarded from a worker)."""
    reason = REASONS.get(status, b"Error")
    body = b"%d %s\n" % (status, reason)
    if detail:
        body += detail.encode() + b"\n"
    conn = b"close" if close else b"keep-alive"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: %s\r\nServer: flypool\r\n\r\n%s" % (status, reason, len(body), conn, body)
    )


def simple_response(
    status: int, body: bytes, *, keep_alive: bool, head_only: bool = False
) -> bytes:
    """A small 200/503 answer (health checks) that may keep the connection open."""
    reason = b"OK" if status == 200 else REASONS.get(status, b"Status")
    conn = b"keep-alive" if keep_alive else b"close"
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: %s\r\nCache-Control: no-store\r\n\r\n" % (status, reason, len(body), conn)
    )
    return head if head_only else head + body


def build_request_head(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    extra: bytes = b"",
) -> bytes:
    """Serialise a request head from its parts; ``extra`` is whole header lines to add.

    Used when the head the client sent must change on its way to the worker
    (hop-by-hop headers, underscored names, ``X-Forwarded-For``).
    """
    parts = [method, b" ", target, b" HTTP/", version, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (extra, b"\r\n")
    return b"".join(parts)


# Request headers that describe one hop, never forwarded (RFC 9110 §7.6.1),
# besides the names a Connection header lists.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"te", b"proxy-connection", b"upgrade"})
# Names a WSGI/CGI server would fold an underscored alias into: never forwarded
# with underscores, whatever underscores_in_headers says.
FRAMING_ALIASES = frozenset({b"host", b"content-length", b"transfer-encoding"})


def connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    """The lower-case option names listed in Connection header values."""
    out: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                out.add(token)
    return out


def build_response_head(
    version: bytes,
    status: int,
    reason: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    connection: bytes,
) -> bytes:
    """Serialise a response head without the worker's connection headers.

    ``connection`` is the value this hop announces to the client (b"" for none).
    """
    code = _CODES[status] if 100 <= status < 600 else b" %d " % status
    parts = [b"HTTP/", version, code, reason, b"\r\n"]
    for name, value in headers:
        # Only names as long as one of RESPONSE_DROP's are lowered (a method
        # call for each header is most of this function's cost).
        n = len(name)
        if (n == 10 or n == 16) and name.lower() in RESPONSE_DROP:
            continue
        parts += (name, b": ", value, b"\r\n")
    if connection:
        parts += (b"Connection: ", connection, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """Frame one piece of a body in chunked transfer coding."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def target_path(target: bytes) -> bytes:
    """The path part of a request target (query dropped)."""
    q = target.find(b"?")
    return target if q < 0 else target[:q]

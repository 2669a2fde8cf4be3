"""Sans-IO parser for the PROXY protocol header (HAProxy ``send-proxy`` / ``send-proxy-v2``).

A load balancer that speaks the PROXY protocol writes one header at the very
start of each TCP connection, before any HTTP byte, carrying the original
client address. Version 1 is one text line of at most 107 bytes::

    PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\\r\\n

Version 2 is binary: a 12-byte signature, a version/command byte, a
family/transport byte, a 16-bit big-endian length, then the address block and
optional TLVs (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt).

`parse_proxy_header` takes the bytes received so far and returns how many of
them the header took and the source address, or `NEED_MORE`. It decides from
the first byte which version it is looking at, so a client that is not a
PROXY sender (``GET / HTTP/1.1``) is refused as soon as its first byte arrives.
Nothing here touches a socket: the caller buffers, calls again on each read,
and closes the connection on `ProxyHeaderError`.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Final, Literal, TypeAlias


class NeedMore(enum.Enum):
    """Type of the `NEED_MORE` sentinel (an enum member so mypy narrows on ``is``)."""

    NEED_MORE = "NEED_MORE"


NEED_MORE: Final = NeedMore.NEED_MORE
"""The buffer holds a valid beginning of a header but not the whole header yet."""

Address: TypeAlias = tuple[str, int]
ParseResult: TypeAlias = tuple[int, Address | None] | Literal[NeedMore.NEED_MORE]


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY header this parser accepts: malformed, unsupported or too long."""


V1_PREFIX: Final = b"PROXY "
# 107 bytes is the spec's bound for the longest line ("PROXY UNKNOWN" with two
# full IPv6 addresses and ports), CRLF included.
V1_MAX_LENGTH: Final = 107

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16  # signature, version/command, family/transport, length
# The 16-bit length field allows 64 KiB of addresses and TLVs; nginx bounds the
# whole header at 4096 bytes, which leaves room for every TLV HAProxy sends.
V2_MAX_LENGTH: Final = 4096

_V2_VERSION: Final = 0x20
_V2_LOCAL: Final = 0x20
_V2_PROXY: Final = 0x21

# The family/transport values the spec defines, and the size of their address
# block. Any other value must be rejected by a receiver.
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21
_V2_ADDRESS_LENGTH: Final[dict[int, int]] = {
    0x00: 0,  # UNSPEC
    _V2_TCP4: 12,  # TCP over IPv4
    0x12: 12,  # UDP over IPv4
    _V2_TCP6: 36,  # TCP over IPv6
    0x22: 36,  # UDP over IPv6
    0x31: 216,  # Unix stream
    0x32: 216,  # Unix datagram
}


def parse_proxy_header(buf: bytes | bytearray) -> ParseResult:
    """Parse a PROXY v1 or v2 header at the start of ``buf``.

    Return ``(bytes consumed, (source ip, source port))``; ``(consumed, None)``
    when the header carries no usable address (v1 ``UNKNOWN``, v2 ``LOCAL``,
    or a v2 family other than TCP over IPv4/IPv6), in which case the real peer
    address applies; or `NEED_MORE` while ``buf`` is a valid but incomplete
    header. Bytes after the header are left alone. Raise `ProxyHeaderError`
    as soon as ``buf`` cannot become a valid header.
    """
    if not buf:
        return NEED_MORE
    if buf[0] == V1_PREFIX[0]:
        return _parse_v1(buf)
    if buf[0] == V2_SIGNATURE[0]:
        return _parse_v2(buf)
    raise ProxyHeaderError("no PROXY protocol signature")


def _check_prefix(buf: bytes | bytearray, prefix: bytes) -> bool:
    """Raise unless ``buf`` and ``prefix`` agree as far as both go; True once ``buf`` covers it."""
    n = min(len(buf), len(prefix))
    if buf[:n] != prefix[:n]:
        raise ProxyHeaderError("no PROXY protocol signature")
    return len(buf) >= len(prefix)


def _parse_v1(buf: bytes | bytearray) -> ParseResult:
    if not _check_prefix(buf, V1_PREFIX):
        return NEED_MORE
    limit = min(len(buf), V1_MAX_LENGTH)
    lf = buf.find(b"\n", 0, limit)
    if lf == -1:
        # A CR already followed by something other than LF can never end the line.
        cr = buf.find(b"\r", 0, limit)
        if cr != -1 and cr + 1 < len(buf):
            raise ProxyHeaderError("PROXY v1 line: CR not followed by LF")
        if len(buf) >= V1_MAX_LENGTH:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return NEED_MORE
    if buf[lf - 1] != 0x0D:
        raise ProxyHeaderError("PROXY v1 line does not end with CRLF")
    consumed = lf + 1
    try:
        line = bytes(buf[len(V1_PREFIX) : lf - 1]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    fields = line.split(" ")
    # UNKNOWN: the sender does not know the addresses; the rest of the line is ignored.
    if fields[0] == "UNKNOWN":
        return consumed, None
    if fields[0] not in ("TCP4", "TCP6") or len(fields) != 5:
        raise ProxyHeaderError(f"PROXY v1 line malformed: {line[:60]!r}")
    _, src, dst, src_port, dst_port = fields
    version = 4 if fields[0] == "TCP4" else 6
    source = _v1_address(src, version)
    _v1_address(dst, version)
    port = _v1_port(src_port)
    _v1_port(dst_port)
    return consumed, (source, port)


def _v1_address(text: str, version: int) -> str:
    # ipaddress accepts an IPv6 scope ("fe80::1%eth0"), which no sender writes.
    if "%" in text:
        raise ProxyHeaderError(f"PROXY v1 address has a scope: {text!r}")
    try:
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 address is not IPv{version}: {text!r}") from None
    return str(address)


def _v1_port(text: str) -> int:
    # str.isdigit also accepts non-ASCII digits; the line was checked to be ASCII.
    if not text.isdigit() or len(text) > 5 or int(text) > 0xFFFF:
        raise ProxyHeaderError(f"PROXY v1 port out of range: {text!r}")
    return int(text)


def _parse_v2(buf: bytes | bytearray) -> ParseResult:
    if not _check_prefix(buf, V2_SIGNATURE):
        return NEED_MORE
    # Check each fixed byte as soon as it is there, so garbage is refused early.
    if len(buf) > 12 and buf[12] not in (_V2_LOCAL, _V2_PROXY):
        if buf[12] & 0xF0 != _V2_VERSION:
            raise ProxyHeaderError(f"PROXY v2 unsupported version {buf[12] >> 4}")
        raise ProxyHeaderError(f"PROXY v2 unknown command {buf[12] & 0x0F}")
    local = len(buf) > 12 and buf[12] == _V2_LOCAL
    if len(buf) > 13 and not local and buf[13] not in _V2_ADDRESS_LENGTH:
        raise ProxyHeaderError(f"PROXY v2 unknown family/transport 0x{buf[13]:02x}")
    if len(buf) < V2_FIXED_LENGTH:
        return NEED_MORE
    family = buf[13]
    length = int.from_bytes(buf[14:16], "big")
    total = V2_FIXED_LENGTH + length
    if total > V2_MAX_LENGTH:
        raise ProxyHeaderError(f"PROXY v2 header of {total} bytes exceeds {V2_MAX_LENGTH}")
    # LOCAL (health checks from the proxy itself): the spec says to ignore the
    # family and the whole block and to use the real connection endpoints.
    if local:
        return (total, None) if len(buf) >= total else NEED_MORE
    address_length = _V2_ADDRESS_LENGTH[family]
    if length < address_length:
        raise ProxyHeaderError(
            f"PROXY v2 length {length} is shorter than the address block ({address_length})"
        )
    if len(buf) < total:
        return NEED_MORE
    _check_tlvs(buf, V2_FIXED_LENGTH + address_length, total)
    if family == _V2_TCP4:
        ip = str(ipaddress.IPv4Address(bytes(buf[16:20])))
        return total, (ip, int.from_bytes(buf[24:26], "big"))
    if family == _V2_TCP6:
        ip = str(ipaddress.IPv6Address(bytes(buf[16:32])))
        return total, (ip, int.from_bytes(buf[48:50], "big"))
    # UNSPEC, Unix sockets and datagram transports name no TCP client.
    return total, None


def _check_tlvs(buf: bytes | bytearray, start: int, end: int) -> None:
    """Walk the TLVs in ``buf[start:end]`` (values are not used) and check that they tile it."""
    pos = start
    while pos < end:
        if pos + 3 > end:
            raise ProxyHeaderError("PROXY v2 TLV header runs past the header length")
        pos += 3 + int.from_bytes(buf[pos + 1 : pos + 3], "big")
        if pos > end:
            raise ProxyHeaderError("PROXY v2 TLV value runs past the header length")

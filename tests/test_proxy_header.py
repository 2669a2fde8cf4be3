"""The PROXY protocol header parser (issue 9 §4, SPEC §3 ``proxy_protocol``), with plain bytes.

Headers are built here by hand from the HAProxy specification (v1 text line,
v2 binary block) and fed whole, byte by byte, followed by request bytes, and
broken in every way the spec forbids.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flypool.http.proxy_header import (
    NEED_MORE,
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ParseResult,
    ProxyHeaderError,
    parse_proxy_header,
)
from tests.support import free_port

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def v2(
    command: int = 0x21,
    family: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    *,
    length: int | None = None,
    version: int = 0x20,
) -> bytes:
    """A v2 header; ``length`` overrides the length field (to make it lie)."""
    block = addresses + tlvs
    size = len(block) if length is None else length
    return (
        V2_SIGNATURE + bytes([version | command & 0x0F, family]) + size.to_bytes(2, "big") + block
    )


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The IPv4 address block of a v2 header."""
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The IPv6 address block of a v2 header."""
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value record."""
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def fed_byte_by_byte(header: bytes) -> ParseResult:
    """Feed ``header`` one byte more at a time; every strict prefix must ask for more."""
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is NEED_MORE, end
    return parse_proxy_header(header)


V1_VALID = [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", ("192.0.2.1", 56324)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 80\r\n", ("2001:db8::1", 65535)),
    # ipaddress normalises: the caller gets one spelling per address.
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n", ("2001:db8::1", 1)),
    (b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n", ("::ffff:c000:201", 1)),
    (b"PROXY UNKNOWN\r\n", None),
    # After UNKNOWN the receiver must ignore everything up to the CRLF.
    (b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n", None),
]

LONGEST_V1 = (
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)

V2_VALID = [
    (
        v2(family=0x11, addresses=inet4("192.0.2.1", "198.51.100.2", 56324, 443)),
        ("192.0.2.1", 56324),
    ),
    (
        v2(
            family=0x11,
            addresses=inet4("10.0.0.1", "10.0.0.2", 1, 2),
            tlvs=tlv(0x01, b"h2")
            + tlv(0x02, b"example.com")
            + tlv(0x04, b"")
            + tlv(0x20, b"\x00" * 9),
        ),
        ("10.0.0.1", 1),
    ),
    (
        v2(family=0x21, addresses=inet6("2001:db8::1", "2001:db8::2", 65535, 0)),
        ("2001:db8::1", 65535),
    ),
    (
        v2(family=0x21, addresses=inet6("::1", "::2", 8080, 80), tlvs=tlv(0x05, b"unique-id" * 14)),
        ("::1", 8080),
    ),
    # LOCAL: health checks from the proxy itself; family and block are ignored.
    (v2(command=0x20, family=0x00), None),
    (v2(command=0x20, family=0x11, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)), None),
    (v2(command=0x20, family=0xFF, addresses=b"anything"), None),
    # PROXY with a family that names no TCP client: the real peer address applies.
    (v2(family=0x00), None),
    (v2(family=0x00, tlvs=tlv(0x04, b"pad")), None),
    (
        v2(
            family=0x31,
            addresses=b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0"),
        ),
        None,
    ),
    (v2(family=0x12, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)), None),
    (v2(family=0x22, addresses=inet6("::1", "::2", 1, 2)), None),
]


class TestValid:
    @pytest.mark.parametrize(("header", "source"), V1_VALID + V2_VALID)
    def test_whole_header(self, header: bytes, source: tuple[str, int] | None) -> None:
        """A complete header gives its length and its source address."""
        assert parse_proxy_header(header) == (len(header), source)

    @pytest.mark.parametrize(("header", "source"), V1_VALID + V2_VALID)
    def test_byte_by_byte(self, header: bytes, source: tuple[str, int] | None) -> None:
        """Every strict prefix of a valid header asks for more; the whole gives the same result."""
        assert fed_byte_by_byte(header) == (len(header), source)

    @pytest.mark.parametrize(("header", "source"), V1_VALID + V2_VALID)
    def test_request_bytes_follow(self, header: bytes, source: tuple[str, int] | None) -> None:
        """Bytes after the header (the request, in one segment) are not consumed."""
        for buffer in (header + REQUEST, bytearray(header + REQUEST)):
            result = parse_proxy_header(buffer)
            assert result is not NEED_MORE
            consumed, got = result
            assert (consumed, got) == (len(header), source)
            assert buffer[consumed:] == REQUEST

    def test_longest_v1_line(self) -> None:
        """The longest line the spec allows (107 bytes) is accepted."""
        assert len(LONGEST_V1) == V1_MAX_LENGTH
        assert parse_proxy_header(LONGEST_V1 + REQUEST) == (V1_MAX_LENGTH, None)

    def test_largest_v2_header(self) -> None:
        """A v2 header of exactly the bound, padded with a NOOP TLV, is accepted."""
        addresses = inet4("192.0.2.1", "192.0.2.2", 1, 2)
        pad = V2_MAX_LENGTH - 16 - len(addresses) - 3
        header = v2(addresses=addresses, tlvs=tlv(0x04, b"\0" * pad))
        assert len(header) == V2_MAX_LENGTH
        assert parse_proxy_header(header + REQUEST) == (V2_MAX_LENGTH, ("192.0.2.1", 1))

    def test_empty_buffer(self) -> None:
        """No bytes yet: nothing to decide."""
        assert parse_proxy_header(b"") is NEED_MORE

    def test_result_narrows(self) -> None:
        """Callers tell the sentinel apart with ``is`` (the shape the listener uses)."""
        result = parse_proxy_header(b"PROXY UNKNOWN\r\n")
        assert result is not NEED_MORE
        consumed, source = result
        assert (consumed, source) == (15, None)


MALFORMED = {
    # Not a PROXY sender at all.
    "plain request": b"GET / HTTP/1.1\r\n\r\n",
    "lowercase v1": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 without space": b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "tls hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "bad v2 signature": b"\r\n\r\n\x00\r\nQUIT\r" + b"\x21\x11\x00\x0c" + b"\0" * 12,
    "crlf request": b"\r\nGET / HTTP/1.1\r\n\r\n",
    # v1 line.
    "v1 bad protocol": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 empty": b"PROXY \r\n",
    "v1 UNKNOWN glued": b"PROXY UNKNOWNX\r\n",
    "v1 double space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 trailing space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "v1 tab": b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 missing field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1 extra field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "v1 ipv6 in TCP4": b"PROXY TCP4 ::1 ::2 1 2\r\n",
    "v1 ipv4 in TCP6": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 octet > 255": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "v1 short ipv4": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v1 ipv4 leading zero": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "v1 hostname": b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
    "v1 bad dst": b"PROXY TCP4 1.2.3.4 5.6.7 1 2\r\n",
    "v1 ipv6 scope": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "v1 bad ipv6": b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n",
    "v1 port 65536": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "v1 dst port 65536": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    "v1 port six digits": b"PROXY TCP4 1.2.3.4 5.6.7.8 000001 2\r\n",
    "v1 negative port": b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    "v1 signed port": b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    "v1 hex port": b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n",
    "v1 empty port": b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n",
    "v1 non-ascii digit": "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(),
    "v1 non-ascii": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n",
    "v1 LF only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "v1 LF only, valid if a byte is cut": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 22\n",
    "v1 UNKNOWN LF only": b"PROXY UNKNOWN 1\n",
    "v1 CR then other": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n",
    "v1 CR then request": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r" + REQUEST,
    "v1 no CRLF within 107": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b"0" * 100,
    "v1 108 bytes": LONGEST_V1[:-2] + b"f\r\n",
    # v2 fixed part.
    "v2 version 1": v2(version=0x10, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)),
    "v2 version 3": v2(version=0x30, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)),
    "v2 version 0": v2(version=0x00, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)),
    "v2 command 2": v2(command=0x02, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)),
    "v2 command 15": v2(command=0x0F, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)),
    "v2 family 4": v2(family=0x41, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)),
    "v2 transport 3": v2(family=0x13, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)),
    "v2 inet unspec transport": v2(family=0x10, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)),
    "v2 unspec family stream": v2(family=0x01),
    # v2 lengths that lie.
    "v2 length 0 for inet": v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), length=0),
    "v2 length 11 for inet": v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), length=11),
    "v2 length 35 for inet6": v2(family=0x21, addresses=inet6("::1", "::2", 1, 2), length=35),
    "v2 length 215 for unix": v2(family=0x31, addresses=b"\0" * 216, length=215),
    "v2 length over bound": v2(
        addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), length=V2_MAX_LENGTH - 15
    ),
    "v2 length 65535": v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), length=0xFFFF),
    "v2 TLV header cut": v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x04\x00"),
    "v2 TLV value too long": v2(
        addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x04\x00\x05abcd"
    ),
    "v2 second TLV too long": v2(
        addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(0x01, b"h2") + b"\x02\xff\xffx"
    ),
}


class TestMalformed:
    @pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
    def test_refused(self, data: bytes) -> None:
        """A header the spec forbids raises, whatever bytes follow."""
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(data)
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(bytearray(data + REQUEST))

    @pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
    def test_refused_when_fed_byte_by_byte(self, data: bytes) -> None:
        """Fed byte by byte, a bad header asks for more, then raises and keeps raising."""
        results = []
        for end in range(len(data) + 1):
            try:
                results.append(parse_proxy_header(data[:end]))
            except ProxyHeaderError:
                break
        else:
            pytest.fail("never refused")
        assert all(result is NEED_MORE for result in results)
        for end in range(len(results), len(data) + 1):
            with pytest.raises(ProxyHeaderError):
                parse_proxy_header(data[:end])

    @pytest.mark.parametrize(
        ("data", "refused_at"),
        [
            (b"GET / HTTP/1.1\r\n", 1),
            (b"\x16\x03\x01", 1),
            (b"PROXY\t", 6),
            (b"\r\n\r\n\x00\r\nQUIT\r", 12),
            (b"\r\nGET", 3),
            # The fixed bytes of v2 are checked as they arrive.
            (v2(version=0x10), 13),
            (v2(command=0x02), 13),
            (v2(family=0x41), 14),
            # A bound broken by the length field is known before the block arrives.
            (v2(length=V2_MAX_LENGTH), 16),
            (v2(length=11), 16),
            # A CR must be followed by LF.
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", 32),
        ],
    )
    def test_refused_early(self, data: bytes, refused_at: int) -> None:
        """The parser refuses at the first byte that rules a header out, not waiting for more."""
        for end in range(refused_at):
            assert parse_proxy_header(data[:end]) is NEED_MORE, end
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(data[:refused_at])

    def test_truncated_v1_waits_until_the_bound(self) -> None:
        """A v1 line without CRLF waits up to 106 bytes and is refused at 107."""
        line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 200
        assert parse_proxy_header(line[: V1_MAX_LENGTH - 1]) is NEED_MORE
        with pytest.raises(ProxyHeaderError, match="longer than 107"):
            parse_proxy_header(line[:V1_MAX_LENGTH])

    def test_truncated_v2_waits_for_its_length(self) -> None:
        """A v2 header whose length field promises more than arrived waits for the rest."""
        header = v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(0x04, b"x" * 100))
        assert parse_proxy_header(header[:-1]) is NEED_MORE
        assert parse_proxy_header(header) == (len(header), ("1.2.3.4", 1))

    def test_error_is_a_value_error(self) -> None:
        """Callers that catch ValueError also catch a bad header."""
        assert issubclass(ProxyHeaderError, ValueError)


tlv_records = st.lists(
    st.builds(tlv, st.integers(0, 255), st.binary(max_size=300)), max_size=8
).map(b"".join)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int]]:
    """A v2 PROXY header for random TCP4/TCP6 endpoints and TLVs, and the source it carries."""
    tlvs = draw(tlv_records.filter(lambda b: len(b) <= V2_MAX_LENGTH - 16 - 36))
    ports = st.integers(0, 0xFFFF)
    sport, dport = draw(ports), draw(ports)
    if draw(st.booleans()):
        src, dst = draw(st.ip_addresses(v=4)), draw(st.ip_addresses(v=4))
        block = inet4(str(src), str(dst), sport, dport)
        family = 0x11
    else:
        src, dst = draw(st.ip_addresses(v=6)), draw(st.ip_addresses(v=6))
        block = inet6(str(src), str(dst), sport, dport)
        family = 0x21
    return v2(family=family, addresses=block, tlvs=tlvs), (str(src), sport)


class TestRoundTrip:
    @given(v2_headers(), st.binary(max_size=64))
    def test_v2(self, case: tuple[bytes, tuple[str, int]], rest: bytes) -> None:
        """Any v2 header built from addresses, ports and TLVs parses back to its source."""
        header, source = case
        assert parse_proxy_header(header + rest) == (len(header), source)

    @given(v2_headers(), st.data())
    def test_v2_split(self, case: tuple[bytes, tuple[str, int]], data: st.DataObject) -> None:
        """Any strict prefix of a v2 header asks for more."""
        header, _ = case
        cut = data.draw(st.integers(0, len(header) - 1))
        assert parse_proxy_header(header[:cut]) is NEED_MORE

    @given(
        st.one_of(
            st.tuples(st.just("TCP4"), st.ip_addresses(v=4), st.ip_addresses(v=4)),
            st.tuples(st.just("TCP6"), st.ip_addresses(v=6), st.ip_addresses(v=6)),
        ),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
    )
    def test_v1(self, addrs: tuple[str, object, object], sport: int, dport: int) -> None:
        """Any v1 TCP4/TCP6 line parses back to its source."""
        proto, src, dst = addrs
        line = f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()
        assert len(line) <= V1_MAX_LENGTH
        assert parse_proxy_header(line + REQUEST) == (len(line), (str(src), sport))


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def haproxy_to(backend: socket.socket, server_options: str, tmp_path: Path) -> Iterator[int]:
    """A HAProxy in TCP mode whose one server is ``backend``; yields its frontend port."""
    front = free_port()
    binds = f"  bind 127.0.0.1:{front}\n" + (f"  bind [::1]:{front}\n" if _ipv6_loopback() else "")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n"
        f"frontend front\n{binds}  default_backend back\n"
        "backend back\n  unique-id-format %ci:%cp_%Ts\n"
        f"  server s1 127.0.0.1:{backend.getsockname()[1]} {server_options}\n"
    )
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield front
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def client_through(front: int, family: socket.AddressFamily) -> socket.socket:
    """Connect to the frontend (retrying until HAProxy listens) and send a request."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    deadline = time.monotonic() + 10
    while True:
        client = socket.socket(family)
        client.settimeout(5)
        try:
            client.connect((host, front))
        except ConnectionRefusedError:
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        client.sendall(REQUEST)
        return client


def read_header(backend: socket.socket) -> tuple[ParseResult, bytes]:
    """Accept one connection from HAProxy; parse its header as bytes arrive; return what follows."""
    conn, _ = backend.accept()
    with conn:
        conn.settimeout(5)
        data = b""
        result: ParseResult = NEED_MORE
        while result is NEED_MORE:
            chunk = conn.recv(4096)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
            result = parse_proxy_header(data)
        consumed = result[0]
        while len(data) - consumed < len(REQUEST):
            try:
                chunk = conn.recv(4096)
            except ConnectionResetError:  # health checks reset once connected
                break
            if not chunk:
                break
            data += chunk
        return result, data[consumed:]


@pytest.fixture
def backend() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.settimeout(10)
        yield s


@pytest.mark.skipif(not os.path.exists(HAPROXY), reason="haproxy not installed")
class TestAgainstHAProxy:
    @pytest.mark.parametrize(
        ("options", "family", "least_length"),
        [
            ("send-proxy", socket.AF_INET, 0),
            ("send-proxy", socket.AF_INET6, 0),
            ("send-proxy-v2", socket.AF_INET, 16 + 12),
            ("send-proxy-v2", socket.AF_INET6, 16 + 36),
            # unique-id adds a TLV after the address block.
            ("send-proxy-v2 proxy-v2-options unique-id", socket.AF_INET, 16 + 12 + 3),
            ("send-proxy-v2 proxy-v2-options unique-id", socket.AF_INET6, 16 + 36 + 3),
        ],
        ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6", "v2-ipv4-tlv", "v2-ipv6-tlv"],
    )
    def test_client_address(
        self,
        backend: socket.socket,
        tmp_path: Path,
        options: str,
        family: socket.AddressFamily,
        least_length: int,
    ) -> None:
        """The header HAProxy writes carries the client's address; the request follows intact."""
        if family == socket.AF_INET6 and not _ipv6_loopback():
            pytest.skip("no IPv6 loopback")
        with (
            haproxy_to(backend, options, tmp_path) as front,
            client_through(front, family) as client,
        ):
            result, rest = read_header(backend)
            ip, port = client.getsockname()[:2]
        assert result is not NEED_MORE
        consumed, source = result
        assert consumed >= least_length
        assert source == (ip, port)
        assert rest == REQUEST

    def test_v2_health_check_is_local(self, backend: socket.socket, tmp_path: Path) -> None:
        """HAProxy's v2 health checks send LOCAL: no client address."""
        with haproxy_to(backend, "send-proxy-v2 check check-send-proxy inter 100ms", tmp_path):
            result, _ = read_header(backend)
        assert result == (16, None)

    def test_v1_health_check(self, backend: socket.socket, tmp_path: Path) -> None:
        """HAProxy's v1 health checks send a TCP4 line with its own address."""
        with haproxy_to(backend, "send-proxy check check-send-proxy inter 100ms", tmp_path):
            result, _ = read_header(backend)
        assert result is not NEED_MORE
        assert result[1] is not None
        assert result[1][0] == "127.0.0.1"

"""Hostile HTTP/1.1 clients against the daemon's front side (SPEC §9 "HTTP edges").

One daemon serves the whole module. Every case sends raw bytes to the front
socket and checks what came back (the daemon's own error, a worker's answer
or a silent close) and whether a worker processed the request (the sum of the
workers' ``processed`` counters; forwarded requests go to the example's
``/headers``, which echoes what it received). After every test the daemon
must still be running and answer a plain ``GET /`` with 200.

Several cases were daemon bugs when this file was written (request smuggling
through leading blank lines, raw forwarding of request lines llhttp merely
tolerates, HTTP/1.0 chunked framing, data after ``Connection: close``, a bad
pipelined request costing the good one before it, upgrade leftovers,
``Expect: 100-continue`` with held bodies, half-closed clients); they now
guard those fixes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support import Daemon, eventually, get, running_daemon

APP = {"workers": 2, "worker_concurrency": 0}
DAEMON = {
    "max_header_size": "8KB",
    "header_timeout": "2s",
    "body_timeout": "2s",
    "keepalive_timeout": "3s",
}
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 3.0
SLACK = 1.5
"""The daemon's timeout sweeper runs about once a second."""
EARLY = 0.2
"""How much earlier than configured a timeout may fire (clock granularity)."""

CLOSE = b"Connection: close\r\n"
HOST = b"Host: x\r\n"


# -- talking to the front socket ---------------------------------------------------------


@dataclass
class Response:
    """One parsed HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def from_worker(self) -> bool:
        """Whether a worker produced it (the example adds X-Worker-Pid)."""
        return "x-worker-pid" in self.headers

    @property
    def from_daemon(self) -> bool:
        """Whether the daemon answered itself."""
        return not self.from_worker and self.headers.get("server") == "flypool"

    def echo(self) -> dict[str, Any]:
        """The example's ``/headers`` JSON."""
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Exchange:
    """What one connection got back."""

    raw: bytes
    closed: bool
    elapsed: float
    responses: list[Response] = field(default_factory=list)

    @property
    def finals(self) -> list[Response]:
        """Responses other than 1xx."""
        return [r for r in self.responses if r.status >= 200]

    def __str__(self) -> str:
        return f"closed={self.closed} elapsed={self.elapsed:.2f}s raw={self.raw[:800]!r}"


def parse_responses(buf: bytes) -> list[Response]:
    """The complete responses at the start of ``buf`` (Content-Length framing only)."""
    out: list[Response] = []
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return out
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            return out
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(parts[1])
        length = 0 if status < 200 else int(headers.get("content-length", "0"))
        if len(buf) < end + 4 + length:
            return out
        out.append(Response(status, headers, buf[end + 4 : end + 4 + length]))
        buf = buf[end + 4 + length :]


def connect(path: str) -> socket.socket:
    """A connection to a Unix socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5.0)
    s.connect(path)
    return s


def send(s: socket.socket, data: bytes) -> bool:
    """Send all of ``data``; False if the daemon closed the connection meanwhile."""
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def read(s: socket.socket, timeout: float, until: int | None = None) -> tuple[bytes, bool]:
    """Read until the peer closes, ``until`` final responses arrived, or ``timeout``."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    closed = False
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            b = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = True
            break
        if not b:
            closed = True
            break
        chunks.append(b)
        if until is not None:
            got = parse_responses(b"".join(chunks))
            if sum(r.status >= 200 for r in got) >= until:
                break
    return b"".join(chunks), closed


def exchange(
    path: str,
    data: bytes | Sequence[bytes],
    *,
    timeout: float = 2.0,
    until: int | None = None,
    gap: float = 0.0,
    eof: bool = False,
) -> Exchange:
    """Send ``data`` (pieces ``gap`` seconds apart), then read; see `read`."""
    pieces = [data] if isinstance(data, bytes) else list(data)
    t0 = time.monotonic()
    with connect(path) as s:
        for i, piece in enumerate(pieces):
            if i and gap:
                time.sleep(gap)
            if not send(s, piece):
                break
        if eof:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        raw, closed = read(s, timeout, until)
    return Exchange(raw, closed, time.monotonic() - t0, parse_responses(raw))


def processed(d: Daemon) -> int:
    """Requests the workers answered through the daemon, in total."""
    return sum(w["processed"] for w in d.app()["workers"])


def sessions(d: Daemon) -> int:
    """Requests in flight on the workers, in total."""
    return sum(w["sessions"] for w in d.app()["workers"])


def assert_serving(d: Daemon) -> None:
    """The daemon runs and answers a plain GET / with 200."""
    assert d.proc.poll() is None, f"daemon died:\n{d.log()[-3000:]}"
    status, body, _ = get(d.front, timeout=5.0)
    assert status == 200, body


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """One daemon for the whole module."""
    with running_daemon(APP, daemon=DAEMON) as dm:
        yield dm


@pytest.fixture
def d(daemon: Daemon) -> Iterator[Daemon]:
    """The module's daemon, checked alive and serving after the test."""
    assert_serving(daemon)
    yield daemon
    assert_serving(daemon)


# -- table of single requests -----------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """The outcomes a case may have; any one of them passes.

    ``daemon``: the daemon answers one of these statuses itself, closes the
    connection and no worker processes anything. ``echo``: the request is
    forwarded and the worker's ``/headers`` echo contains these items.
    ``worker``: forwarded, and the worker answers one of these statuses.
    """

    daemon: tuple[int, ...] = ()
    echo: Mapping[str, Any] | None = None
    worker: tuple[int, ...] = ()


REJECT = Expect(daemon=(400,))


def check(ex: Exchange, forwarded: int, expect: Expect) -> None:
    """Assert that an exchange had one of the outcomes ``expect`` allows."""
    finals = ex.finals
    assert len(finals) == 1, f"expected exactly one response, got {ex}"
    r = finals[0]
    if r.from_daemon:
        assert r.status in expect.daemon, f"daemon answered {r.status}; allowed {expect}: {ex}"
        assert forwarded == 0, f"daemon answered {r.status} but {forwarded} processed: {ex}"
        assert ex.closed, f"connection left open after the daemon's {r.status}: {ex}"
        return
    assert r.from_worker, f"response from neither daemon nor worker: {ex}"
    assert forwarded == 1, f"worker answered but processed grew by {forwarded}: {ex}"
    if r.status == 200 and expect.echo is not None:
        echo = r.echo()
        for key, value in expect.echo.items():
            assert echo[key] == value, f"worker got {key}={echo[key]!r}, not {value!r}: {ex}"
    else:
        assert r.status in expect.worker, f"worker answered {r.status}; allowed {expect}: {ex}"


def post(headers: bytes, body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """A POST /headers with Host, Connection: close, ``headers`` and ``body``."""
    return b"POST /headers " + version + b"\r\n" + HOST + CLOSE + headers + b"\r\n" + body


def chunked(body: bytes) -> bytes:
    """A POST /headers whose chunked body is ``body`` (raw chunk framing)."""
    return post(b"Transfer-Encoding: chunked\r\n", body)


def headers_echo(*pairs: tuple[str, str]) -> Expect:
    """Forwarded: the worker sees exactly Host and ``pairs`` (Connection is hop-by-hop)."""
    return Expect(echo={"headers": [["Host", "x"], *map(list, pairs)]})


def get_headers(extra: bytes) -> bytes:
    """A GET /headers with Host, ``extra`` header lines and Connection: close."""
    return b"GET /headers HTTP/1.1\r\n" + HOST + extra + CLOSE + b"\r\n"


MANY = b"".join(b"X-%d: v\r\n" % i for i in range(500))
FIFTY = b"".join(b"X-%d: v\r\n" % i for i in range(50))
HUNDRED = b"".join(b"X-%d: v\r\n" % i for i in range(98))  # + Host and Connection: 100
HUNDRED_AND_ONE = HUNDRED + b"X-Last: v\r\n"
VERSION_REFUSED = Expect(daemon=(400, 505))

CASES = [
    # Request lines.
    pytest.param(b"GARBAGE\r\n\r\n", REJECT, id="garbage"),
    pytest.param(b"GET\r\n\r\n", REJECT, id="method-only"),
    pytest.param(b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", VERSION_REFUSED, id="version-9.9"),
    pytest.param(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", VERSION_REFUSED, id="version-1.2"),
    pytest.param(b"GET / http/1.1\r\nHost: x\r\n\r\n", REJECT, id="version-lowercase"),
    pytest.param(
        b"GET /headers HTTP/2.0\r\n" + HOST + CLOSE + b"\r\n",
        VERSION_REFUSED,
        id="version-2.0",
    ),
    pytest.param(
        b"GET /headers HTTP/0.9\r\n" + HOST + CLOSE + b"\r\n",
        VERSION_REFUSED,
        id="version-0.9",
    ),
    pytest.param(
        b"GET /headers\r\n" + HOST + CLOSE + b"\r\n",
        VERSION_REFUSED,
        id="version-missing",
    ),
    pytest.param(
        b"GET  /headers HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n",
        Expect(daemon=(400,), echo={"target": "/headers", "version": "HTTP/1.1"}),
        id="double-space-before-target",
    ),
    pytest.param(
        b"GET /headers  HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n",
        Expect(daemon=(400,), echo={"target": "/headers", "version": "HTTP/1.1"}),
        id="double-space-before-version",
    ),
    pytest.param(b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", REJECT, id="space-after-version"),
    pytest.param(b"GET\t/\tHTTP/1.1\r\nHost: x\r\n\r\n", REJECT, id="tab-separators"),
    pytest.param(b"get / HTTP/1.1\r\nHost: x\r\n\r\n", REJECT, id="lowercase-method"),
    pytest.param(b"A" * 5000 + b" / HTTP/1.1\r\nHost: x\r\n\r\n", REJECT, id="long-method"),
    pytest.param(b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", REJECT, id="control-in-target"),
    pytest.param(b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", REJECT, id="space-in-target"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", REJECT, id="http2-preface"),
    pytest.param(
        b"\r\nGET /headers HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n",
        Expect(echo={"target": "/headers", "headers": [["Host", "x"]]}),
        id="one-leading-empty-line",
    ),
    pytest.param(
        b"\r\n\r\nGET /headers HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n",
        Expect(daemon=(400,), echo={"target": "/headers"}),
        id="two-leading-empty-lines",
    ),
    # Header bytes.
    pytest.param(get_headers(b"X-A: a\x00b\r\n"), REJECT, id="nul-in-value"),
    pytest.param(get_headers(b"X-A: a\x01b\r\n"), REJECT, id="control-in-value"),
    pytest.param(get_headers(b"X-A: a\x7fb\r\n"), REJECT, id="del-in-value"),
    pytest.param(b"GET /headers HTTP/1.1\r\nHost : x\r\n\r\n", REJECT, id="space-before-colon"),
    pytest.param(get_headers(b"X-A\t: a\r\n"), REJECT, id="tab-before-colon"),
    pytest.param(get_headers(b"X(A): a\r\n"), REJECT, id="paren-in-name"),
    pytest.param(get_headers(b": a\r\n"), REJECT, id="empty-name"),
    pytest.param(get_headers(b"NoColon\r\n"), REJECT, id="no-colon"),
    pytest.param(b"GET /headers HTTP/1.1\nHost: x\n\n", REJECT, id="bare-lf"),
    pytest.param(b"GET /headers HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n", REJECT, id="one-bare-lf"),
    pytest.param(b"GET /headers HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n", REJECT, id="bare-cr"),
    pytest.param(
        get_headers(b"X-A: a\r\n b\r\n"),
        Expect(daemon=(400,), echo=headers_echo(("X-A", "a b")).echo),
        id="obs-fold",
    ),
    pytest.param(get_headers(b"X-A: a\xffb\r\n"), headers_echo(("X-A", "a\xffb")), id="obs-text"),
    pytest.param(get_headers(b"X-A: a\tb\r\n"), headers_echo(("X-A", "a\tb")), id="tab-in-value"),
    pytest.param(
        b"GET /headers HTTP/1.1\r\n" + CLOSE + b"\r\n",
        Expect(echo={"headers": []}),
        id="missing-host",
    ),
    # Framing: Content-Length.
    pytest.param(
        post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        REJECT,
        id="cl-then-te",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        REJECT,
        id="te-then-cl",
    ),
    pytest.param(
        post(b"Content-Length: 3\r\nTransfer-Encoding: identity\r\n", b"abc"),
        REJECT,
        id="cl-and-te-identity",
    ),
    pytest.param(
        post(b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd"), REJECT, id="cl-3-and-4"
    ),
    pytest.param(post(b"Content-Length: 3, 4\r\n", b"abcd"), REJECT, id="cl-list-3-4"),
    # RFC 9110 §8.6 allows refusing or merging identical values; llhttp refuses.
    pytest.param(
        post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
        Expect(daemon=(400,), echo={"body_bytes": 3}),
        id="cl-3-and-3",
    ),
    pytest.param(
        post(b"Content-Length: 3, 3\r\n", b"abc"),
        Expect(daemon=(400,), echo={"body_bytes": 3}),
        id="cl-list-3-3",
    ),
    pytest.param(post(b"Content-Length: -1\r\n", b""), REJECT, id="cl-negative"),
    pytest.param(
        post(b"Content-Length: 99999999999999999999999\r\n", b""), REJECT, id="cl-overflow"
    ),
    pytest.param(post(b"Content-Length: +5\r\n", b"abcde"), REJECT, id="cl-plus-sign"),
    pytest.param(post(b"Content-Length: 0x3\r\n", b"abc"), REJECT, id="cl-hex"),
    pytest.param(post(b"Content-Length: 1 2\r\n", b"abc"), REJECT, id="cl-inner-space"),
    pytest.param(
        post(b"Content-Length: 003\r\n", b"abc"), Expect(echo={"body_bytes": 3}), id="cl-zeros"
    ),
    # Framing: Transfer-Encoding.
    pytest.param(
        post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"), REJECT, id="te-not-last"
    ),
    pytest.param(post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), REJECT, id="te-xchunked"),
    pytest.param(post(b"Transfer-Encoding: gzip\r\n", b"0\r\n\r\n"), REJECT, id="te-gzip"),
    pytest.param(post(b"Transfer-Encoding: \r\n", b""), REJECT, id="te-empty"),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        REJECT,
        id="te-chunked-twice",
    ),
    # llhttp frames these as chunked (the last coding) and the raw head goes on;
    # the example worker, which only takes a plain "chunked", refuses them.
    pytest.param(
        post(b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n"),
        Expect(daemon=(400, 501), worker=(400,)),
        id="te-identity-chunked",
    ),
    pytest.param(
        post(b"Transfer-Encoding: ,chunked\r\n", b"0\r\n\r\n"),
        Expect(daemon=(400, 501), worker=(400,)),
        id="te-empty-list-element",
    ),
    pytest.param(
        post(b"Transfer-Encoding: CHUNKED\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
        Expect(echo={"body_bytes": 3}),
        id="te-uppercase",
    ),
    pytest.param(
        post(b"Transfer-Encoding:\tchunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
        Expect(echo={"body_bytes": 3}),
        id="te-tab-ows",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"HTTP/1.0"),
        REJECT,
        id="te-on-http10",
    ),
    pytest.param(
        post(b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"abc", b"HTTP/1.0"),
        REJECT,
        id="cl-and-te-on-http10",
    ),
    # Chunked bodies.
    pytest.param(chunked(b"zz\r\nabc\r\n0\r\n\r\n"), REJECT, id="chunk-size-not-hex"),
    pytest.param(chunked(b"-3\r\nabc\r\n0\r\n\r\n"), REJECT, id="chunk-size-negative"),
    pytest.param(chunked(b"f" * 21 + b"\r\nabc\r\n0\r\n\r\n"), REJECT, id="chunk-size-huge"),
    pytest.param(chunked(b"3 \r\nabc\r\n0\r\n\r\n"), REJECT, id="chunk-size-space"),
    pytest.param(chunked(b"3\r\nabcXX0\r\n\r\n"), REJECT, id="chunk-data-no-crlf"),
    pytest.param(chunked(b"3;a=\x01\x7f\r\nabc\r\n0\r\n\r\n"), REJECT, id="chunk-ext-control"),
    pytest.param(chunked(b"3\nabc\n0\n\n"), REJECT, id="chunk-bare-lf"),
    pytest.param(
        chunked(b"3;a=b\r\nabc\r\n0\r\n\r\n"), Expect(echo={"body_bytes": 3}), id="chunk-ext"
    ),
    pytest.param(
        chunked(b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"),
        Expect(echo={"body_bytes": 3}),
        id="chunk-trailer",
    ),
    # Sizes.
    pytest.param(
        get_headers(b"X-Big: " + b"a" * 9000 + b"\r\n"), Expect(daemon=(431,)), id="head-9000"
    ),
    pytest.param(get_headers(FIFTY), Expect(echo={"method": "GET"}), id="50-headers"),
    # The header count limit is 100 (client.MAX_HEADERS).
    pytest.param(get_headers(HUNDRED), Expect(echo={"method": "GET"}), id="100-headers"),
    pytest.param(get_headers(HUNDRED_AND_ONE), Expect(daemon=(431,)), id="101-headers"),
    pytest.param(get_headers(MANY), Expect(daemon=(431,)), id="500-headers"),
    # Targets and methods.
    pytest.param(
        b"GET http://example.com/headers HTTP/1.1\r\nHost: example.com\r\n" + CLOSE + b"\r\n",
        Expect(echo={"target": "http://example.com/headers"}),
        id="absolute-form",
    ),
    pytest.param(
        b"OPTIONS * HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n",
        Expect(worker=(200,)),
        id="asterisk-form",
    ),
    # Issue 9 §2 i: strictness where ambiguity could reach a worker (SPEC §9).
    pytest.param(b"GET * HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n", REJECT, id="asterisk-get"),
    pytest.param(b"POST * HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n", REJECT, id="asterisk-post"),
    pytest.param(get_headers(b"Host: y\r\n"), REJECT, id="two-hosts"),
    pytest.param(get_headers(b"host: x\r\n"), REJECT, id="two-hosts-same-value"),
    pytest.param(get_headers(b"X-A: a\x07b\r\n"), REJECT, id="bel-in-value"),
    pytest.param(get_headers(b"X-A: \x7f\r\n"), REJECT, id="del-in-value-alone"),
    pytest.param(
        post(b"Content-Length: 3\r\nTransfer_Encoding: chunked\r\n", b"abc"),
        Expect(echo={"body_bytes": 3, "headers": [["Host", "x"], ["Content-Length", "3"]]}),
        id="underscore-transfer-encoding-dropped",
    ),
    pytest.param(
        post(b"Content_Length: 5\r\n", b""),
        Expect(echo={"body_bytes": 0, "headers": [["Host", "x"]]}),
        id="underscore-content-length-dropped",
    ),
    pytest.param(
        get_headers(b"X_Custom: 1\r\nX-Ok: 2\r\n"),
        headers_echo(("X-Ok", "2")),
        id="underscore-name-dropped",
    ),
    pytest.param(
        get_headers(
            b"Connection: X-Secret, Keep-Alive\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
            b"TE: trailers\r\nProxy-Connection: keep-alive\r\nX-Kept: 2\r\n"
        ),
        headers_echo(("X-Kept", "2")),
        id="hop-by-hop-not-forwarded",
    ),
    pytest.param(
        get_headers(b"Upgrade: h2c\r\nX-Kept: 2\r\n"),
        headers_echo(("X-Kept", "2")),
        id="upgrade-without-connection-not-forwarded",
    ),
    pytest.param(
        chunked(b"5; a; b=c\r\nhello\r\n0\r\n\r\n"),
        Expect(echo={"body_bytes": 5}),
        id="chunk-ext-list-with-spaces",
    ),
    pytest.param(
        chunked(b"5 ; a=b\r\nhello\r\n0\r\n\r\n"),
        Expect(echo={"body_bytes": 5}),
        id="chunk-ext-space-before-semicolon",
    ),
    pytest.param(
        chunked(b'5;a="q \\" s"\r\nhello\r\n0\r\n\r\n'),
        Expect(echo={"body_bytes": 5}),
        id="chunk-ext-quoted",
    ),
    pytest.param(chunked(b"5;\r\nhello\r\n0\r\n\r\n"), REJECT, id="chunk-ext-empty"),
    pytest.param(chunked(b"5; =b\r\nhello\r\n0\r\n\r\n"), REJECT, id="chunk-ext-no-name"),
]


@pytest.mark.parametrize(("data", "expect"), CASES)
def test_hostile_request(d: Daemon, data: bytes, expect: Expect) -> None:
    """A hostile request gets the expected answer and reaches a worker only if it should."""
    before = processed(d)
    ex = exchange(d.front, data)
    check(ex, processed(d) - before, expect)


def test_split_head_over_limit_is_431(d: Daemon) -> None:
    """A head over max_header_size sent in small pieces is answered 431 before its end."""
    before = processed(d)
    pieces = [b"GET / HTTP/1.1\r\nHost: x\r\n"] + [b"X-Big: " + b"a" * 1000 + b"\r\n"] * 12
    ex = exchange(d.front, pieces, gap=0.01)
    check(ex, processed(d) - before, Expect(daemon=(431,)))


def test_no_smuggling_through_leading_empty_lines(d: Daemon) -> None:
    """A body after a head preceded by empty lines is never parsed as a request by the worker."""
    inner = b"GET /headers?smuggled HTTP/1.1\r\nHost: x\r\nX-S: 1\r\n\r\n"
    data = (
        b"\r\n\r\nPOST /headers?outer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        % len(inner)
        + inner
    )
    ex = exchange(d.front, data, until=1)
    assert len(ex.finals) == 1, ex
    r = ex.finals[0]
    if r.from_daemon:
        assert r.status == 400, ex
        return
    echo = r.echo()
    assert (echo["method"], echo["target"]) == ("POST", "/headers?outer"), ex
    assert echo["body_bytes"] == len(inner), ex


# -- pipelining and connection handling ---------------------------------------------------


def test_pipelined_gets_answered_in_order(d: Daemon) -> None:
    """Three GETs in one write get three answers in request order, whatever each one's delay."""
    before = processed(d)
    data = b"".join(
        b"GET /headers?n=%d&delay=%s HTTP/1.1\r\nHost: x\r\n%s\r\n"
        % (n, delay, CLOSE if n == 3 else b"")
        for n, delay in ((1, b"0.2"), (2, b"0.1"), (3, b"0"))
    )
    ex = exchange(d.front, data, timeout=5.0)
    assert [r.status for r in ex.finals] == [200, 200, 200], ex
    targets = [r.echo()["target"] for r in ex.finals]
    assert targets == [f"/headers?n={n}&delay={t}" for n, t in ((1, 0.2), (2, 0.1), (3, 0))]
    assert ex.closed, ex
    assert processed(d) - before == 3


def test_pipelined_requests_with_bodies(d: Daemon) -> None:
    """Pipelined requests with Content-Length and chunked bodies keep their framing and order."""
    before = processed(d)
    data = (
        b"POST /headers?n=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /headers?n=2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nwxyz\r\n2\r\n12\r\n0\r\n\r\n"
        b"GET /headers?n=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    ex = exchange(d.front, data)
    echoes = [r.echo() for r in ex.finals]
    assert [(e["target"], e["body_bytes"]) for e in echoes] == [
        ("/headers?n=1", 3),
        ("/headers?n=2", 6),
        ("/headers?n=3", 0),
    ], ex
    assert ex.closed, ex
    assert processed(d) - before == 3


@pytest.mark.parametrize("gap", [0.0, 0.1], ids=["same-write", "later-write"])
def test_bytes_after_connection_close_are_ignored(d: Daemon, gap: float) -> None:
    """After a 'Connection: close' request, the first is answered and further bytes ignored."""
    before = processed(d)
    first = b"GET /headers?n=1&delay=0.3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    second = b"GET /headers?n=2 HTTP/1.1\r\nHost: x\r\n\r\n"
    ex = exchange(d.front, [first + second] if not gap else [first, second], gap=gap)
    assert [r.status for r in ex.finals] == [200], ex
    assert ex.finals[0].echo()["target"] == "/headers?n=1&delay=0.3", ex
    assert ex.closed, ex
    assert processed(d) - before == 1


@pytest.mark.parametrize("gap", [0.0, 0.1], ids=["same-write", "later-write"])
def test_garbage_after_valid_request(d: Daemon, gap: float) -> None:
    """A valid request followed by garbage is answered first; then 400 (or a close)."""
    before = processed(d)
    first = b"GET /headers?n=1&delay=0.3 HTTP/1.1\r\nHost: x\r\n\r\n"
    garbage = b"GARBAGE\r\n\r\n"
    ex = exchange(d.front, [first + garbage] if not gap else [first, garbage], gap=gap)
    assert ex.finals, ex
    assert ex.finals[0].status == 200, ex
    assert [r.status for r in ex.finals[1:]] in ([], [400]), ex
    assert ex.closed, ex
    assert processed(d) - before == 1


def _read_head(s: socket.socket, timeout: float) -> bytes:
    """Read until one response head (ending in an empty line) arrived."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf and (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            b = s.recv(65536)
        except TimeoutError:
            break
        if not b:
            break
        buf += b
    return buf


def test_expect_100_continue(d: Daemon) -> None:
    """'Expect: 100-continue': the 100 is relayed before the body is sent, then the answer."""
    before = processed(d)
    with connect(d.front) as s:
        s.sendall(
            b"POST /headers HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\n"
        )
        interim = _read_head(s, 2.0)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        s.sendall(b"abcde")
        raw, closed = read(s, 2.0)
    finals = [r for r in parse_responses(interim + raw) if r.status >= 200]
    assert [r.status for r in finals] == [200], raw
    assert finals[0].echo()["body_bytes"] == 5
    assert closed
    assert processed(d) - before == 1


def test_http10_without_keepalive_closes(d: Daemon) -> None:
    """An HTTP/1.0 request without keep-alive is answered, then the connection closes."""
    ex = exchange(d.front, b"GET /headers HTTP/1.0\r\n\r\n")
    assert [r.status for r in ex.finals] == [200], ex
    assert ex.finals[0].echo()["version"] == "HTTP/1.0"
    assert ex.closed and ex.elapsed < 1.0, ex


def test_http10_keepalive_keeps_connection(d: Daemon) -> None:
    """HTTP/1.0 with 'Connection: keep-alive' keeps the connection for a second request."""
    with connect(d.front) as s:
        s.sendall(b"GET /headers?n=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        raw, closed = read(s, 2.0, until=1)
        [first] = parse_responses(raw)
        assert first.status == 200 and not closed, raw
        assert first.headers.get("connection", "").lower() == "keep-alive", raw
        s.sendall(b"GET /headers?n=2 HTTP/1.0\r\n\r\n")
        raw, closed = read(s, 2.0)
    [second] = parse_responses(raw)
    assert second.echo()["target"] == "/headers?n=2"
    assert closed


def test_connect_method_never_crashes(d: Daemon) -> None:
    """CONNECT gets at most one answer and no tunnel: the connection closes after it."""
    ex = exchange(d.front, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert len(ex.finals) <= 1, ex
    assert ex.closed, ex


def test_bytes_after_upgrade_head_reach_the_tunnel(d: Daemon) -> None:
    """Tunnel bytes sent in the same write as the upgrade head are relayed to the worker."""
    with connect(d.front) as s:
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nHELLO"
        )
        deadline = time.monotonic() + 2.0
        buf = b""
        while not buf.endswith(b"HELLO") and (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                b = s.recv(65536)
            except TimeoutError:
                break
            if not b:
                break
            buf += b
    assert buf.startswith(b"HTTP/1.1 101"), buf
    assert buf.endswith(b"\r\n\r\nHELLO"), buf


@pytest.mark.parametrize(
    "head",
    [
        b"POST /headers HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n",
        b"CONNECT /headers HTTP/1.1\r\nHost: x\r\n",
    ],
    ids=["upgrade", "connect"],
)
def test_upgrade_request_with_body_is_answered(d: Daemon, head: bytes) -> None:
    """An upgrade or CONNECT request with a body is answered, not left hanging."""
    ex = exchange(d.front, head + b"Content-Length: 3\r\n\r\nabc", until=1)
    assert len(ex.finals) == 1, ex


def test_request_then_half_close_is_answered(d: Daemon) -> None:
    """A complete request followed by a half-close (SHUT_WR) still gets its answer."""
    ex = exchange(d.front, b"GET /headers?n=1&delay=0.1 HTTP/1.1\r\nHost: x\r\n\r\n", eof=True)
    assert [r.status for r in ex.finals] == [200], ex
    assert ex.closed, ex


def test_half_close_answers_a_pipelined_request_sent_while_the_first_is_in_flight(
    d: Daemon,
) -> None:
    """Two requests, the second sent while the first is with a worker, then SHUT_WR: two answers."""
    before = processed(d)
    with connect(d.front) as s:
        s.sendall(b"GET /headers?n=1&delay=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        eventually(lambda: sessions(d) >= 1, 2.0, what="first request with a worker")
        s.sendall(b"GET /headers?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        raw, closed = read(s, 5.0)
    got = parse_responses(raw)
    assert [r.echo()["target"] for r in got] == ["/headers?n=1&delay=0.5", "/headers?n=2"], raw
    assert closed
    assert processed(d) - before == 2


def test_half_close_after_three_pipelined_requests_in_one_write(d: Daemon) -> None:
    """Three pipelined GETs and SHUT_WR in one go: all three answered in order, then close."""
    data = b"".join(b"GET /headers?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in (1, 2, 3))
    ex = exchange(d.front, data, timeout=5.0, eof=True)
    assert [r.echo()["target"] for r in ex.finals] == [f"/headers?n={n}" for n in (1, 2, 3)], ex
    assert ex.closed, ex


# -- timeouts -------------------------------------------------------------------------------


def test_slowloris_heads_time_out_without_blocking(d: Daemon) -> None:
    """50 unfinished heads hold no worker, others are served, and each gets 408 in time."""
    t0 = time.monotonic()
    slow = [connect(d.front) for _ in range(50)]
    try:
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(5):
            t = time.monotonic()
            assert get(d.front, timeout=5.0)[0] == 200
            assert time.monotonic() - t < 0.5
        assert sessions(d) == 0
        deadline = t0 + HEADER_TIMEOUT + SLACK
        results = []
        for s in slow:
            raw, closed = read(s, max(0.0, deadline - time.monotonic()))
            results.append((raw, closed, time.monotonic() - t0))
    finally:
        for s in slow:
            s.close()
    assert all(closed for _, closed, _ in results), results[:3]
    assert {raw.split(b"\r\n", 1)[0] for raw, _, _ in results} <= {
        b"HTTP/1.1 408 Request Timeout",
        b"",
    }
    first = min(t for _, _, t in results)
    last = max(t for _, _, t in results)
    assert first >= HEADER_TIMEOUT - EARLY, (first, last)
    assert last <= HEADER_TIMEOUT + SLACK, (first, last)


def test_trickled_head_times_out(d: Daemon) -> None:
    """A head trickled in small pieces still gets 408 in time: new bytes don't extend it."""
    t0 = time.monotonic()
    with connect(d.front) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        raw, closed = b"", False
        n = 0
        while time.monotonic() - t0 < HEADER_TIMEOUT + SLACK + 0.5:
            if not send(s, b"X-%d: v\r\n" % n):
                break
            n += 1
            raw, closed = read(s, 0.25)
            if raw or closed:
                break
        elapsed = time.monotonic() - t0
    assert closed, raw
    assert raw.startswith(b"HTTP/1.1 408") or not raw, raw
    assert HEADER_TIMEOUT - EARLY <= elapsed <= HEADER_TIMEOUT + SLACK, elapsed


def test_idle_keepalive_connection_closes(d: Daemon) -> None:
    """An idle keep-alive connection is closed after keepalive_timeout."""
    with connect(d.front) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw, closed = read(s, 2.0, until=1)
        assert parse_responses(raw)[0].status == 200 and not closed
        t0 = time.monotonic()
        raw, closed = read(s, KEEPALIVE_TIMEOUT + SLACK + 0.5)
        elapsed = time.monotonic() - t0
    assert closed and raw == b"", raw
    assert KEEPALIVE_TIMEOUT - EARLY <= elapsed <= KEEPALIVE_TIMEOUT + SLACK, elapsed


def test_stalled_body_times_out_and_releases_worker(d: Daemon) -> None:
    """10 of 100 body bytes then nothing: 408 within body_timeout, and the worker slot is freed."""
    before = processed(d)
    t0 = time.monotonic()
    with connect(d.front) as s:
        s.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        time.sleep(0.3)
        assert sessions(d) == 0, "a stalled body holds a worker"
        raw, closed = read(s, BODY_TIMEOUT + SLACK + 0.5)
        elapsed = time.monotonic() - t0
    [r] = parse_responses(raw)
    assert r.status == 408 and r.from_daemon and closed, raw
    assert BODY_TIMEOUT - EARLY <= elapsed <= BODY_TIMEOUT + SLACK, elapsed
    eventually(lambda: sessions(d) == 0, 2.0, what="worker sessions back to 0")
    assert processed(d) == before


# -- fuzzing ------------------------------------------------------------------------------


def _mostly(good: bytes, *bad: bytes, weight: int = 4) -> st.SearchStrategy[bytes]:
    """``good`` ``weight`` times out of ``weight + 1``, else one of ``bad``."""
    return st.sampled_from([good] * weight * len(bad) + list(bad))


_BAD_EOL = st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r", b"", b"\r\n\r\n", b"\r\n "])
_CL = st.one_of(
    st.integers(-3, 80).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"+5", b"0x10", b"1e3", b"9" * 23, b" 5", b"5 5", b"5,5", b"5, 6"]),
)
_TE = _mostly(
    b"chunked",
    *(b"chunked, identity", b"identity, chunked", b"xchunked", b"gzip, chunked", b"CHUNKED"),
    *(b" chunked", b"chunked\x00", b"", b",chunked", b"chunked, chunked"),
)
_GOOD_HEADERS = st.sampled_from(
    [
        *(b"X-A: b", b"Accept: */*", b"Connection: keep-alive", b"Expect: 100-continue"),
        *(b"User-Agent: fuzz", b"X-Obs: \xff", b"Cookie: a=b; c=d", b"X-Empty:"),
    ]
)
_BAD_HEADERS = st.sampled_from(
    [
        *(b"Upgrade: foo", b"Connection: Upgrade", b"X-Fold: a\r\n b", b"X-Nul: a\x00b"),
        *(b"Host : x", b": v", b"NoColon", b"Transfer-Encoding: chunked", b"X-A\t: b"),
        *(b"Content-Length: 3", b"Content-Length: 0", b"X-Ctl: \x01", b"X-Big: " + b"a" * 9000),
    ]
)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """Chunked bodies, mostly well framed, sometimes with wrong sizes or line endings."""
    parts = []
    for data in draw(st.lists(st.binary(max_size=20), max_size=4)):
        n = len(data)
        size = draw(
            _mostly(
                b"%x" % n,
                *(b"%X;ext=1" % n, b"%x" % (n + 1), b"%x" % max(n - 1, 0), b"-%x" % n, b"zz"),
                *(b"f" * 20, b" %x" % n, b"%x " % n, b"%x;\x01" % n, b"0x%x" % n),
            )
        )
        parts.append(size + draw(_mostly(b"\r\n", b"\n", b"")) + data)
        parts.append(draw(_mostly(b"\r\n", b"\n", b"", b"XX")))
    last = draw(_mostly(b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"", b"0\r\n", b"0\n\n"))
    return b"".join(parts) + last


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """Valid requests with a few defects: lines, framing headers, line endings, bytes."""
    method = draw(_mostly(b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"get", b"", weight=3))
    target = draw(
        _mostly(b"/headers", b"/", b"/echo", b"*", b"http://h/headers", b"/a b", b"", weight=3)
    )
    version = draw(
        _mostly(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.", b"", weight=8)
    )
    lines = [b" ".join((method, target, version)), b"Host: x"]
    lines += draw(st.lists(_GOOD_HEADERS, max_size=3))
    if draw(st.integers(0, 3)) == 3:
        lines.append(draw(_BAD_HEADERS))
    framing = draw(
        st.sampled_from([b"none", b"length", b"chunked"] * 3 + [b"both", b"two-lengths"])
    )
    body = b""
    if framing in (b"length", b"both", b"two-lengths"):
        body = draw(st.binary(max_size=40))
        right = str(len(body)).encode()
        lines.append(b"Content-Length: " + draw(st.one_of(st.just(right), st.just(right), _CL)))
        if framing == b"two-lengths":
            lines.append(b"Content-Length: " + draw(st.one_of(st.just(right), _CL)))
    if framing in (b"chunked", b"both"):
        lines.append(b"Transfer-Encoding: " + draw(_TE))
        body = draw(chunked_bodies())
    if draw(st.booleans()):
        lines.append(b"Connection: close")
    edit = draw(_mostly(b"none", b"duplicate", b"drop", b"swap"))
    if len(lines) > 1 and edit != b"none":
        i = draw(st.integers(1, len(lines) - 1))
        if edit == b"duplicate":
            lines.insert(i, lines[i])
        elif edit == b"drop":
            del lines[i]
        else:
            lines[0], lines[i] = lines[i], lines[0]
    lines.append(b"")
    eols = [b"\r\n"] * len(lines)
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 0, 1, 1, 2]))):
        eols[draw(st.integers(0, len(eols) - 1))] = draw(_BAD_EOL)
    data = b"".join(line + eol for line, eol in zip(lines, eols, strict=True)) + body
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 1, 2, 3]))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate"]))
        j = min(len(data), i + draw(st.integers(1, 8)))
        if op == "flip":
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        elif op == "insert":
            data = data[:i] + draw(st.binary(min_size=1, max_size=4)) + data[i:]
        elif op == "delete":
            data = data[:i] + data[j:]
        else:
            data = data[:j] + data[i:j] + data[j:]
    if draw(st.integers(0, 3)) == 3:
        data += b"GET /headers?next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    return data


@st.composite
def hostile_inputs(draw: st.DrawFn) -> bytes:
    """Random bytes (a quarter of the time) or a mutated request."""
    if draw(st.integers(0, 3)) < 3:
        return draw(mutated_requests())
    return draw(st.binary(max_size=512))


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=hostile_inputs(), eof=st.booleans())
def test_fuzz_daemon_survives(d: Daemon, data: bytes, eof: bool) -> None:
    """Whatever bytes a client sends, the daemon stays up, answers HTTP or nothing, and serves."""
    ex = exchange(d.front, data, timeout=0.3 if eof else 0.1, eof=eof)
    outcome = [f"{'daemon' if r.from_daemon else 'worker'} {r.status}" for r in ex.finals]
    event(f"eof={eof} {outcome or 'no answer'} {'closed' if ex.closed else 'open'}")
    assert ex.raw == b"" or ex.raw.startswith(b"HTTP/1.1 "), ex
    for r in ex.responses:
        assert r.status != 500, ex
    assert_serving(d)


def test_many_hostile_connections_at_once(d: Daemon) -> None:
    """Hostile requests from 20 threads at once leave the daemon serving."""
    payloads = [p.values[0] for p in CASES if not p.marks and isinstance(p.values[0], bytes)]
    errors: list[BaseException] = []

    def blast(k: int) -> None:
        try:
            for i in range(len(payloads)):
                exchange(d.front, payloads[(i + k) % len(payloads)], timeout=0.5, until=1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=blast, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert_serving(d)

"""Request-body framing the proxy does itself: the chunked decoder (no IO).

llhttp parses request heads; chunked bodies are decoded here so that the
proxy can be as lenient as nginx where that is safe (chunk extensions with
optional whitespace, ``5 ; name=value``, are accepted and dropped, RFC 9112
§7.1.1) and strict everywhere else: hex sizes of at most 16 digits, CRLF
line ends only, no control characters, bounded lines and trailers. The
decoded data is re-framed by the caller, so a worker only ever sees plain
``SIZE CRLF data CRLF`` chunks and no trailers.

Work is O(bytes fed): a line split over reads is kept, never rescanned.
"""

from __future__ import annotations

import re
from typing import Final

MAX_LINE: Final = 4096
"""Longest chunk-size line (with extensions) or trailer line."""

_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED: Final = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
_EXTENSIONS: Final = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + b"|" + _QUOTED + rb"))?)*\Z"
)
_TRAILER: Final = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*\Z")

_SIZE_LINE: Final = 0
_DATA: Final = 1
_DATA_END: Final = 2
_TRAILERS: Final = 3
_DONE: Final = 4


class ChunkedError(ValueError):
    """The chunked framing is malformed (answered 400)."""


class ChunkedDecoder:
    """Decodes one chunked body, fed in pieces as they arrive."""

    __slots__ = ("_left", "_line", "_state", "_trailer_bytes", "trailer_limit")

    def __init__(self, trailer_limit: int) -> None:
        self._state = _SIZE_LINE
        self._left = 0
        self._line = b""
        self._trailer_bytes = 0
        self.trailer_limit = trailer_limit

    @property
    def done(self) -> bool:
        """True once the last chunk and the trailers were read."""
        return self._state == _DONE

    def feed(self, data: bytes, out: list[bytes]) -> int:
        """Decode from ``data``, appending body data to ``out``; return the bytes used.

        Stops at the end of the body: bytes after it (a pipelined request)
        are not used. Raises :class:`ChunkedError` on malformed framing.
        """
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = self._left if self._left < end - pos else end - pos
                out.append(data if take == end and pos == 0 else data[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
            elif state == _DATA_END:
                # The CRLF after the data, perhaps split over two reads.
                need = 2 - len(self._line)
                got = self._line + data[pos : pos + need]
                pos += len(got) - len(self._line)
                if got == b"\r\n":
                    self._line = b""
                    self._state = _SIZE_LINE
                elif got == b"\r":
                    self._line = got
                else:
                    raise ChunkedError("no CRLF after chunk data")
            elif state == _DONE:
                break
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._line += data[pos:]
                    if len(self._line) > MAX_LINE:
                        raise ChunkedError("chunk line too long")
                    return end
                line = self._line + data[pos : nl + 1] if self._line else data[pos : nl + 1]
                self._line = b""
                pos = nl + 1
                if len(line) > MAX_LINE:
                    raise ChunkedError("chunk line too long")
                if len(line) < 2 or line[-2] != 13 or line.find(b"\r", 0, -2) >= 0:
                    raise ChunkedError("chunk line not ended by CRLF")
                if state == _SIZE_LINE:
                    self._size_line(line[:-2])
                else:
                    self._trailer_line(line[:-2])
        return pos

    def _size_line(self, line: bytes) -> None:
        m = _SIZE.match(line)
        if m is None:
            raise ChunkedError("bad chunk size")
        n = m.end()
        if n < len(line) and _EXTENSIONS.match(line, n) is None:
            raise ChunkedError("bad chunk extension")
        size = int(line[:n], 16)
        if size:
            self._left = size
            self._state = _DATA
        else:
            self._state = _TRAILERS

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._state = _DONE
            return
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > self.trailer_limit:
            raise ChunkedError("trailers too large")
        if _TRAILER.match(line) is None:
            raise ChunkedError("bad trailer field")

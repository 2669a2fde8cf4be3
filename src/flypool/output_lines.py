"""Lines a child process writes to a pipe, for the daemon's log and status.

Workers (cold and preloaded) and preloaders each have their stdout/stderr
read this way; what is done with a line differs, the reading does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

# A line longer than the reader's limit is taken as this much at a time.
LONG_LINE_CHUNK = 65536


async def lines(reader: asyncio.StreamReader) -> AsyncIterator[str]:
    """Each line from ``reader`` without its line end, until EOF (decoding errors replaced)."""
    while True:
        try:
            line = await reader.readline()
        except ValueError:
            # Over the reader's limit: what is buffered counts as one line.
            line = await reader.read(LONG_LINE_CHUNK)
        if not line:
            return
        yield line.decode(errors="replace").rstrip("\r\n")

"""A minimal keep-alive HTTP/1.1 backend for router benchmarks: one constant answer for all.

Run from the repository root::

    .venv/bin/python benchmarks/apps/fast_backend.py (--socket PATH | --port N) [--host H]

With neither flag it listens on ``$FLYPOOL_SOCKET`` or ``$PORT``, so it also
runs as a flypool worker command (``... fast_backend.py --socket {socket}``).

Every request, whatever its method and target, is answered ``200`` with
``pid=N worker=W`` (``$FLYPOOL_WORKER``); request bodies are read and
dropped. httptools frames the requests and calls back once per request, so a
router benchmark measures the router, not this backend. An upgrade request
or a malformed one closes the connection. SIGTERM or SIGINT: stop at once,
remove the socket, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from typing import cast

import httptools
import uvloop

BODY = f"pid={os.getpid()} worker={os.environ.get('FLYPOOL_WORKER') or '-'}\n".encode()
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
KEEP = HEAD + b"\r\n" + BODY
CLOSE = HEAD + b"Connection: close\r\n\r\n" + BODY


class Backend(asyncio.Protocol):
    """One connection: answer each complete request with the constant answer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start a parser for this connection."""
        self.transport = cast(asyncio.Transport, transport)
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        """Parse; `on_message_complete` answers."""
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.transport.close()

    def on_message_complete(self) -> None:
        """Parser callback: one request is complete."""
        if self.parser.should_keep_alive():
            self.transport.write(KEEP)
        else:
            self.transport.write(CLOSE)
            self.transport.close()


async def serve(args: argparse.Namespace) -> None:
    """Listen until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.socket:
        server = await loop.create_unix_server(Backend, args.socket, backlog=2048)
    else:
        server = await loop.create_server(Backend, args.host, args.port, backlog=2048)
    try:
        address = args.socket or "{}:{}".format(*server.sockets[0].getsockname()[:2])
        print(f"fast_backend: listening on {address} pid={os.getpid()}", flush=True)
        await stop.wait()
    finally:
        server.close()
        if args.socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.socket)


def main() -> None:
    """Parse flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", help="Unix socket path (default $FLYPOOL_SOCKET)")
    where.add_argument("--port", type=int, help="TCP port (default $PORT)")
    parser.add_argument("--host", default="127.0.0.1", help="TCP host (default 127.0.0.1)")
    args = parser.parse_args()
    if args.socket is None and args.port is None:
        args.socket = os.environ.get("FLYPOOL_SOCKET")
        args.port = int(os.environ.get("PORT") or 0)
        if not args.socket and not args.port:
            parser.error("give --socket PATH or --port N (or set FLYPOOL_SOCKET or PORT)")
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()

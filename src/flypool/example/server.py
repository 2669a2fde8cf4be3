"""``python -m flypool.example``: the example worker, a small HTTP/1.1 server on httptools.

It follows flypool's worker contract (SPEC §2)::

    python -m flypool.example [--socket PATH | --port N [--host H]]

Without a flag it listens where flypool says: ``$FLYPOOL_SOCKET`` or ``$PORT``.
``$FLYPOOL_WORKER`` and the working directory (the release) name it in every
answer. Routes: see `flypool.example.protocol`. Knobs for tests:

- ``EXAMPLE_BOOT_DELAY=S``: sleep S seconds before listening (a slow boot);
- ``EXAMPLE_FAIL_AT_BOOT=1``, or a file ``fail_at_boot`` in the working
  directory: after the boot delay, say why on stderr and exit 3 (a broken release);
- ``EXAMPLE_IGNORE_SIGTERM=1``: ignore SIGTERM (only SIGKILL stops it);
- ``EXAMPLE_KEEPALIVE_TIMEOUT=S``: close idle connections after S seconds
  (default 75; 0: never).

SIGTERM or SIGINT: stop accepting, close idle connections and tunnels, finish
the answers in progress (for at most 30 s), remove the socket, exit 0.
SIGQUIT, or a second signal, skips the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import TextIO

import uvloop

from flypool.example.protocol import Connection, Worker

BACKLOG = 2048
"""A burst of connections from the daemon must not be refused."""
GRACEFUL_TIMEOUT = 30.0
"""Seconds a stop waits for the answers in progress."""
EXIT_BOOT_FAILURE = 3  # as gunicorn's WORKER_BOOT_ERROR


def say(line: str, stream: TextIO | None = None) -> None:
    """Print `line`; a closed pipe (flypool was killed) must not stop a graceful exit."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=stream or sys.stdout, flush=True)


def flag(name: str) -> bool:
    """Whether environment variable `name` is set, and not to a false value."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def seconds(name: str, default: float) -> float:
    """Environment variable `name` as a number of seconds >= 0."""
    raw = os.environ.get(name, "").strip()
    with contextlib.suppress(ValueError):
        if (value := float(raw or default)) >= 0:  # False for NaN too
            return value
    raise SystemExit(f"example: {name}={raw!r}: expected a number of seconds >= 0")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags and knobs; ``$FLYPOOL_SOCKET`` or ``$PORT`` when no address is given."""
    parser = argparse.ArgumentParser(prog="python -m flypool.example")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--port", type=int, metavar="N", help="listen on this TCP port (0: any)")
    parser.add_argument("--host", default="127.0.0.1", help="TCP host (default 127.0.0.1)")
    args = parser.parse_args(argv)
    if args.socket is None and args.port is None:
        if os.environ.get("FLYPOOL_SOCKET"):
            args.socket = os.environ["FLYPOOL_SOCKET"]
        elif os.environ.get("PORT", "").isdigit():
            args.port = int(os.environ["PORT"])
        else:
            parser.error("give --socket PATH or --port N (or set FLYPOOL_SOCKET or PORT)")
    if args.socket is not None:
        args.socket = args.socket.removeprefix("unix:")  # gunicorn's spelling
    args.boot_delay = seconds("EXAMPLE_BOOT_DELAY", 0.0)
    args.keepalive_timeout = seconds("EXAMPLE_KEEPALIVE_TIMEOUT", 75.0)
    # The file lets a test break one release directory without touching the environment.
    args.fail_at_boot = flag("EXAMPLE_FAIL_AT_BOOT") or os.path.exists("fail_at_boot")
    return args


async def serve(args: argparse.Namespace) -> int:
    """Boot, listen, serve until a stop signal; return the exit status."""
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if sig == signal.SIGQUIT or stop.is_set():
            force.set()
        if not stop.is_set():
            say(f"example: {sig.name} received, stopping", sys.stderr)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        if sig != signal.SIGTERM or not flag("EXAMPLE_IGNORE_SIGTERM"):
            loop.add_signal_handler(sig, on_signal, sig)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.boot_delay)
        return 0  # stopped while booting
    if args.fail_at_boot:
        say("example: failing at boot as asked (EXAMPLE_FAIL_AT_BOOT)", sys.stderr)
        say("RuntimeError: boot failure requested", sys.stderr)
        return EXIT_BOOT_FAILURE

    name, release = os.environ.get("FLYPOOL_WORKER") or "-", os.getcwd()
    worker = Worker(name, release, args.keepalive_timeout)
    if args.socket is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)  # left by a crashed predecessor
        server = await loop.create_unix_server(
            lambda: Connection(worker), args.socket, backlog=BACKLOG
        )
        address = f"unix:{args.socket}"
    else:
        server = await loop.create_server(
            lambda: Connection(worker), args.host, args.port, backlog=BACKLOG, reuse_address=True
        )
        host, port = server.sockets[0].getsockname()[:2]
        address = f"{host}:{port}"
    try:
        say(f"example: listening on {address} pid={os.getpid()} worker={name} release={release}")
        await stop.wait()
        server.close()
        worker.stop()
        waits = [loop.create_task(worker.all_closed.wait()), loop.create_task(force.wait())]
        await asyncio.wait(waits, timeout=GRACEFUL_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        for conn in list(worker.connections):
            conn.abort()  # the graceful wait is over
        say("example: stopped", sys.stderr)
        return 0
    finally:
        server.close()
        if args.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.socket)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m flypool.example``; returns the exit status."""
    if flag("EXAMPLE_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # first: the boot delay ignores it too
    try:
        args = parse_args(argv)
    except SystemExit as err:  # argparse's (usage printed) or ours (a message)
        if isinstance(err.code, str):
            say(err.code, sys.stderr)
            return 2
        return err.code or 0
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(args))
    except OSError as err:
        say(f"example: cannot listen: {err}", sys.stderr)
        return 1

"""The bundled example worker: ``python -m flypool.example``.

A small, fast HTTP/1.1 server built on the standard library only (asyncio
with an `asyncio.Protocol`), so it runs under a bare ``python3``. If uvloop
happens to be importable it is used, which makes router benchmarks fairer.
It serves the worker contract of flypool's SPEC §2 and exists to test and
benchmark the daemon.

Usage::

    python -m flypool.example [--socket PATH | --port N] [--host 127.0.0.1]

Without a flag it listens on ``$FLYPOOL_SOCKET`` (Unix) or ``$PORT`` (TCP).

Routes (``delay=S`` in the query delays any answer by S seconds):

- ``GET /`` and any unknown path: ``pid=.. worker=.. release=..``;
  ``size=N`` answers exactly N bytes of ``x`` (streamed when large),
  ``status=N`` sets the status code.
- ``GET /chunked?size=N``: N bytes with chunked framing, in 64 KiB chunks.
- ``/upload`` and ``/echo-sha`` (any method): ``{"sha256": .., "bytes": N}``
  of the request body, computed while it streams in.
- ``POST /echo``: the request body back (at most 16 MiB).
- ``GET /headers``: JSON with method, target, version, headers as received.
- ``GET /ready``: ``200 ok`` (or ``$EXAMPLE_READY_STATUS``).
- ``GET /grow?mb=N``: keeps N more MiB allocated until exit (memory_limit tests).
- ``GET /crash``: the process exits at once (status 1) without answering.
- ``GET /close``: answers with ``Connection: close`` and closes.
- ``/ws`` with ``Connection: Upgrade``: ``101``, then a raw byte echo.

Every answer carries ``X-Worker-Pid``, ``X-Worker-Id`` and ``X-Release``.

Environment knobs (for tests and benchmarks):

- ``EXAMPLE_BOOT_DELAY=S``: sleep S seconds before listening (a slow boot).
- ``EXAMPLE_FAIL_AT_BOOT=1``, or a file ``fail_at_boot`` in the working
  directory: print an error and exit with status 3 after the boot delay.
- ``EXAMPLE_IGNORE_SIGTERM=1``: ignore SIGTERM (only SIGKILL stops it).
- ``EXAMPLE_NEVER_READY=1``: never listen; sleep until stopped.
- ``EXAMPLE_DELAY=S``: default per-request delay (not for ``/ready``).
- ``EXAMPLE_READY_STATUS=N``: status of ``/ready`` (make the probe fail).
- ``EXAMPLE_KEEPALIVE_TIMEOUT=S``: close idle connections after S seconds
  (default 75; 0 = never).
- ``EXAMPLE_GRACEFUL_TIMEOUT=S``: on SIGTERM, wait at most S seconds for
  in-flight requests (default 30).
- ``EXAMPLE_NO_UVLOOP=1``: use the plain asyncio loop even if uvloop exists.

On SIGTERM or SIGINT it stops accepting, lets in-flight requests finish,
closes keep-alive connections, removes its socket file and exits 0; a second
signal, or SIGQUIT, skips the wait for in-flight requests.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from flypool.example.protocol import HttpConnection, ServerState, Settings

BACKLOG = 2048
"""Listen backlog: bursts while the router connects must not be refused."""
MAX_UNIX_PATH = 107
"""sun_path holds 108 bytes including the terminating NUL."""
EXIT_USAGE = 2
EXIT_BOOT_FAILURE = 3


class UsageError(Exception):
    """A bad flag or environment value; printed, exit status 2."""


@dataclass(frozen=True, slots=True)
class Options:
    """Everything the command line and the environment decide."""

    socket_path: str | None
    host: str
    port: int | None
    settings: Settings
    boot_delay: float
    fail_at_boot: bool
    ignore_sigterm: bool
    never_ready: bool
    graceful_timeout: float
    use_uvloop: bool


def _env_float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r}: expected a number of seconds") from None
    if not value >= 0:  # also rejects NaN
        raise UsageError(f"{name}={raw!r}: expected a number of seconds >= 0")
    return value


def _env_flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() not in ("", "0", "false", "no")


def parse_options(argv: list[str] | None, env: dict[str, str], cwd: str) -> Options:
    """Read flags and environment into `Options`; raise `UsageError` when invalid."""
    parser = argparse.ArgumentParser(
        prog="python -m flypool.example",
        description="flypool's example worker: a small HTTP/1.1 server for tests and benchmarks.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--port", type=int, metavar="N", help="listen on this TCP port (0: any)")
    parser.add_argument("--host", default="127.0.0.1", help="TCP host (default 127.0.0.1)")
    args = parser.parse_args(argv)

    socket_path: str | None = args.socket
    port: int | None = args.port
    if socket_path is None and port is None:
        if env.get("FLYPOOL_SOCKET"):
            socket_path = env["FLYPOOL_SOCKET"]
        elif env.get("PORT"):
            try:
                port = int(env["PORT"])
            except ValueError:
                raise UsageError(f"PORT={env['PORT']!r}: expected a port number") from None
        else:
            raise UsageError("give --socket PATH or --port N (or set FLYPOOL_SOCKET or PORT)")
    if socket_path is not None:
        socket_path = socket_path.removeprefix("unix:")  # accept gunicorn's spelling
        if len(os.fsencode(socket_path)) > MAX_UNIX_PATH:
            raise UsageError(
                f"socket path is {len(os.fsencode(socket_path))} bytes, "
                f"Unix sockets allow at most {MAX_UNIX_PATH}: {socket_path}"
            )
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"port {port} out of range")

    raw_ready = env.get("EXAMPLE_READY_STATUS", "").strip()
    try:
        ready_status = int(raw_ready) if raw_ready else 200
    except ValueError:
        raise UsageError(f"EXAMPLE_READY_STATUS={raw_ready!r}: expected a status code") from None
    if not 200 <= ready_status <= 599:
        raise UsageError(f"EXAMPLE_READY_STATUS={raw_ready!r}: expected 200..599")

    settings = Settings(
        pid=os.getpid(),
        worker=env.get("FLYPOOL_WORKER") or "-",
        release=cwd,
        default_delay=_env_float(env, "EXAMPLE_DELAY", 0.0),
        ready_status=ready_status,
        keepalive_timeout=_env_float(env, "EXAMPLE_KEEPALIVE_TIMEOUT", 75.0),
    )
    return Options(
        socket_path=socket_path,
        host=args.host,
        port=port,
        settings=settings,
        boot_delay=_env_float(env, "EXAMPLE_BOOT_DELAY", 0.0),
        fail_at_boot=_env_flag(env, "EXAMPLE_FAIL_AT_BOOT"),
        ignore_sigterm=_env_flag(env, "EXAMPLE_IGNORE_SIGTERM"),
        never_ready=_env_flag(env, "EXAMPLE_NEVER_READY"),
        graceful_timeout=_env_float(env, "EXAMPLE_GRACEFUL_TIMEOUT", 30.0),
        use_uvloop=not _env_flag(env, "EXAMPLE_NO_UVLOOP"),
    )


def bind_unix(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen on `path` (removing a stale file); return it and its (dev, ino)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"socket path is a directory: {path}")
        os.unlink(path)  # a stale socket from a crashed predecessor
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        st = os.stat(path)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def remove_socket(path: str, identity: tuple[int, int]) -> None:
    """Unlink `path` if it is still the socket we bound (not a successor's)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == identity:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _fail_at_boot_requested(opts: Options) -> bool:
    # The file lets a test break one "release" directory without touching the env.
    return opts.fail_at_boot or os.path.exists("fail_at_boot")


async def serve(opts: Options) -> int:
    """Boot, listen and serve until SIGTERM/SIGINT/SIGQUIT; return the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        # QUIT, or a second TERM/INT, skips waiting for in-flight requests.
        if sig == signal.SIGQUIT or stop.is_set():
            force.set()
        if not stop.is_set():
            _say(f"example: {sig.name} received, stopping", file=sys.stderr, flush=True)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        if not (sig == signal.SIGTERM and opts.ignore_sigterm):
            loop.add_signal_handler(sig, on_signal, sig)

    if opts.boot_delay > 0:
        try:
            await asyncio.wait_for(stop.wait(), opts.boot_delay)
        except TimeoutError:
            pass
        if stop.is_set():
            return 0
    if _fail_at_boot_requested(opts):
        _say(
            "example: failing at boot as asked (EXAMPLE_FAIL_AT_BOOT)\n"
            "RuntimeError: boot failure requested",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_BOOT_FAILURE
    if opts.never_ready:
        await stop.wait()  # a release that never becomes ready
        return 0

    state = ServerState(opts.settings)
    factory = functools.partial(HttpConnection, state)
    server: asyncio.AbstractServer | None = None
    socket_identity: tuple[int, int] | None = None
    try:
        if opts.socket_path is not None:
            sock, socket_identity = bind_unix(opts.socket_path)
            server = await loop.create_unix_server(factory, sock=sock, backlog=BACKLOG)
            address = f"unix:{opts.socket_path}"
        else:
            assert opts.port is not None
            server = await loop.create_server(
                factory, opts.host, opts.port, backlog=BACKLOG, reuse_address=True
            )
            port = server.sockets[0].getsockname()[1]
            address = f"[{opts.host}]:{port}" if ":" in opts.host else f"{opts.host}:{port}"
        state.start_clock(loop)
        settings = opts.settings
        _say(
            f"example: listening on {address} pid={settings.pid} "
            f"worker={settings.worker} release={settings.release}",
            flush=True,
        )
        await stop.wait()

        # Graceful stop: no new connections, idle ones closed now, busy ones
        # after their current answer, everything by the deadline.
        server.close()
        state.begin_shutdown()
        busy = sum(1 for conn in state.connections if not conn.closing)
        if busy:
            _say(f"example: draining {busy} connection(s)", file=sys.stderr, flush=True)
        if state.connections and not force.is_set():
            drained = asyncio.ensure_future(state.wait_closed())
            forced = asyncio.ensure_future(force.wait())
            await asyncio.wait(
                (drained, forced),
                timeout=opts.graceful_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            drained.cancel()
            forced.cancel()
        state.close_all()
        await asyncio.sleep(0)  # let the transports run their close callbacks
        _say("example: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        state.stop_clock()
        if server is not None:
            server.close()
        if opts.socket_path is not None and socket_identity is not None:
            remove_socket(opts.socket_path, socket_identity)


def _loop_factory(opts: Options) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not opts.use_uvloop:
        return None
    try:
        import uvloop  # optional: flypool depends on it, a bare python3 may not have it
    except ImportError:
        return None
    return uvloop.new_event_loop


def _say(*args: object, file: TextIO | None = None, flush: bool = True) -> None:
    """print() that survives a closed pipe: when flypool is gone (SIGKILL), our
    stdout/stderr readers are gone too, and a BrokenPipeError must not stop a
    graceful exit."""
    stream = file if file is not None else sys.stdout
    try:
        print(*args, file=stream, flush=flush)
    except (BrokenPipeError, OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m flypool.example``; returns the exit status."""
    env = dict(os.environ)
    if _env_flag(env, "EXAMPLE_IGNORE_SIGTERM"):
        # Before anything else, so a SIGTERM during the boot delay is ignored too.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        opts = parse_options(argv, env, os.getcwd())
    except UsageError as err:
        _say(f"example: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        with asyncio.Runner(loop_factory=_loop_factory(opts)) as runner:
            return runner.run(serve(opts))
    except UsageError as err:
        _say(f"example: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except OSError as err:
        _say(f"example: cannot listen: {err}", file=sys.stderr, flush=True)
        return 1

"""Helpers for the preload and stack-dump tests: real preloaders, real workers, real pipes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from flypool.pool.spawner import output_pipes
from flypool.pool.stack_dump import LineFanout
from flypool.preload import PreloadedProcess, Preloader
from tests.support import get, short_dir

APPS = Path(__file__).parent / "apps"
VENV_BIN = Path(sys.executable).parent


def make_release() -> str:
    """A short release directory holding the test apps (as top-level modules)."""
    d = short_dir()
    for name in ("preload_app.py", "preload_serve.py", "preload_asgi.py"):
        shutil.copy(APPS / name, os.path.join(d, name))
    return d


def base_env(**extra: str) -> dict[str, str]:
    """The daemon's environment, minus what would disturb a worker, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


class Output:
    """A worker's stdout/stderr lines, read from our own pipes."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.stderr = LineFanout()
        self.tasks: list[asyncio.Task[None]] = []

    async def follow(self, fd: int, name: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
        )

        async def pump() -> None:
            try:
                while line := await reader.readline():
                    text = line.decode(errors="replace").rstrip("\n")
                    self.lines.append(f"{name}: {text}")
                    if name == "stderr":
                        self.stderr.feed(text)
            finally:
                transport.close()

        self.tasks.append(loop.create_task(pump()))

    def text(self) -> str:
        return "\n".join(self.lines)


class Harness:
    """Starts preloaders and workers; stops every one of them at the end."""

    def __init__(self) -> None:
        self.preloaders: list[Preloader] = []
        self.handles: list[Any] = []

    async def preloader(
        self, argv: Sequence[str], modules: Sequence[str], release: str, env: dict[str, str]
    ) -> Preloader:
        p = Preloader.for_command(argv, modules=modules, release=release, env=env)
        self.preloaders.append(p)
        await p.start(30)
        return p

    async def spawn(
        self, p: Preloader, argv: Sequence[str], release: str, env: dict[str, str]
    ) -> tuple[PreloadedProcess, Output]:
        out = Output()
        with output_pipes() as (out_r, out_w, err_r, err_w):
            handle = await p.spawn(argv, env=env, cwd=release, stdout=out_w, stderr=err_w)
        self.handles.append(handle)
        await out.follow(out_r, "stdout")
        await out.follow(err_r, "stderr")
        return handle, out

    async def cold(
        self, argv: Sequence[str], release: str, env: dict[str, str]
    ) -> tuple[asyncio.subprocess.Process, Output]:
        out = Output()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=release,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
            )
        finally:
            os.close(out_w)
            os.close(err_w)
        self.handles.append(proc)
        await out.follow(out_r, "stdout")
        await out.follow(err_r, "stderr")
        return proc, out

    async def close(self) -> None:
        for h in self.handles:
            if h.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(h.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(h.wait(), 10)
        for p in self.preloaders:
            await p.stop(5)


async def wait_serving(sock: str, proc: Any, timeout: float = 20.0) -> float:
    """Poll until GET / on ``sock`` answers 200; return the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        if proc.returncode is not None:
            raise AssertionError(f"worker {proc.pid} exited with {proc.returncode}")
        if await _answers(sock):
            return loop.time() - start
        if loop.time() - start > timeout:
            raise AssertionError(f"{sock} not serving within {timeout}s")
        await asyncio.sleep(0.005)


async def _answers(sock: str) -> bool:
    try:
        reader, writer = await asyncio.open_unix_connection(sock)
    except OSError:
        return False
    try:
        writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        return line.startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def fetch(sock: str, target: str = "/") -> tuple[int, bytes, dict[str, str]]:
    """GET on a fresh connection (in a thread: http.client is blocking)."""
    return await asyncio.to_thread(get, sock, target, 10.0)


def start_stuck_request(sock: str) -> socket.socket:
    """Send a request that never gets an answer; the caller closes the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.sendall(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
    return s


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def fd_targets(pid: int) -> dict[int, str]:
    """What each of a process's descriptors points to, from /proc."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def until(deadline_s: float) -> float:
    return time.monotonic() + deadline_s

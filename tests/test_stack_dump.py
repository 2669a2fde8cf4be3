"""The stack of a stuck worker: py-spy, faulthandler for preloaded workers, or why not."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

import uvloop

from flypool.pool.stack_dump import LineFanout, dump_stack, find_py_spy
from tests.preload_support import (
    VENV_BIN,
    Harness,
    base_env,
    make_release,
    start_stuck_request,
    wait_serving,
)

PY = sys.executable


def run(test: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        h = Harness()
        try:
            await test(h)
        finally:
            await h.close()

    uvloop.run(main())


def app_argv(sock: str) -> list[str]:
    return [PY, "-m", "preload_serve", sock]


async def _max_loop_gap(stop: asyncio.Event) -> float:
    """The longest the loop went without running this task (it must stay responsive)."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    last = loop.time()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = loop.time()
        worst = max(worst, now - last)
        last = now
    return worst


class TestFaulthandler:
    """Preloaded workers dump their stack on DUMP_SIGNAL to their stderr."""

    def test_names_the_stuck_function(self) -> None:
        """A worker stuck in a known function: the dump names it, in bounded time, loop free."""
        release = make_release()
        sock = os.path.join(release, "f.sock")

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv(sock), ["preload_app"], release, env)
            w, out = await h.spawn(p, app_argv(sock), release, env)
            await wait_serving(sock, w)
            conn = start_stuck_request(sock)
            try:
                await asyncio.sleep(0.2)  # let the handler enter the loop
                loop = asyncio.get_running_loop()
                stop = asyncio.Event()
                ticker = loop.create_task(_max_loop_gap(stop))
                t0 = loop.time()
                stack, source = await dump_stack(
                    w.pid, preloaded=True, output=out.stderr, py_spy=None
                )
                took = loop.time() - t0
                stop.set()
                gap = await ticker
            finally:
                conn.close()
            assert source == "faulthandler", source
            assert stack is not None and "in stuck_in_known_function" in stack, stack
            assert "preload_app.py" in stack
            assert took < 2.5 and gap < 0.2, (took, gap)
            assert w.returncode is None  # the signal did not hurt it

        run(body)

    def test_gunicorn_worker_under_its_arbiter(self) -> None:
        """gunicorn: the process that serves is the arbiter's child; its stack is dumped too."""
        release = make_release()
        sock = os.path.join(release, "g.sock")
        argv = [str(VENV_BIN / "gunicorn"), "--bind", f"unix:{sock}", "--workers", "1"]
        argv += ["--timeout", "120", "flypool.example.wsgi:app"]

        async def body(h: Harness) -> None:
            env = base_env()
            modules = ["gunicorn.app.wsgiapp", "flypool.example.wsgi"]
            p = await h.preloader(argv, modules, release, env)
            w, out = await h.spawn(p, argv, release, env)
            await wait_serving(sock, w)
            import socket

            conn = socket.socket(socket.AF_UNIX)
            conn.connect(sock)
            conn.sendall(b"GET /?delay=60 HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                await asyncio.sleep(0.3)
                stack, source = await dump_stack(
                    w.pid, preloaded=True, output=out.stderr, py_spy=None
                )
            finally:
                conn.close()
            assert source == "faulthandler", source
            assert stack is not None
            assert f"Process {w.pid}:" in stack and "arbiter.py" in stack, stack
            assert 'wsgi.py", line' in stack and " in app" in stack, stack

        run(body)

    def test_no_output_means_no_stack_in_bounded_time(self) -> None:
        """Nobody feeds the worker's stderr to the collector: None and why, within the timeout."""
        release = make_release()
        sock = os.path.join(release, "n.sock")

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv(sock), ["preload_app"], release, env)
            w, _ = await h.spawn(p, app_argv(sock), release, env)
            await wait_serving(sock, w)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            stack, reason = await dump_stack(
                w.pid, preloaded=True, output=LineFanout(), py_spy=None, timeout=1.0
            )
            assert stack is None
            assert reason == (
                "py-spy is not installed; no faulthandler dump on the worker's stderr within 1s"
            )
            assert loop.time() - t0 < 1.5

        run(body)


class TestPySpy:
    """py-spy (the ``stacks`` extra) reads any Python worker's stack."""

    def test_cold_worker(self) -> None:
        """A cold worker stuck in a known function: py-spy names it."""
        assert find_py_spy() is not None, "py-spy is in the dev extra: pip install -e '.[dev]'"
        release = make_release()
        sock = os.path.join(release, "p.sock")

        async def body(h: Harness) -> None:
            proc, _ = await h.cold(app_argv(sock), release, base_env())
            await wait_serving(sock, proc)
            conn = start_stuck_request(sock)
            try:
                await asyncio.sleep(0.2)
                stack, source = await dump_stack(proc.pid, preloaded=False)
            finally:
                conn.close()
            assert source == "py-spy", source
            assert stack is not None and "stuck_in_known_function" in stack, stack

        run(body)

    def test_failing_py_spy_falls_back_to_faulthandler(self) -> None:
        """py-spy that fails (no ptrace rights, say): preloaded workers still get a stack."""
        release = make_release()
        sock = os.path.join(release, "b.sock")

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv(sock), ["preload_app"], release, env)
            w, out = await h.spawn(p, app_argv(sock), release, env)
            await wait_serving(sock, w)
            conn = start_stuck_request(sock)
            try:
                await asyncio.sleep(0.2)
                stack, source = await dump_stack(
                    w.pid, preloaded=True, output=out.stderr, py_spy="/bin/false"
                )
            finally:
                conn.close()
            assert source == "faulthandler"
            assert stack is not None and "stuck_in_known_function" in stack

        run(body)


class TestNoStack:
    """Without py-spy and without preload, the event says why there is no stack."""

    def test_reason(self) -> None:
        """Cold worker, no py-spy: None and the reason, at once."""
        release = make_release()
        sock = os.path.join(release, "r.sock")

        async def body(h: Harness) -> None:
            proc, _ = await h.cold(app_argv(sock), release, base_env())
            await wait_serving(sock, proc)
            stack, reason = await dump_stack(proc.pid, preloaded=False, py_spy=None)
            assert (stack, reason) == (
                None,
                "py-spy is not installed and the worker was not preloaded",
            )

        run(body)

    def test_py_spy_failure_reason(self) -> None:
        """A failing py-spy on a cold worker: its failure is the reason."""

        async def body(h: Harness) -> None:
            stack, reason = await dump_stack(os.getpid(), preloaded=False, py_spy="/bin/false")
            assert stack is None
            assert reason == (
                "py-spy failed (status 1): no output and the worker was not preloaded"
            )

        run(body)


def test_fanout_listeners() -> None:
    """Lines reach the listeners present when they are fed, and no one after stop()."""
    fan = LineFanout()
    got: list[str] = []
    fan.feed("before")
    stop = fan.listen(got.append)
    fan.feed("during")
    stop()
    stop()
    fan.feed("after")
    assert got == ["during"]

"""Preloaded spawning (SPEC §11): real preloaders fork real workers that serve HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import uvloop

from flypool.preload import (
    UNKNOWN_EXIT,
    EntryKind,
    NotPreloadable,
    Plan,
    Preloader,
    PreloaderGone,
    PreloadError,
    PreloaderState,
    PreloadRefused,
    lifeline,
    plan_command,
)
from tests.preload_support import (
    APPS,
    VENV_BIN,
    Harness,
    base_env,
    fd_targets,
    fetch,
    make_release,
    running,
    wait_serving,
)
from tests.support import eventually

PY = sys.executable


def run(test: Callable[[Harness], Awaitable[None]], *, plain_asyncio: bool = False) -> None:
    """Run an async test body under uvloop (the daemon's loop); clean up every process."""

    async def main() -> None:
        h = Harness()
        try:
            await test(h)
        finally:
            await h.close()

    if plain_asyncio:
        asyncio.run(main())
    else:
        uvloop.run(main())


def app_argv(sock: str) -> list[str]:
    return [PY, "-m", "preload_serve", sock]


class TestPlanCommand:
    """Which commands can be preloaded, and how their entry point is found."""

    def test_python_dash_m(self, tmp_path: Path) -> None:
        """``python -u -X dev -m MOD ARGS`` keeps the options for the preloader's interpreter."""
        plan = plan_command([PY, "-u", "-X", "dev", "-m", "pkg.mod", "--a", "1"], str(tmp_path), {})
        assert plan == Plan(
            PY, ("-u", "-X", "dev"), EntryKind.MODULE, "pkg.mod", ("pkg.mod", "--a", "1")
        )

    def test_python_script_relative_to_release(self, tmp_path: Path) -> None:
        """``python app.py`` names a file in the release; a missing one is a reason."""
        (tmp_path / "app.py").write_text("")
        plan = plan_command([PY, "app.py", "x"], str(tmp_path), {})
        assert (plan.kind, plan.target, plan.argv) == (EntryKind.PATH, "app.py", ("app.py", "x"))
        with pytest.raises(NotPreloadable, match="not a file"):
            plan_command([PY, "gone.py"], str(tmp_path), {})

    def test_console_script_shebang(self) -> None:
        """A virtualenv console script runs through the interpreter its #! names."""
        gunicorn = str(VENV_BIN / "gunicorn")
        plan = plan_command([gunicorn, "--bind", "unix:/x"], "/", {})
        assert plan.interpreter == Path(gunicorn).read_text().splitlines()[0][2:].strip()
        assert (plan.kind, plan.target, plan.argv) == (
            EntryKind.PATH,
            gunicorn,
            (gunicorn, "--bind", "unix:/x"),
        )

    def test_console_script_found_on_path(self) -> None:
        """A bare command name is looked up on the app's PATH, as exec would."""
        plan = plan_command(["uvicorn", "app:app"], "/", {"PATH": str(VENV_BIN)})
        assert plan.target == str(VENV_BIN / "uvicorn")

    def test_env_shebang_and_sh_trampoline(self, tmp_path: Path) -> None:
        """``#!/usr/bin/env python3`` and pip's ``#!/bin/sh`` + ``'''exec'`` both name Python."""
        env_script = tmp_path / "a"
        env_script.write_text("#!/usr/bin/env python3 -u\nprint(1)\n")
        tramp = tmp_path / "b"
        tramp.write_text(f"#!/bin/sh\n'''exec' \"{PY}\" \"$0\" \"$@\"\n' '''\nprint(1)\n")
        for f in (env_script, tramp):
            f.chmod(0o755)
        py3 = plan_command([str(env_script)], "/", {"PATH": str(VENV_BIN)})
        assert (py3.interpreter, py3.flags) == (str(VENV_BIN / "python3"), ("-u",))
        assert plan_command([str(tramp)], "/", {}).interpreter == PY

    @pytest.mark.parametrize(
        ("argv", "reason"),
        [
            (["/bin/sleep", "1"], "not a script with a #! line"),
            (["/usr/bin/env"], "not a script with a #! line"),
            ([PY, "-c", "pass"], "option -c cannot be preloaded"),
            ([PY], "interactive"),
            ([PY, "-m"], "without a module"),
            (["no-such-program-here"], "not an executable file"),
        ],
    )
    def test_not_python(self, argv: list[str], reason: str) -> None:
        """Non-Python commands, and Python run in ways we cannot replay, give a reason."""
        with pytest.raises(NotPreloadable, match=reason):
            plan_command(argv, "/", {"PATH": "/usr/bin:/bin"})

    def test_shell_script(self, tmp_path: Path) -> None:
        """A shell script is not Python even if it later runs Python."""
        script = tmp_path / "start"
        script.write_text("#!/bin/sh\nexec python3 app.py\n")
        script.chmod(0o755)
        with pytest.raises(NotPreloadable, match="runs /bin/sh, not Python"):
            plan_command([str(script)], "/", {})


class TestWorkers:
    """Each kind of worker, forked from a preloader, serves HTTP on its socket."""

    def test_example_worker(self) -> None:
        """``python -m flypool.example``: served by the forked pid, output on our pipes, exit 0."""
        release = make_release()
        sock = os.path.join(release, "w.sock")
        argv = [PY, "-m", "flypool.example", "--socket", sock]

        async def body(h: Harness) -> None:
            env = base_env(FLYPOOL_WORKER="7")
            p = await h.preloader(argv, ["flypool.example.server"], release, env)
            assert p.state is PreloaderState.READY
            w, out = await h.spawn(p, argv, release, env)
            await wait_serving(sock, w)
            status, _, headers = await fetch(sock)
            assert status == 200
            assert headers["x-worker-pid"] == str(w.pid)
            assert headers["x-worker-id"] == "7"  # the request's env, not the preloader's
            assert psutil.Process(w.pid).ppid() == p.pid
            assert os.getsid(w.pid) == w.pid  # a session of its own
            w.terminate()
            assert await asyncio.wait_for(w.wait(), 10) == 0
            await asyncio.gather(*out.tasks)
            assert "stderr: example: stopped" in out.text()

        run(body)

    def test_gunicorn_sync(self) -> None:
        """gunicorn (console script) with its sync worker: the arbiter is forked, it forks on."""
        release = make_release()
        sock = os.path.join(release, "g.sock")
        argv = [
            str(VENV_BIN / "gunicorn"),
            "--bind",
            f"unix:{sock}",
            "--workers",
            "1",
            "flypool.example.wsgi:app",
        ]

        async def body(h: Harness) -> None:
            env = base_env()
            modules = ["gunicorn.app.wsgiapp", "flypool.example.wsgi"]
            p = await h.preloader(argv, modules, release, env)
            w, out = await h.spawn(p, argv, release, env)
            await wait_serving(sock, w)
            status, body, headers = await fetch(sock)
            assert status == 200 and b"server=gunicorn" in body
            served_by = int(headers["x-worker-pid"])
            assert psutil.Process(served_by).ppid() == w.pid  # gunicorn's own worker
            w.terminate()
            assert await asyncio.wait_for(w.wait(), 15) == 0, out.text()

        run(body)

    def test_uvicorn(self) -> None:
        """uvicorn (console script) serving an ASGI app of the release."""
        release = make_release()
        sock = os.path.join(release, "u.sock")
        argv = [str(VENV_BIN / "uvicorn"), "--uds", sock, "preload_asgi:app"]

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(argv, ["uvicorn.main", "preload_asgi"], release, env)
            w, out = await h.spawn(p, argv, release, env)
            await wait_serving(sock, w)
            status, body, _ = await fetch(sock)
            assert (status, body) == (200, f"pid={w.pid} server=uvicorn".encode())
            w.terminate()
            # uvicorn re-raises the signal after its graceful shutdown, cold too.
            assert await asyncio.wait_for(w.wait(), 15) == -signal.SIGTERM, out.text()
            assert "stderr: INFO:     Finished server process" in out.text()

        run(body)

    def test_script_entry_point(self) -> None:
        """``python preload_serve.py SOCKET`` (a script, not -m) runs from the preloader too."""
        release = make_release()
        sock = os.path.join(release, "s.sock")
        argv = [PY, "preload_serve.py", sock]

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(argv, ["preload_app"], release, env)
            w, _ = await h.spawn(p, argv, release, env)
            await wait_serving(sock, w)
            assert (await fetch(sock))[1] == f"pid={w.pid} worker=-".encode()

        run(body)

    def test_concurrent_spawns_plain_asyncio(self) -> None:
        """Fork requests in flight together each get their own worker (stdlib asyncio loop)."""
        release = make_release()
        socks = [os.path.join(release, f"c{i}.sock") for i in range(4)]

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            spawned = await asyncio.gather(*(h.spawn(p, app_argv(s), release, env) for s in socks))
            pids = set()
            for s, (w, _) in zip(socks, spawned, strict=True):
                await wait_serving(s, w)
                pids.add((await fetch(s))[1])
            assert len(pids) == 4 and p.spawned_total == 4 and len(p.workers) == 4
            await p.stop()
            assert p.state is PreloaderState.EXITED and p.exit_code == 0
            await p.stop()  # twice is harmless
            for s, (w, _) in zip(socks, spawned, strict=True):
                assert (await fetch(s))[0] == 200 and w.returncode is None

        run(body, plain_asyncio=True)


class TestSpawnSpeed:
    """The point of preloading: an app whose import takes 1 s."""

    def test_slow_import_preloaded_vs_cold(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Spawn-to-ready of a preloaded worker is far below the 1 s a cold one pays."""
        release = make_release()
        env = base_env(PRELOAD_APP_IMPORT_DELAY="1")
        figures: dict[str, float] = {}

        async def body(h: Harness) -> None:
            loop = asyncio.get_running_loop()
            cold_sock = os.path.join(release, "c.sock")
            t0 = loop.time()
            proc, _ = await h.cold(app_argv(cold_sock), release, env)
            await wait_serving(cold_sock, proc)
            figures["cold"] = loop.time() - t0
            argv0 = app_argv(os.path.join(release, "p0.sock"))
            t0 = loop.time()
            p = await h.preloader(argv0, ["preload_app"], release, env)
            figures["preloader_start"] = loop.time() - t0
            for i in range(1, 4):
                sock = os.path.join(release, f"p{i}.sock")
                t0 = loop.time()
                w, _ = await h.spawn(p, app_argv(sock), release, env)
                await wait_serving(sock, w)
                figures[f"preloaded_{i}"] = loop.time() - t0

        run(body)
        with capsys.disabled():
            print("\nspawn-to-ready (s):", {k: round(v, 4) for k, v in figures.items()})
        assert figures["cold"] >= 1.0
        best = min(figures[f"preloaded_{i}"] for i in range(1, 4))
        assert best < 0.25 and figures["cold"] / best >= 10, figures


class TestForkHygiene:
    """What a forked worker does not inherit."""

    def test_random_streams_differ(self) -> None:
        """Two workers forked from one preloader draw different random numbers."""
        release = make_release()

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv("/x"), ["preload_app", "random"], release, env)
            draws = []
            for i in range(2):
                sock = os.path.join(release, f"r{i}.sock")
                w, _ = await h.spawn(p, app_argv(sock), release, env)
                await wait_serving(sock, w)
                draws.append((await fetch(sock, "/random"))[1])
            assert draws[0] != draws[1]

        run(body)

    def test_no_descriptor_beyond_its_own(self) -> None:
        """/proc/PID/fd of a forked worker: a cold one's, plus the lifeline, nothing else.

        The cold baseline is started with ``close_fds`` (the daemon's own
        descriptors are not the question here). Nothing of the preloader
        (control channel, wake-up pipe, its output pipe) nor of the worker
        forked before may show up.
        """
        release = make_release()

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            first_sock = os.path.join(release, "a.sock")
            first, _ = await h.spawn(p, app_argv(first_sock), release, env)
            sock = os.path.join(release, "b.sock")
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                second = await p.spawn(
                    app_argv(sock), env=env, cwd=release, stdout=out_w, stderr=err_w
                )
                h.handles.append(second)
                cold_sock = os.path.join(release, "c.sock")
                cold = subprocess.Popen(
                    app_argv(cold_sock),
                    cwd=release,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                    start_new_session=True,
                )
                try:
                    await wait_serving(first_sock, first)
                    await wait_serving(sock, second)
                    await wait_serving(cold_sock, _Popen(cold))
                    # The probes' connections close a moment after their answer.
                    deadline = time.monotonic() + 5
                    while True:
                        forked = fd_targets(second.pid)
                        plain = fd_targets(cold.pid)
                        if _kinds(forked) == _kinds(plain) + Counter({"pipe": 1}):
                            break
                        if time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.02)
                    theirs = set(fd_targets(p.pid).values()) | set(fd_targets(first.pid).values())
                finally:
                    cold.kill()
                    cold.wait()
                out_inode, err_inode = (os.fstat(fd).st_ino for fd in (out_w, err_w))
            finally:
                for fd in (out_r, out_w, err_r, err_w):
                    os.close(fd)
            lifeline_fd = f"pipe:[{os.fstat(lifeline.fds()[0]).st_ino}]"
            assert {k: forked[k] for k in (0, 1, 2)} == {
                0: "/dev/null",
                1: f"pipe:[{out_inode}]",
                2: f"pipe:[{err_inode}]",
            }
            assert _kinds(forked) == _kinds(plain) + Counter({"pipe": 1}), (forked, plain)
            assert lifeline_fd in forked.values()
            assert lifeline_fd not in plain.values()
            shared = set(forked.values()) & theirs
            assert shared <= {"/dev/null", lifeline_fd}, shared

        run(body)

    def test_files_the_imports_left_open_are_kept_and_reported(self) -> None:
        """A file opened at import belongs to the app: kept in every worker, named in ready."""
        release = make_release()
        log = os.path.join(release, "app.log")

        async def body(h: Harness) -> None:
            env = base_env(PRELOAD_APP_LOG_FILE=log)
            p = await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            assert list(p.shared_fds.values()) == [log]
            fd = int(next(iter(p.shared_fds)))
            sock = os.path.join(release, "l.sock")
            w, _ = await h.spawn(p, app_argv(sock), release, env)
            await wait_serving(sock, w)
            assert fd_targets(w.pid)[fd] == log

        run(body)

    def test_thread_in_preloader_refuses_fork(self) -> None:
        """A thread running in the preloader: each fork is refused with the reason."""
        release = make_release()

        async def body(h: Harness) -> None:
            env = base_env(PRELOAD_APP_THREAD="1")
            p = await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            assert p.threads is not None and "app-poller" in p.threads
            with pytest.raises(PreloadRefused, match=r"2 threads are running.*app-poller"):
                await h.spawn(p, app_argv(os.path.join(release, "t.sock")), release, env)
            assert p.state is PreloaderState.READY  # still usable once the thread ends

        run(body)


class TestFailures:
    """Deployment errors and dead processes."""

    def test_import_failure_is_a_deployment_error(self) -> None:
        """A failing import: PreloadError with the exit status and the traceback lines."""
        release = make_release()

        async def body(h: Harness) -> None:
            env = base_env(PRELOAD_APP_FAIL="1")
            with pytest.raises(PreloadError) as err:
                await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            assert "exited with status 3 while importing preload_app" in err.value.reason
            assert "Traceback (most recent call last):" in err.value.output
            assert "RuntimeError: preload_app: import failure requested" in err.value.output
            assert h.preloaders[0].state is PreloaderState.EXITED

        run(body)

    def test_command_the_preloader_cannot_run(self) -> None:
        """Another interpreter, or no Python at all: refused with the reason (spawn cold)."""
        release = make_release()
        other_python = next(
            str(VENV_BIN / n) for n in ("python", "python3") if str(VENV_BIN / n) != PY
        )

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            with pytest.raises(PreloadRefused, match=r"command runs .*/python3?, the"):
                await h.spawn(p, [other_python, "-m", "preload_serve", "/y"], release, env)
            with pytest.raises(PreloadRefused, match="not a script with a #! line"):
                await h.spawn(p, ["/bin/sleep", "5"], release, env)
            assert p.spawned_total == 0 and p.state is PreloaderState.READY

        run(body)

    def test_import_that_never_ends(self) -> None:
        """Imports still running at the start timeout: killed, PreloadError with the reason."""
        release = make_release()

        async def body(h: Harness) -> None:
            env = base_env(PRELOAD_APP_IMPORT_DELAY="60")
            p = Preloader.for_command(
                app_argv("/x"), modules=["preload_app"], release=release, env=env
            )
            h.preloaders.append(p)
            with pytest.raises(
                PreloadError, match=r"did not finish importing preload_app within 0\.5s"
            ):
                await p.start(0.5)
            assert not running(p.pid)

        run(body)

    def test_missing_module(self) -> None:
        """A module that does not exist is an import failure like any other."""
        release = make_release()

        async def body(h: Harness) -> None:
            with pytest.raises(PreloadError) as err:
                await h.preloader(app_argv("/x"), ["no_such_module_xyz"], release, base_env())
            assert any("No module named 'no_such_module_xyz'" in x for x in err.value.output)

        run(body)

    def test_killed_preloader_leaves_workers_serving(self) -> None:
        """SIGKILL the preloader: its worker serves on, spawns say Gone, a new one works."""
        release = make_release()

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            sock = os.path.join(release, "k.sock")
            w, _ = await h.spawn(p, app_argv(sock), release, env)
            await wait_serving(sock, w)
            os.kill(p.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while p.state is not PreloaderState.EXITED and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert p.state is PreloaderState.EXITED and p.exit_code == -signal.SIGKILL
            assert (await fetch(sock))[0] == 200
            with pytest.raises(PreloaderGone):
                await h.spawn(p, app_argv(os.path.join(release, "k2.sock")), release, env)
            again = await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            sock2 = os.path.join(release, "k3.sock")
            w2, _ = await h.spawn(again, app_argv(sock2), release, env)
            await wait_serving(sock2, w2)
            # The orphan's exit is still noticed (its status died with its parent).
            w.kill()
            assert await asyncio.wait_for(w.wait(), 10) == UNKNOWN_EXIT

        run(body)

    def test_exit_status_reported(self) -> None:
        """Exit codes and killing signals come back through the preloader's reports."""
        release = make_release()

        async def body(h: Harness) -> None:
            env = base_env()
            p = await h.preloader(app_argv("/x"), ["preload_app"], release, env)
            socks = [os.path.join(release, f"e{i}.sock") for i in range(2)]
            w1, _ = await h.spawn(p, app_argv(socks[0]), release, env)
            w2, _ = await h.spawn(p, app_argv(socks[1]), release, env)
            for s, w in zip(socks, (w1, w2), strict=True):
                await wait_serving(s, w)
            with pytest.raises(ConnectionError):
                await fetch(socks[0], "/exit?code=7")
            assert await asyncio.wait_for(w1.wait(), 10) == 7
            w2.kill()
            assert await asyncio.wait_for(w2.wait(), 10) == -signal.SIGKILL
            with pytest.raises(ProcessLookupError):
                w2.terminate()
            assert p.workers == {}

        run(body)

    def test_workers_stop_when_the_daemon_is_killed(self) -> None:
        """The daemon SIGKILLed: its preloader and the forked worker are gone within 10 s."""
        release = make_release()
        sock = os.path.join(release, "d.sock")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
        daemon = subprocess.Popen(
            [PY, str(APPS / "preload_daemon.py"), release, sock],
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        try:
            assert daemon.stdout is not None
            pids: dict[str, Any] = json.loads(daemon.stdout.readline())
            assert running(pids["worker"]) and running(pids["preloader"])
            daemon.kill()
            daemon.wait(10)
            eventually(
                lambda: not running(pids["worker"]) and not running(pids["preloader"]),
                timeout=10,
                what="the preloader and its worker to stop after the daemon's death",
            )
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            if daemon.stdout is not None:
                daemon.stdout.close()


class _Popen:
    """``returncode``/``pid`` of a Popen, read fresh, for wait_serving."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()


def _kinds(fds: dict[int, str]) -> Counter[str]:
    return Counter(map(_kind, fds.values()))


def _kind(target: str) -> str:
    """pipe:[123] → pipe, socket:[9] → socket, anon_inode:[eventfd] → anon_inode:[eventfd]."""
    if target.startswith(("pipe:", "socket:")):
        return target.split(":")[0]
    return target


def test_lifeline_is_close_on_exec() -> None:
    """Neither end of the lifeline reaches an exec'd program (only pass_fds does)."""
    for fd in lifeline.fds():
        assert not os.get_inheritable(fd)

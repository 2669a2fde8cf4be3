"""The daemon's side of one preloader: start it, fork workers from it, stop it.

The preloader process runs :mod:`flypool.preload.server` under the app's
interpreter. It is started with ``create_subprocess_exec`` like a worker (the
event-loop process itself never forks), in a session of its own, with two
descriptors passed on: its end of the control channel (SOCK_SEQPACKET, JSON
messages, descriptors by SCM_RIGHTS) and the read end of the daemon's
lifeline (:mod:`flypool.preload.lifeline`). Its stdout and stderr share one
pipe, kept in :attr:`Preloader.output`: an import failure's traceback is
what a deployment error shows.

A worker forked by the preloader is not the daemon's child. Its
:class:`PreloadedProcess` watches it through a pidfd the preloader opened
and passed over (so a recycled pid is never signalled), and takes its exit
status from the preloader's ``exit`` report. If the preloader died, the
worker's status is lost with it (its new parent reaped it): ``wait()``
then returns ``UNKNOWN_EXIT``, like ``spawner.AdoptedProcess`` does for
workers adopted across a hand-over.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import json
import os
import signal
import socket
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flypool.exit_status import UNKNOWN_EXIT, describe_exit
from flypool.output_lines import lines
from flypool.preload import lifeline
from flypool.preload.command import NotPreloadable, Plan, plan_command

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py")
OUTPUT_LINES = 200
MAX_MESSAGE = 1 << 20
REPLY_TIMEOUT = 10.0
"""A fork request unanswered this long: the preloader is wedged."""
REPORT_GRACE = 2.0
"""After a worker's pidfd says it exited, wait this long for the exit report."""
"""``wait()`` result when the exit status died with the preloader."""


def recv_message(sock: socket.socket, maxfds: int) -> tuple[bytes, list[int]]:
    """One datagram and the descriptors that came with it, close-on-exec.

    Not ``socket.recv_fds``: it drops its ``flags`` argument, so received
    descriptors would be inheritable and leak into every program exec'd later.
    """
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(maxfds * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


class PreloadError(Exception):
    """The preloader could not be started: a deployment error, with its output."""

    def __init__(self, reason: str, output: Sequence[str]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.output = list(output)


class PreloadUnavailable(Exception):
    """This worker cannot be forked from the preloader: spawn it cold (log ``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PreloadRefused(PreloadUnavailable):
    """The preloader declined (threads running, a command it cannot run)."""


class PreloaderGone(PreloadUnavailable):
    """The preloader is not running (any more): start a new one for the next spawn."""


class PreloaderState(enum.Enum):
    """Lifecycle of one preloader."""

    NEW = "new"
    STARTING = "starting"  # process started, importing
    READY = "ready"  # serving fork requests
    STOPPING = "stopping"  # control channel closed by us, waiting for the exit
    EXITED = "exited"


TRANSITIONS: dict[PreloaderState, frozenset[PreloaderState]] = {
    PreloaderState.NEW: frozenset({PreloaderState.STARTING, PreloaderState.EXITED}),
    PreloaderState.STARTING: frozenset(
        {PreloaderState.READY, PreloaderState.STOPPING, PreloaderState.EXITED}
    ),
    PreloaderState.READY: frozenset({PreloaderState.STOPPING, PreloaderState.EXITED}),
    PreloaderState.STOPPING: frozenset({PreloaderState.EXITED}),
    PreloaderState.EXITED: frozenset(),
}


def default_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM --`` when available (the preloader dies with the daemon)."""
    from shutil import which

    setpriv = which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


class PreloadedProcess:
    """A worker forked by a preloader, shaped like ``asyncio.subprocess.Process``.

    ``pid``, ``returncode``, ``await wait()``, ``send_signal``, ``terminate``
    and ``kill``: what the pool uses of a process handle.
    """

    __slots__ = ("_done", "_exited", "_grace", "_loop", "_owner", "_pidfd", "pid", "returncode")

    def __init__(self, pid: int, pidfd: int, owner: Preloader | None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._owner = owner
        self._exited = False
        self._grace: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._pidfd_readable)

    def _pidfd_readable(self) -> None:
        # The process has ended; its status comes with the preloader's report.
        self._loop.remove_reader(self._pidfd)
        self._exited = True
        if self._owner is None:
            self._finish(UNKNOWN_EXIT)
        else:
            self._grace = self._loop.call_later(REPORT_GRACE, self._finish, UNKNOWN_EXIT)

    def _reported(self, code: int) -> None:
        self._finish(code)

    def _orphan(self) -> None:
        """The preloader is gone: nobody will report this worker's exit."""
        self._owner = None
        if self._exited:
            self._finish(UNKNOWN_EXIT)

    def _finish(self, code: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = code
        if self._grace is not None:
            self._grace.cancel()
        if not self._exited:
            self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._done.done():
            self._done.set_result(code)

    @property
    def pidfd(self) -> int | None:
        """The pidfd watching the worker while it runs (a USR2 hand-over passes it on)."""
        return self._pidfd if self.returncode is None else None

    async def wait(self) -> int:
        """The exit code (negative: killed by that signal; ``UNKNOWN_EXIT``: lost)."""
        return await asyncio.shield(self._done)

    def send_signal(self, sig: int) -> None:
        """Signal the worker (through its pidfd: never a recycled pid)."""
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<PreloadedProcess pid={self.pid} returncode={self.returncode}>"


class Preloader:
    """One preloader process for one release and interpreter (SPEC §11).

    Use: ``await start()`` (raises :class:`PreloadError` with the output on
    an import failure), then ``await spawn(argv, ...)`` for each worker
    (raises :class:`PreloadUnavailable` when it must spawn cold), and
    ``await stop()`` once no worker of its generation is left. ``on_output``
    gets each line the preloader itself writes.
    """

    def __init__(
        self,
        *,
        interpreter: str,
        flags: Sequence[str] = (),
        modules: Sequence[str],
        release: str,
        env: Mapping[str, str],
        prefix: Sequence[str] | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.interpreter = interpreter
        self.flags = tuple(flags)
        self.modules = tuple(modules)
        self.release = release
        self.env = dict(env)
        self.prefix = list(default_prefix() if prefix is None else prefix)
        self.log = log
        self.state = PreloaderState.NEW
        self.pid = 0
        self.exit_code: int | None = None
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self.import_s: float | None = None
        self.python = ""
        self.threads: str | None = None
        self.shared_fds: dict[str, str] = {}
        self.workers: dict[int, PreloadedProcess] = {}
        self.spawned_total = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._ctl: socket.socket | None = None
        self._pending: dict[int, asyncio.Future[PreloadedProcess]] = {}
        self._next_id = 1
        self._ready: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump_done: asyncio.Event = asyncio.Event()

    @classmethod
    def for_command(
        cls,
        argv: Sequence[str],
        *,
        modules: Sequence[str],
        release: str,
        env: Mapping[str, str],
        prefix: Sequence[str] | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> Preloader:
        """A preloader for the interpreter ``argv`` runs; raises NotPreloadable."""
        plan = plan_command(argv, release, env)
        return cls(
            interpreter=plan.interpreter,
            flags=plan.flags,
            modules=modules,
            release=release,
            env=env,
            prefix=prefix,
            log=log,
        )

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """The (interpreter, flags) every command forked from here must use."""
        return (self.interpreter, self.flags)

    @property
    def alive(self) -> bool:
        """True while fork requests can be served (or soon, while importing)."""
        return self.state in (PreloaderState.NEW, PreloaderState.STARTING, PreloaderState.READY)

    def _transition(self, new: PreloaderState) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"preloader {self.pid}: {self.state.value} -> {new.value}")
        self.state = new

    # -- start -----------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait until it has imported ``modules``."""
        loop = asyncio.get_running_loop()
        self._transition(PreloaderState.STARTING)
        self._ready = loop.create_future()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setblocking(False)
        lifeline_r, _ = lifeline.fds()
        out_r, out_w = os.pipe()
        argv = [
            *self.prefix,
            self.interpreter,
            *self.flags,
            BOOTSTRAP,
            str(child.fileno()),
            str(lifeline_r),
            *self.modules,
        ]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.release,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                pass_fds=(child.fileno(), lifeline_r),
                start_new_session=True,
            )
        except OSError as exc:
            parent.close()
            os.close(out_r)
            self._transition(PreloaderState.EXITED)
            raise PreloadError(f"cannot start preloader {self.interpreter!r}: {exc}", []) from exc
        finally:
            os.close(out_w)
            child.close()
        self.pid = self._proc.pid
        self._ctl = parent
        await self._follow_output(out_r)
        loop.add_reader(parent.fileno(), self._on_control)
        self._task(self._watch_process(self._proc))
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self._ready.cancel()  # nobody will look at how it ends
            await self._kill_now()
            await self._output_drained()
            raise PreloadError(
                f"preloader did not finish importing {', '.join(self.modules)} within {timeout:g}s",
                self.output,
            ) from None
        except PreloaderGone:
            await self._output_drained()
            code = await self._exit_code()
            raise PreloadError(
                f"preloader exited with status {describe_exit(code)} while importing "
                f"{', '.join(self.modules)}",
                self.output,
            ) from None
        if self.log is not None:
            self.log.info(
                "preloader ready",
                pid=self.pid,
                release=self.release,
                modules=list(self.modules),
                import_s=self.import_s,
            )
            if self.shared_fds:
                self.log.warning(
                    "preloaded modules left files open; every worker shares them",
                    pid=self.pid,
                    fds=self.shared_fds,
                )

    async def _exit_code(self) -> int | None:
        if self._proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(self._proc.wait()), 5.0)
        return None

    async def _kill_now(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    # -- spawning --------------------------------------------------------

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        stdout: int,
        stderr: int,
    ) -> PreloadedProcess:
        """Fork one worker running ``argv`` (placeholders already filled in).

        ``stdout``/``stderr`` are write ends of the caller's pipes; the caller
        still owns (and closes) its copies. Raises :class:`PreloadRefused` or
        :class:`PreloaderGone` when the worker must be spawned cold.
        """
        if self.state is not PreloaderState.READY or self._ctl is None:
            raise PreloaderGone(f"the preloader is {self.state.value}")
        try:
            plan = plan_command(argv, cwd, env)
        except NotPreloadable as exc:
            raise PreloadRefused(exc.reason) from None
        if plan.key != self.key:
            raise PreloadRefused(
                f"the command runs {' '.join(plan.key[:1] + plan.key[1])}, the preloader "
                f"{' '.join(self.key[:1] + self.key[1])}"
            )
        loop = asyncio.get_running_loop()
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[PreloadedProcess] = loop.create_future()
        self._pending[rid] = fut
        try:
            self._send(_spawn_request(rid, plan, env, cwd), [stdout, stderr])
            return await asyncio.wait_for(asyncio.shield(fut), REPLY_TIMEOUT)
        except TimeoutError:
            self._lost(f"did not answer a fork request within {REPLY_TIMEOUT:g}s")
            await self._kill_now()
            raise PreloaderGone(f"no answer to a fork request within {REPLY_TIMEOUT:g}s") from None
        finally:
            self._pending.pop(rid, None)

    def _send(self, msg: dict[str, Any], fds: list[int]) -> None:
        assert self._ctl is not None
        data = json.dumps(msg).encode()
        try:
            socket.send_fds(self._ctl, [data], fds)
        except BlockingIOError:
            # Messages are small and the preloader reads each at once; a full
            # buffer means it is stuck.
            raise PreloaderGone("the preloader is not reading its requests") from None
        except OSError as exc:
            self._lost(f"control channel: {exc}")
            raise PreloaderGone(f"the preloader is gone ({exc})") from None

    def _on_control(self) -> None:
        ctl = self._ctl
        while ctl is not None and self._ctl is ctl:
            try:
                data, fds = recv_message(ctl, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                self._lost("closed its control channel")
                return
            self._dispatch(json.loads(data), fds)

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "exit":
            handle = self.workers.pop(int(msg["pid"]), None)
            if handle is not None:
                handle._reported(int(msg["code"]))
        elif op == "spawned":
            self._spawned(int(msg["id"]), int(msg["pid"]), fds)
        elif op in ("refused", "error"):
            fut = self._pending.get(int(msg.get("id") or 0))
            if fut is not None and not fut.done():
                fut.set_exception(PreloadRefused(str(msg.get("reason"))))
        elif op == "ready":
            self.import_s = float(msg["import_s"])
            self.python = str(msg.get("python", ""))
            self.threads = msg.get("threads")
            self.shared_fds = dict(msg.get("shared_fds") or {})
            self._transition(PreloaderState.READY)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)

    def _spawned(self, rid: int, pid: int, fds: list[int]) -> None:
        # The handle is made here, not in spawn(): the exit report of a worker
        # that dies at once may be in the same batch of messages.
        if not fds:
            # No pidfd (cannot happen with the bundled server): watch by pid.
            fds = [os.pidfd_open(pid)]
        for extra in fds[1:]:
            os.close(extra)
        handle = PreloadedProcess(pid, fds[0], self)
        self.workers[pid] = handle
        self.spawned_total += 1
        fut = self._pending.get(rid)
        if fut is not None and not fut.done():
            fut.set_result(handle)
        else:
            # The caller gave up waiting: the worker must not run unmanaged.
            with contextlib.suppress(ProcessLookupError):
                handle.kill()

    # -- death and stop --------------------------------------------------

    def _lost(self, reason: str) -> None:
        """The control channel is gone: orphan the workers, fail pending forks."""
        ctl = self._ctl
        if ctl is None:
            return
        self._ctl = None
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(ctl.fileno())
        ctl.close()
        was = self.state
        if was is not PreloaderState.EXITED:
            # Unusable from now on; EXITED once the process is reaped.
            self._transition(PreloaderState.STOPPING)
        if self.log is not None and was is not PreloaderState.STOPPING:
            self.log.warning(
                "preloader gone", pid=self.pid, reason=reason, workers=len(self.workers)
            )
        gone = PreloaderGone(f"the preloader {reason}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(gone)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(gone)
        for handle in self.workers.values():
            handle._orphan()
        self.workers.clear()

    async def _watch_process(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self.exit_code = code
        # Messages it sent before dying are still queued: read them first.
        self._on_control()
        self._lost(f"exited with status {describe_exit(code)}")
        self._transition(PreloaderState.EXITED)

    async def stop(self, timeout: float = 5.0) -> None:
        """End the preloader (workers forked from it keep running, orphaned)."""
        if self._proc is None:
            self._transition(PreloaderState.EXITED)
            return
        if self.state is PreloaderState.EXITED:
            return
        self._transition(PreloaderState.STOPPING)
        # The end of the control channel tells it to exit.
        self._lost("stopped")
        proc = self._proc
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
        except TimeoutError:
            await self._kill_now()
        await self._output_drained()
        # The watcher task marks it EXITED once it has seen the exit.
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        """What status shows about this preloader."""
        return {
            "pid": self.pid,
            "state": self.state.value,
            "release": self.release,
            "modules": list(self.modules),
            "python": self.python,
            "import_s": self.import_s,
            "workers": len(self.workers),
            "spawned": self.spawned_total,
            "shared_fds": dict(self.shared_fds),
        }

    # -- output ----------------------------------------------------------

    async def _follow_output(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=65536)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
        )
        task = self._task(self._pump(reader))
        # uvloop does not close a read pipe at EOF: close it ourselves.
        task.add_done_callback(lambda _t: transport.close())

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            async for text in lines(reader):
                self.output.append(text)
                if self.log is not None:
                    self.log.info("preloader output", pid=self.pid, line=text)
        finally:
            self._pump_done.set()

    async def _output_drained(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pump_done.wait(), 2.0)

    def _task(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _spawn_request(rid: int, plan: Plan, env: Mapping[str, str], cwd: str) -> dict[str, Any]:
    return {
        "op": "spawn",
        "id": rid,
        "kind": plan.kind.value,
        "target": plan.target,
        "argv": list(plan.argv),
        "env": dict(env),
        "cwd": cwd,
    }

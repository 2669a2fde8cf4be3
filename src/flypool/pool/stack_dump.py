"""The Python stack of a stuck worker, taken just before it is killed.

Two sources, tried in order, each bounded in time and never blocking the
event loop:

1. ``py-spy dump`` (the optional ``stacks`` extra), for any Python worker,
   with ``--subprocesses`` so that the process that really serves (gunicorn's
   forked worker under its arbiter) is included. It needs ptrace rights on
   the worker: root, or the same user with ``kernel.yama.ptrace_scope`` 0.
2. For preloaded workers, ``faulthandler``, which the preloader registered on
   ``DUMP_SIGNAL`` in every worker it forked: the worker writes all its
   threads' stacks to its stderr, which the daemon reads anyway. The caller
   lends a :class:`LineFanout` the worker's stderr lines go through, and the
   dump is picked out of them by its format. Each process of the worker's
   tree is signalled in turn (never together: their dumps would interleave
   on the shared pipe).

When neither applies the stack is None and the second value says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
from collections.abc import Callable

import psutil

from flypool.preload import DUMP_SIGNAL

TIMEOUT = 2.0
MAX_STACK_CHARS = 64 * 1024
QUIET = 0.15
"""A faulthandler dump is complete when no dump line came for this long."""
_DUMP_LINE = re.compile(
    r"(?:Current thread|Thread) 0x[0-9a-fA-F]+ .*\(most recent call first\):"
    r"|Stack \(most recent call first\):"
    r'|  File ".*", line \d+ in .*'
    r"|  <no Python frame>|  \.\.\.|  Garbage-collecting|"
)
FIRST_LINE = 0.5
"""A process that has not started its dump this long after the signal has none."""
AUTO = "auto"


class LineFanout:
    """Hands each line of a worker's output to whoever listens right now.

    The daemon's output reader calls :meth:`feed` for every stderr line;
    :func:`dump_stack` listens only while it collects a dump.
    """

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[Callable[[str], None]] = []

    def feed(self, line: str) -> None:
        """One line the worker wrote (without its newline)."""
        for fn in self._listeners:
            fn(line)

    def listen(self, fn: Callable[[str], None]) -> Callable[[], None]:
        """Call ``fn`` for each line from now on; returns the function that stops it."""
        self._listeners.append(fn)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(fn)

        return stop


def find_py_spy() -> str | None:
    """The py-spy executable: on PATH, or next to this interpreter (a virtualenv's bin)."""
    found = shutil.which("py-spy")
    if found is not None:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.access(beside, os.X_OK) else None


async def dump_stack(
    pid: int,
    *,
    preloaded: bool,
    output: LineFanout | None = None,
    py_spy: str | None = AUTO,
    timeout: float = TIMEOUT,
) -> tuple[str | None, str]:
    """The Python stack of worker ``pid`` and where it came from, or None and why not.

    Returns ``(stack, "py-spy")``, ``(stack, "faulthandler")`` or
    ``(None, reason)``. ``py_spy`` is the executable (``AUTO``: look it up;
    None: do not use it). ``output`` carries the worker's stderr lines
    (needed for the faulthandler path).
    """
    exe = find_py_spy() if py_spy == AUTO else py_spy
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    why: list[str] = []
    if exe is not None:
        stack, reason = await _py_spy(exe, pid, timeout)
        if stack is not None:
            return stack, "py-spy"
        why.append(reason)
    else:
        why.append("py-spy is not installed")
    if not preloaded:
        why.append("the worker was not preloaded")
        return None, " and ".join(why)
    if output is None:
        why.append("the worker's stderr is not available for a faulthandler dump")
        return None, "; ".join(why)
    stack, reason = await _faulthandler(pid, output, max(deadline - loop.time(), 0.5))
    if stack is not None:
        return stack, "faulthandler"
    why.append(reason)
    return None, "; ".join(why)


async def _py_spy(exe: str, pid: int, timeout: float) -> tuple[str | None, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            "dump",
            "--pid",
            str(pid),
            "--subprocesses",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return None, f"py-spy could not start: {exc}"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None, f"py-spy did not answer within {timeout:g}s"
    text = out.decode(errors="replace")
    if proc.returncode != 0 or not text.strip():
        detail = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return None, f"py-spy failed (status {proc.returncode}): {detail}"
    return text[:MAX_STACK_CHARS], "py-spy"


async def _faulthandler(pid: int, output: LineFanout, timeout: float) -> tuple[str | None, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        pids = await asyncio.to_thread(_process_tree, pid)
    except psutil.Error as exc:
        return None, f"worker {pid} is gone ({exc.__class__.__name__})"
    dumps: list[str] = []
    for target in pids:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        text = await _one_dump(target, output, remaining)
        if text:
            dumps.append(f"Process {target}:\n{text}" if len(pids) > 1 else text)
    if not dumps:
        return None, f"no faulthandler dump on the worker's stderr within {timeout:g}s"
    return "\n\n".join(dumps)[:MAX_STACK_CHARS], "faulthandler"


def _process_tree(pid: int) -> list[int]:
    proc = psutil.Process(pid)
    return [pid, *(c.pid for c in proc.children(recursive=True))]


async def _one_dump(pid: int, output: LineFanout, timeout: float) -> str:
    """Signal one process and gather its dump from the stderr lines."""
    loop = asyncio.get_running_loop()
    lines: list[str] = []
    changed = asyncio.Event()

    def take(line: str) -> None:
        if _DUMP_LINE.fullmatch(line) and (lines or line.strip()):
            lines.append(line)
            changed.set()

    stop = output.listen(take)
    try:
        try:
            os.kill(pid, DUMP_SIGNAL)
        except ProcessLookupError:
            return ""
        deadline = loop.time() + timeout
        first_deadline = loop.time() + FIRST_LINE
        while True:
            changed.clear()
            # A process with no handler (a program the worker exec'd) ignores
            # SIGURG and writes nothing: don't let it eat the whole budget.
            wait = QUIET if lines else min(FIRST_LINE, first_deadline - loop.time())
            wait = min(wait, deadline - loop.time())
            if wait <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), wait)
            except TimeoutError:
                break
    finally:
        stop()
    return "\n".join(lines).strip("\n")

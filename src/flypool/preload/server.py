"""The preloader process: import an app's modules once, then fork workers on request.

This file runs under the *app's* interpreter, by file path::

    APP_PYTHON [FLAGS] .../flypool/preload/server.py CONTROL_FD LIFELINE_FD MODULE...

with the release directory as working directory. The app's virtualenv need
not have flypool installed, so this file imports nothing but the standard
library (Python >= 3.9) and never imports the rest of flypool.

Theory of operation
-------------------
1. Import each MODULE (with the working directory first on ``sys.path``, as
   ``python -m`` has it). An import error prints its traceback and exits with
   ``EXIT_IMPORT_FAILED``: the daemon reports the output as a deployment error.
2. ``gc.freeze()`` the imported objects, so that the cyclic GC of a worker
   does not write to (and so copy) the pages it shares with the preloader.
3. Send ``ready`` on the control channel, a SOCK_SEQPACKET socket: one JSON
   message per datagram, file descriptors travel with SCM_RIGHTS.
4. Serve ``spawn`` requests, one at a time, single-threaded, with no event
   loop (a loop's state would be inherited by every worker):

   - refused, with the reason, when more than one thread runs (``fork()``
     copies only the calling thread; locks held by others stay locked);
   - else ``fork()``. The parent answers ``spawned`` with the child's pid and
     a pidfd for it (opened before the child can be reaped, so the daemon's
     handle can never name a recycled pid), then reaps children on SIGCHLD
     and reports each ``exit``.
   - The child becomes the worker (``_Worker.prepare``): its own session;
     the daemon's pipes as stdout/stderr; every other inherited descriptor
     closed except those the imports left open (they belong to the app and
     are reported in ``ready``); the request's environment, cwd and argv;
     ``random`` reseeded; faulthandler on ``DUMP_SIGNAL``; the lifeline armed.
     Then the serve loop *returns* to the top level, and the command's entry
     point runs there through ``runpy``, as ``python -m``/``python SCRIPT``
     would run it: ``SystemExit``, atexit handlers and the final flush behave
     as in a cold-started worker.
5. End of the control channel (the daemon closed it or died): exit 0. The
   workers are in sessions of their own and keep running.

The lifeline (parent-death signal for workers)
---------------------------------------------
A worker's parent is this preloader, not the daemon, and it must outlive the
preloader (a killed preloader leaves its workers serving), so PR_SET_PDEATHSIG
does not fit. Instead the daemon holds the only write end of a pipe whose read
end each worker reopens through ``/proc/self/fd`` (a file description of its
own) with ``O_ASYNC`` and ``F_SETSIG = SIGTERM`` owned by its process group:
when the daemon dies, the last writer closes and the kernel sends SIGTERM to
every worker's process group. That one pipe is the only descriptor a
preloaded worker has beyond those of a cold one.

Stack dumps
-----------
``faulthandler`` is registered on ``DUMP_SIGNAL`` (SIGURG) in every worker,
writing all threads' stacks to stderr. SIGURG is used by neither gunicorn
(HUP, QUIT, INT, TERM, TTIN, TTOU, USR1, USR2, WINCH, CHLD) nor uvicorn
(INT, TERM, HUP), and its default action is to be ignored, so signalling a
process that has no handler (a program the worker exec'd) does no harm.
"""

from __future__ import annotations

import array
import faulthandler
import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import time
import traceback

PROTOCOL = 1
DUMP_SIGNAL = signal.SIGURG
EXIT_USAGE = 2
EXIT_IMPORT_FAILED = 3
MAX_MESSAGE = 1 << 20
MAX_FDS = 4
F_SETSIG = 10  # <linux/fcntl.h>; not exported by every Python's fcntl module


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


def _fd_list() -> set[int]:
    """The descriptors open right now.

    The listing shows the descriptor it reads the directory through; that
    one is closed again by the time we look, which is how it is left out.
    """
    found = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _thread_blocker() -> str | None:
    """Why forking now is unsafe, or None when this is the only thread."""
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if tasks <= 1 and not others:
        return None
    names = f" (Python threads: {', '.join(others)})" if others else ""
    return f"{tasks} threads are running in the preloader{names}; fork() would copy only one"


class Job:
    """What a freshly forked worker runs once the serve loop has returned."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        self.target = target

    def run(self) -> None:
        """Run the entry point the way ``python -m`` or ``python SCRIPT`` would."""
        if self.kind == "module":
            runpy.run_module(self.target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(self.target, run_name="__main__")


class Server:
    """The serve loop of one preloader (see the module docstring)."""

    def __init__(self, control_fd: int, lifeline_fd: int, shared_fds: set[int]) -> None:
        self.ctl = socket.socket(fileno=control_fd)
        self.ctl.setblocking(True)
        self.lifeline_fd = lifeline_fd
        self.shared_fds = shared_fds
        self.gone = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        # The C-level handler writes to wake_w, so poll() returns on SIGCHLD.
        signal.signal(signal.SIGCHLD, _noop)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)

    def send(self, msg: dict[str, object], fds: list[int] | None = None) -> None:
        """One message to the daemon (blocking: the daemon always reads).

        A daemon that went away is noticed here or as the end of the control
        channel; either way the serve loop ends.
        """
        data = json.dumps(msg).encode()
        try:
            if fds:
                socket.send_fds(self.ctl, [data], fds)
            else:
                self.ctl.send(data)
        except OSError:
            self.gone = True

    def serve(self) -> Job | None:
        """Serve until the daemon goes away (None) or, in a forked child, return its Job."""
        poller = select.poll()
        poller.register(self.ctl.fileno(), select.POLLIN)
        poller.register(self.wake_r.fileno(), select.POLLIN)
        while not self.gone:
            for fd, _events in poller.poll():
                if fd == self.wake_r.fileno():
                    self._drain_wakeup()
                    self._reap()
                    continue
                try:
                    data, fds = recv_message(self.ctl, MAX_FDS)
                except ConnectionError:
                    data, fds = b"", []
                if not data:
                    for f in fds:
                        os.close(f)
                    return None
                job = self._handle(json.loads(data), fds)
                if job is not None:
                    return job
        return None

    def _drain_wakeup(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.send({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def _handle(self, msg: dict[str, object], fds: list[int]) -> Job | None:
        if msg.get("op") != "spawn" or len(fds) != 2:
            for f in fds:
                os.close(f)
            self.send({"op": "error", "id": msg.get("id"), "reason": "bad request"})
            return None
        blocker = _thread_blocker()
        if blocker is not None:
            for f in fds:
                os.close(f)
            self.send({"op": "refused", "id": msg["id"], "reason": blocker})
            return None
        # Buffered output of the preloader must not be written twice.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return _Worker(self, msg, fds).prepare()
        for f in fds:
            os.close(f)
        # The child cannot have been reaped yet (only this loop reaps), so
        # the pidfd names exactly this child.
        pidfd = os.pidfd_open(pid)
        try:
            self.send({"op": "spawned", "id": msg["id"], "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)
        return None


def _noop(_signum: int, _frame: object) -> None:
    pass


class _Worker:
    """Turns a just-forked child of the preloader into the requested worker."""

    def __init__(self, server: Server, msg: dict[str, object], fds: list[int]) -> None:
        self.server = server
        self.msg = msg
        self.out_fd, self.err_fd = fds

    def prepare(self) -> Job:
        """Set up the process like a cold-started worker; return the entry point to run."""
        msg = self.msg
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(self.out_fd, 1)
        os.dup2(self.err_fd, 2)
        # Close the preloader's sockets through their objects, so that no
        # object is left to close a descriptor number the app reuses later.
        for sock in (self.server.ctl, self.server.wake_r, self.server.wake_w):
            sock.close()
        keep = {0, 1, 2} | self.server.shared_fds
        lifeline = self._arm_lifeline()
        if lifeline is not None:
            keep.add(lifeline)
        for fd in _fd_list() - keep:
            try:
                os.close(fd)
            except OSError:
                pass
        os.chdir(str(msg["cwd"]))
        env = msg["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        # random reseeds itself at fork (os.register_at_fork); say it anyway.
        rnd = sys.modules.get("random")
        if rnd is not None:
            rnd.seed()
        faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
        argv = msg["argv"]
        assert isinstance(argv, list)
        sys.argv = [str(a) for a in argv]
        kind = str(msg["kind"])
        target = str(msg["target"])
        if not _safe_path():
            # What the interpreter puts first on sys.path for this entry point.
            path0 = os.getcwd() if kind == "module" else os.path.dirname(os.path.realpath(target))
            if sys.path and sys.path[0] == _PRELOAD_PATH0:
                sys.path[0] = path0
            else:
                sys.path.insert(0, path0)
        if lifeline is not None and _hung_up(lifeline):
            os._exit(0)  # the daemon died while this worker was being forked
        return Job(kind, target)

    def _arm_lifeline(self) -> int | None:
        fd = self.server.lifeline_fd
        if fd < 0:
            return None
        import fcntl

        # A description of our own: F_SETOWN is per open file description.
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.close(fd)
        fcntl.fcntl(own, fcntl.F_SETOWN, -os.getpid())  # our whole process group
        fcntl.fcntl(own, F_SETSIG, signal.SIGTERM)
        flags = fcntl.fcntl(own, fcntl.F_GETFL)
        fcntl.fcntl(own, fcntl.F_SETFL, flags | os.O_ASYNC)
        return own


def _hung_up(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _fd, ev in p.poll(0))


def _safe_path() -> bool:
    return bool(getattr(sys.flags, "safe_path", False) or sys.flags.isolated)


_PRELOAD_PATH0 = ""


def _import_all(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            print(f"flypool preloader: importing {name!r} failed", file=sys.stderr)
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(EXIT_IMPORT_FAILED)


def main(argv: list[str]) -> Job | None:
    """Import, announce, serve; return a Job in a forked worker, None in the preloader."""
    global _PRELOAD_PATH0
    if len(argv) < 2 or sys.version_info < (3, 9):
        print("usage: server.py CONTROL_FD LIFELINE_FD MODULE... (Python >= 3.9)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    control_fd, lifeline_fd = int(argv[0]), int(argv[1])
    modules = argv[2:]
    if not _safe_path():
        # The interpreter put this file's directory first; an app sees its
        # working directory there instead (as with ``python -m``).
        _PRELOAD_PATH0 = os.getcwd()
        if sys.path:
            sys.path[0] = _PRELOAD_PATH0
        else:
            sys.path.insert(0, _PRELOAD_PATH0)
    before = _fd_list()
    started = time.monotonic()
    _import_all(modules)
    import_s = time.monotonic() - started
    shared = _fd_list() - before
    gc.collect()
    gc.freeze()
    server = Server(control_fd, lifeline_fd, shared)
    server.send(
        {
            "op": "ready",
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "import_s": round(import_s, 6),
            "shared_fds": {str(fd): _fd_target(fd) for fd in sorted(shared)},
            "threads": _thread_blocker(),
        }
    )
    return server.serve()


if __name__ == "__main__":
    _job = main(sys.argv[1:])
    if _job is not None:
        _job.run()

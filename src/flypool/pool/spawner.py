"""Starting, probing and stopping one worker process (SPEC §2).

Workers are started with ``create_subprocess_exec`` (fork+exec by libuv;
nothing else forks the event-loop process), in a session of their own so a
stop reaches their children, and through util-linux ``setpriv
--pdeathsig`` so that a daemon killed with SIGKILL takes its workers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from flypool.config import AppConfig
from flypool.exit_status import UNKNOWN_EXIT, describe_exit
from flypool.output_lines import lines
from flypool.pool.worker import Worker

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

SETPRIV = shutil.which("setpriv")
# Output reader tasks, referenced until they end (the loop keeps weak refs only).
_PUMPS: set[asyncio.Task[None]] = set()
MAX_SOCKET_PATH = 107


class SpawnError(Exception):
    """The worker could not be started or never became ready."""


class ProcessHandle(Protocol):
    """What the controller needs of a worker process, however it was started."""

    @property
    def pid(self) -> int:
        """The worker's pid."""

    @property
    def returncode(self) -> int | None:
        """The exit code once it exited, else None."""

    async def wait(self) -> int:
        """Wait for the exit; the code (negative: killed by that signal)."""


class Launcher(Protocol):
    """One way of starting a worker process: the spawn step of the controller.

    ``start`` fills in ``w.pid``, ``w.proc``, ``w.spawn`` and the output
    readers (``w.pumps``, ``w.output_fds``), and returns once the process
    exists; readiness is probed by the controller. A preloader (SPEC §11)
    is another Launcher.
    """

    async def start(self, cfg: AppConfig, w: Worker, log: FilteringBoundLogger) -> ProcessHandle:
        """Start the worker's process; raise SpawnError when it cannot be started."""


def resolve_release(root: str) -> str:
    """The directory ``root`` points to right now (symlinks resolved)."""
    release = os.path.realpath(root)
    if not os.path.isdir(release):
        raise SpawnError(f"root {root!r} does not resolve to a directory (got {release!r})")
    return release


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def app_runtime_dir(cfg: AppConfig, runtime_dir: str) -> str:
    """Create the app's socket directory, owned by the worker user so it can bind there."""
    path = os.path.join(runtime_dir, cfg.name)
    os.makedirs(path, mode=0o700, exist_ok=True)
    ident = worker_identity(cfg)
    if ident is not None:
        os.chown(path, ident.uid, ident.gid)
    return path


def worker_address(cfg: AppConfig, number: int, runtime_dir: str) -> str:
    """A private socket path (or 127.0.0.1:port) for worker ``number``."""
    if cfg.worker_bind == "tcp":
        return f"127.0.0.1:{_free_port()}"
    path = os.path.join(runtime_dir, cfg.name, f"{number}.sock")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise SpawnError(
            f"worker socket path {path!r} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter runtime_dir or app name"
        )
    return path


class Identity:
    """Who a worker runs as when the daemon is root (SPEC §3 ``user``/``group``)."""

    __slots__ = ("gid", "home", "name", "uid")

    def __init__(self, uid: int, gid: int, name: str, home: str) -> None:
        self.uid = uid
        self.gid = gid
        self.name = name
        self.home = home


def worker_identity(cfg: AppConfig) -> Identity | None:
    """The uid/gid to drop to, or None to keep the daemon's (not root, or user = "root").

    Without ``group`` the user's primary group is used, never the daemon's
    group 0. Raises SpawnError for unknown users or groups.
    """
    if os.geteuid() != 0 or not (cfg.user or cfg.group):
        return None
    try:
        pw = pwd.getpwnam(cfg.user) if cfg.user else pwd.getpwuid(0)
    except KeyError:
        raise SpawnError(f"user {cfg.user!r} does not exist") from None
    gid = pw.pw_gid
    if cfg.group:
        try:
            gid = grp.getgrnam(cfg.group).gr_gid
        except KeyError:
            raise SpawnError(f"group {cfg.group!r} does not exist") from None
    if pw.pw_uid == 0 and gid == 0:
        return None
    return Identity(pw.pw_uid, gid, pw.pw_name, pw.pw_dir)


def build_argv(cfg: AppConfig, address: str, ident: Identity | None = None) -> list[str]:
    """The command with ``{socket}``/``{port}`` filled in, wrapped for pdeathsig/user."""
    port = address.rpartition(":")[2] if not address.startswith("/") else ""
    argv = [a.replace("{socket}", address).replace("{port}", port) for a in cfg.command]
    if SETPRIV is None:
        return argv
    # setpriv execs the command in the same process: the pid flypool sees is
    # the worker's, and the parent-death signal survives the exec.
    prefix = [SETPRIV, "--pdeathsig", "TERM"]
    if ident is not None:
        # Groups first, then the uid: setpriv applies them before exec.
        prefix += ["--regid", str(ident.gid), "--reuid", str(ident.uid)]
        prefix += ["--init-groups"] if ident.uid != 0 and ident.name else ["--clear-groups"]
    return [*prefix, "--", *argv]


def build_env(cfg: AppConfig, number: int, address: str) -> dict[str, str]:
    """The worker's environment: the daemon's, the app's ``env`` and FLYPOOL_* (SPEC §2)."""
    env = dict(os.environ)
    env.update(cfg.env)
    env["FLYPOOL_APP"] = cfg.name
    env["FLYPOOL_WORKER"] = str(number)
    env.pop("FLYPOOL_SOCKET", None)
    env.pop("PORT", None)
    if address.startswith("/"):
        env["FLYPOOL_SOCKET"] = address
    else:
        env["PORT"] = address.rpartition(":")[2]
    # The daemon's own control variables are not for apps.
    for key in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(key, None)
    return env


class ColdLauncher:
    """fork+exec of the app's command (the default spawn mode)."""

    async def start(self, cfg: AppConfig, w: Worker, log: FilteringBoundLogger) -> ProcessHandle:
        """Exec the worker; see :func:`start`."""
        return await start(cfg, w, log)


async def start(cfg: AppConfig, w: Worker, log: FilteringBoundLogger) -> asyncio.subprocess.Process:
    """Exec the worker; its output is read and logged by background tasks."""
    if w.address.startswith("/"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.address)
    ident = worker_identity(cfg)
    if ident is not None and SETPRIV is None:
        raise SpawnError("user/group need util-linux setpriv, which is not installed")
    argv = build_argv(cfg, w.address, ident)
    env = build_env(cfg, w.number, w.address)
    if ident is not None:
        env.update(HOME=ident.home, USER=ident.name, LOGNAME=ident.name)
    # The output pipes are ours (not asyncio's), so that a USR2 hand-over can
    # pass their read ends to the next daemon image.
    with output_pipes() as (out_r, out_w, err_r, err_w):
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=w.release,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
            )
        except OSError as exc:
            raise SpawnError(f"cannot start {cfg.command[0]!r}: {exc}") from exc
    w.proc = proc
    w.pid = proc.pid
    w.spawn = "cold"
    await follow_output(w, out_r, err_r, cfg.name, log)
    return proc


async def follow_output(
    w: Worker, out_fd: int, err_fd: int, app: str, log: FilteringBoundLogger
) -> None:
    """Read the worker's stdout/stderr pipes line by line in background tasks."""
    loop = asyncio.get_running_loop()
    w.output_fds = (out_fd, err_fd)
    for fd, name in ((out_fd, "stdout"), (err_fd, "stderr")):
        reader = asyncio.StreamReader(limit=65536)
        transport, _ = await loop.connect_read_pipe(
            lambda r=reader: asyncio.StreamReaderProtocol(r),  # type: ignore[misc]
            os.fdopen(fd, "rb", 0),
        )
        task = loop.create_task(_pump(reader, name, w, app, log))
        w.pumps.append(task)
        # uvloop does not close a read pipe at EOF: close it, or every exited
        # worker would leave two descriptors behind.
        task.add_done_callback(_closer(transport))
        _PUMPS.add(task)
        task.add_done_callback(_PUMPS.discard)


def _closer(transport: asyncio.BaseTransport) -> Callable[[asyncio.Task[None]], None]:
    def close(_task: asyncio.Task[None]) -> None:
        transport.close()

    return close


class AdoptedProcess:
    """A worker inherited across a USR2 hand-over: watched through a pidfd.

    uvloop only reaps processes it spawned itself, and SIGCHLD belongs to it,
    so the exit of an adopted child is noticed with ``pidfd_open`` and reaped
    with a targeted ``waitpid`` (never ``waitpid(-1)``).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = loop.create_future()
        self._fd = os.pidfd_open(pid)
        loop.add_reader(self._fd, self._exited)

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._fd)
        os.close(self._fd)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = UNKNOWN_EXIT
        self.returncode = code
        if not self._done.done():
            self._done.set_result(code)

    async def wait(self) -> int:
        """The exit code (negative: killed by that signal)."""
        return await asyncio.shield(self._done)


@contextlib.contextmanager
def output_pipes() -> Iterator[tuple[int, int, int, int]]:
    """Pipes for a child's stdout and stderr: ``(out_r, out_w, err_r, err_w)``.

    The write ends are closed when the block ends (the child has its copies);
    the read ends too when the block raises (no child will write to them).
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        yield out_r, out_w, err_r, err_w
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)


async def _pump(
    stream: asyncio.StreamReader, name: str, w: Worker, app: str, log: FilteringBoundLogger
) -> None:
    """Log each line the worker writes, and keep the last ones for status."""
    async for text in lines(stream):
        w.output.append(text)
        log.info("worker output", app=app, pid=w.pid, stream=name, line=text)
        if w.fanout is not None and name == "stderr":
            w.fanout.feed(text)  # a faulthandler stack dump is collected from here


async def _probe(cfg: AppConfig, address: str) -> bool:
    """One readiness attempt: connect, then GET ready_path when configured."""
    try:
        if address.startswith("/"):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return False
    try:
        if not cfg.ready_path:
            return True
        writer.write(
            b"GET %s HTTP/1.1\r\nHost: localhost\r\nUser-Agent: flypool-probe\r\n"
            b"Connection: close\r\n\r\n" % cfg.ready_path.encode()
        )
        status_line = await asyncio.wait_for(reader.readline(), 5.0)
        parts = status_line.split()
        return len(parts) >= 2 and parts[1].startswith(b"2")
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def wait_ready(
    cfg: AppConfig, w: Worker, proc: ProcessHandle, deadline: float | None = None
) -> None:
    """Return once the worker is ready; raise SpawnError when it exits or times out.

    A worker's socket appearing has no event to wait for, so this polls. For
    a Unix socket it first waits for the file to exist (one stat every 2 ms,
    a few microseconds each), then probes (connect, and GET ready_path when
    set) every 2 ms growing to 10 ms; a TCP worker is probed the same way.
    A ready worker is so noticed within about 2 ms.
    """
    loop = asyncio.get_running_loop()
    if deadline is None:
        deadline = loop.time() + cfg.start_timeout
    delay = 0.002
    unix = w.address.startswith("/")
    while True:
        if proc.returncode is not None:
            raise SpawnError(f"exited with status {describe_exit(proc.returncode)} before ready")
        # A stat in the daemon's own runtime directory (local, no network FS).
        if unix and not os.path.exists(w.address):  # noqa: ASYNC240
            ready = False  # not bound yet: no connect attempt needed
        else:
            ready = await _probe(cfg, w.address) and _running(proc)
            if not ready:
                delay = min(delay * 2, 0.01)
        if ready:
            return
        if loop.time() >= deadline:
            what = f"GET {cfg.ready_path} did not answer 2xx" if cfg.ready_path else "no listener"
            raise SpawnError(f"not ready within start_timeout {cfg.start_timeout:g}s ({what})")
        await asyncio.sleep(delay)


def _running(proc: ProcessHandle) -> bool:
    # A separate call so the type checker doesn't assume returncode is unchanged.
    return proc.returncode is None


def signal_group(pid: int, sig: int) -> None:
    """Signal the worker's process group (its children too); ignore a gone process."""
    if pid <= 0:
        return
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def cleanup_socket(w: Worker) -> None:
    """Remove the worker's socket file if the worker left it behind."""
    if w.address.startswith("/"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.address)

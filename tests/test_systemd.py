"""systemd and runit integration: sd_notify, socket activation, unit files, run scripts.

The daemon is run for real: against a datagram socket standing in for systemd's
NOTIFY_SOCKET, under Debian's ``systemd-socket-activate``, and under a tiny
stand-in for a socket unit that keeps the listening socket across daemon restarts.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from flypool import systemd
from flypool.config import parse_listen
from tests.support import PYTHON, Daemon, _not_zombie, eventually, get, short_dir, write_config

ROOT = Path(__file__).resolve().parent.parent
SERVICE_UNIT = ROOT / "systemd" / "flypool.service"
SOCKET_UNIT = ROOT / "systemd" / "flypool.socket"
RUNIT_DIR = ROOT / "packaging" / "runit" / "flypool"
SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
needs_socket_activate = pytest.mark.skipif(
    not os.access(SOCKET_ACTIVATE, os.X_OK),
    reason="systemd-socket-activate missing (Debian package `systemd`)",
)
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
BOOT_DELAY = "0.4"
"""Workers take this long to listen, so "ready too early" is visible in status."""
Connect = Callable[[], socket.socket]
"""Opens a new client connection to the front socket."""
FLYPOOL_RUN = [PYTHON, "-m", "flypool", "run", "-c"]
# Stands in for systemd when it hands a socket unit's socket to the service:
# the socket becomes fd 3 and LISTEN_PID is the pid of the exec'd program.
ACTIVATOR = textwrap.dedent(
    """
    import os, sys
    fd = int(sys.argv[1])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.set_inheritable(3, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execv(sys.argv[2], sys.argv[2:])
    """
)


# -- helpers ------------------------------------------------------------------------


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A short directory (Unix socket paths are limited), removed afterwards."""
    d = Path(short_dir())
    yield d
    shutil.rmtree(d, ignore_errors=True)


def parse_notification(datagram: bytes) -> dict[str, str]:
    """``KEY=VALUE`` lines of one sd_notify datagram."""
    out: dict[str, str] = {}
    for line in datagram.decode().split("\n"):
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r} in {datagram!r}"
        out[key] = value
    return out


class NotifyReceiver:
    """An AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float = 15.0) -> dict[str, str]:
        """The next notification; fail after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"no notification within {timeout}s; got so far: {self.received}"
            ) from None
        msg = parse_notification(data)
        self.received.append(msg)
        return msg

    def pending(self) -> list[dict[str, str]]:
        """Notifications already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(parse_notification(self.sock.recv(65536)))
        self.received += out
        return out

    def close(self) -> None:
        """Close and remove the socket."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without systemd variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.update(extra)
    return env


def stop_daemon(dm: Daemon) -> int | None:
    """SIGTERM, bounded wait, SIGKILL; then check (and ensure) no worker survives."""
    if dm.proc.poll() is None:
        with contextlib.suppress(Exception):
            dm.status()  # remember the current worker pids
    try:
        return dm.stop(timeout=20)
    finally:
        try:
            dm.assert_no_workers_left()
        finally:
            for pid in dm.seen_pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if _not_zombie(pid):
                        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def launched(
    d: Path, cfg: Path, argv: list[str], env: dict[str, str], **popen: Any
) -> Iterator[Daemon]:
    """Start ``argv`` (a flypool daemon, perhaps behind a wrapper that execs it).

    The daemon is stopped by pid when the block ends, and its workers must be gone.
    """
    log_path = d / f"daemon.{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(d), env=env, **popen
        )
    dm = Daemon(d, cfg, proc, log_path)
    try:
        yield dm
    finally:
        stop_daemon(dm)


SO_ACCEPTCON = 0x10000
"""/proc/net/unix flag of a listening socket."""


def unix_inodes(path: str, *, listening: bool) -> set[int]:
    """Inodes of the sockets with address ``path``: the listening ones, or the others.

    Connections a listener accepted carry its path as their address too: only
    the listening flag tells the listener apart.
    """
    with open("/proc/net/unix") as f:
        next(f)
        return {
            int(fields[6])
            for fields in map(str.split, f)
            if len(fields) >= 8
            and fields[7] == path
            and bool(int(fields[3], 16) & SO_ACCEPTCON) is listening
        }


def unix_listening(path: str) -> bool:
    """Some process listens on the Unix socket ``path`` (bound is not enough to connect)."""
    return bool(unix_inodes(path, listening=True))


def wait_admin(dm: Daemon, timeout: float = 15.0) -> None:
    """Until the admin socket listens; fail at once if the daemon exited."""

    def up() -> str | None:
        if dm.proc.poll() is not None:
            return "exited"
        return "up" if unix_listening(dm.admin) else None

    if eventually(up, timeout, what="admin socket") == "exited":
        raise AssertionError(f"daemon exited with {dm.proc.returncode}:\n{dm.log()}")


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with (/proc/PID/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(): v.decode(errors="replace") for k, _, v in pairs}


def socket_inodes(pid: int) -> dict[int, int]:
    """fd -> socket inode for every socket ``pid`` holds."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                out[int(fd)] = int(target[len("socket:[") : -1])
    return out


def send_early_request(connect: Connect) -> socket.socket:
    """Connect and send a whole request now; the answer is read later."""
    s = connect()
    s.settimeout(30)
    s.sendall(REQUEST)
    return s


def read_response(s: socket.socket) -> bytes:
    """Everything until the server closes (the request said Connection: close)."""
    chunks = []
    with s:
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


def unix_client(path: str) -> Connect:
    """A connect function for a Unix socket."""

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except BaseException:
            s.close()
            raise
        return s

    return connect


def tcp_client(port: int) -> Connect:
    """A connect function for 127.0.0.1:port."""

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    return connect


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def check_workers_clean(dm: Daemon, listener_inode: int) -> None:
    """Workers see no systemd variables and do not hold the front socket."""
    pids = dm.wait_ready(2)
    for pid in pids:
        env = environ_of(pid)
        assert env.get("FLYPOOL_APP") == "app", env  # really a worker's environment
        leaked = {k for k in env if k.startswith(("LISTEN_", "NOTIFY_SOCKET"))}
        assert not leaked, f"worker {pid} inherited {leaked}"
        assert listener_inode not in socket_inodes(pid).values(), (
            f"worker {pid} holds the front socket"
        )


# -- sd_notify ----------------------------------------------------------------------


def test_notify_ready_reload_stopping(tmp_short: Path) -> None:
    """READY=1 only once every worker is ready; RELOADING/READY on HUP; STOPPING on TERM."""
    d = tmp_short
    cfg = write_config(d, {"workers": 2, "env": {"EXAMPLE_BOOT_DELAY": BOOT_DELAY}})
    rx = NotifyReceiver(str(d / "notify.sock"))
    try:
        with launched(d, cfg, [*FLYPOOL_RUN, str(cfg)], child_env(NOTIFY_SOCKET=rx.path)) as dm:
            ready = rx.next()
            app = dm.app()  # at once: the daemon must not have said READY too early
            assert ready.get("READY") == "1", rx.received
            assert [w["state"] for w in app["workers"]] == ["ready", "ready"], app
            assert ready["MAINPID"] == str(dm.proc.pid)
            assert ready["STATUS"] == "app: 2/2 ready"
            for pid in [w["pid"] for w in app["workers"]]:
                env = environ_of(pid)
                assert env.get("FLYPOOL_APP") == "app"
                assert "NOTIFY_SOCKET" not in env, f"worker {pid} inherited NOTIFY_SOCKET"

            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            dm.signal(signal.SIGHUP)
            reloading = rx.next()
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert reloading.get("RELOADING") == "1", rx.received
            # The same clock as systemd's: CLOCK_MONOTONIC in microseconds.
            assert before <= int(reloading["MONOTONIC_USEC"]) <= after
            ready_again = rx.next()
            app = dm.app()
            assert ready_again.get("READY") == "1", rx.received
            assert ready_again["MAINPID"] == str(dm.proc.pid)
            assert len([w for w in app["workers"] if w["state"] == "ready"]) == 2, app

            assert stop_daemon(dm) == 0, dm.log()[-3000:]
            stopping = rx.pending()
            assert stopping, f"no STOPPING=1 after SIGTERM; got {rx.received}"
            assert stopping[0].get("STOPPING") == "1", rx.received
    finally:
        rx.close()


def test_ready_after_reload_means_restart_finished(tmp_short: Path) -> None:
    """After HUP, READY=1 comes when every worker runs the new config, not before.

    That is what makes `systemctl reload flypool` (which waits from RELOADING=1
    to READY=1) usable in a deploy script, like `flypool restart --wait`.
    """
    d = tmp_short
    cfg = write_config(d, {"workers": 2, "env": {"EXAMPLE_BOOT_DELAY": BOOT_DELAY}})
    rx = NotifyReceiver(str(d / "notify.sock"))
    try:
        with launched(d, cfg, [*FLYPOOL_RUN, str(cfg)], child_env(NOTIFY_SOCKET=rx.path)) as dm:
            assert rx.next().get("READY") == "1"
            old = {w["pid"] for w in dm.app()["workers"]}
            dm.signal(signal.SIGHUP)
            assert rx.next().get("RELOADING") == "1"
            assert rx.next().get("READY") == "1"
            app = dm.app()
            assert app["restart"] is None, app["restart"]
            assert not old & {w["pid"] for w in app["workers"]}, app["workers"]
    finally:
        rx.close()


def test_notifier_messages_and_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wire format, the "@" abstract namespace, and silence without NOTIFY_SOCKET."""
    name = f"flypool-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        rx.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = systemd.Notifier.from_env()
        assert "NOTIFY_SOCKET" not in os.environ
        n.ready("blog: 4/4 ready\nsecond line")
        msg = parse_notification(rx.recv(4096))
        assert msg == {
            "READY": "1",
            "STATUS": "blog: 4/4 ready second line",
            "MAINPID": str(os.getpid()),
        }
        n.reloading()
        msg = parse_notification(rx.recv(4096))
        assert msg["RELOADING"] == "1" and int(msg["MONOTONIC_USEC"]) > 0
        n.stopping()
        assert parse_notification(rx.recv(4096))["STOPPING"] == "1"
    # systemd gone: sending is a no-op, never an exception.
    n.send("WATCHDOG=1")
    silent = systemd.Notifier.from_env()
    assert silent.path == ""
    silent.ready("x")


# -- socket activation --------------------------------------------------------------


LISTEN_FDS_CHILD = textwrap.dedent(
    """
    import os, socket, sys
    from flypool import systemd

    def at(fd, s):
        os.dup2(s.fileno(), fd)

    u = socket.socket(socket.AF_UNIX)
    u.bind(sys.argv[1])
    u.listen()
    at(3, u)
    t = socket.socket()
    t.bind(("127.0.0.1", 0))
    t.listen()
    at(4, t)
    try:
        w = socket.socket(socket.AF_INET6)
        w.bind(("::", 0))  # ListenStream=PORT: dual stack [::]
    except OSError:  # no IPv6 here
        w = socket.socket()
        w.bind(("0.0.0.0", 0))  # ListenStream=0.0.0.0:PORT
    w.listen()
    at(5, w)
    at(6, socket.socket(type=socket.SOCK_DGRAM))  # not HTTP: skipped
    r, _ = os.pipe()
    os.dup2(r, 7)  # not a socket: skipped
    os.environ.update(LISTEN_FDS="5", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="a:b:c:d:e")
    port, wport = t.getsockname()[1], w.getsockname()[1]
    fds = systemd.listen_fds()
    print(sorted(fds))
    print(port, wport, "[::]" if w.family == socket.AF_INET6 else "0.0.0.0")
    assert fds.pop(f":{wport}") is not None  # ":PORT" finds the wildcard socket
    assert fds.get(f"127.0.0.1:{port}").getsockname()[1] == port
    assert not os.get_inheritable(3) and not os.get_inheritable(4)
    assert not [k for k in os.environ if k.startswith("LISTEN_")]
    os.environ.update(LISTEN_FDS="1", LISTEN_PID="1")  # meant for another process
    print(sorted(systemd.listen_fds()), sorted(k for k in os.environ if k.startswith("LISTEN_")))
    """
)


def test_listen_fds_keys_match_listen_entries(tmp_short: Path) -> None:
    """Passed sockets are keyed like `listen` entries; other fds and pids are ignored."""
    d = str(tmp_short)
    out = subprocess.run(
        [PYTHON, "-c", LISTEN_FDS_CHILD, f"{d}/a.sock"],
        capture_output=True,
        text=True,
        timeout=10,
        env=child_env(),
    )
    assert out.returncode == 0, out.stderr
    keys_line, ports_line, other_pid_line = out.stdout.splitlines()
    port, wport, wildcard = ports_line.split()
    expected = [f"unix:{d}/a.sock", f"127.0.0.1:{port}", f"{wildcard}:{wport}"]
    assert keys_line == str(sorted(expected))
    # LISTEN_PID of another process: no sockets, and the variables are gone all the same.
    assert other_pid_line == "[] []"


@needs_socket_activate
def test_socket_activation_unix_serves_from_passed_socket(tmp_short: Path) -> None:
    """Under systemd-socket-activate the daemon serves on the passed Unix socket.

    The socket exists before the daemon: a request sent before the daemon runs
    waits in the backlog and is answered 200 once workers are up. The daemon
    does not rebind (same socket file, one listener: fd 3), and workers neither
    see LISTEN_* nor hold the socket.
    """
    d = tmp_short
    front = str(d / "app.sock")
    cfg = write_config(d, {"workers": 2, "env": {"EXAMPLE_BOOT_DELAY": BOOT_DELAY}})
    argv = [SOCKET_ACTIVATE, "-l", front, "--", *FLYPOOL_RUN, str(cfg)]
    with launched(d, cfg, argv, child_env()) as dm:
        # The file appears at bind(), a moment before listen(): wait for the latter.
        eventually(lambda: unix_listening(front), 10, what="systemd-socket-activate listening")
        file_inode = os.stat(front).st_ino
        assert stat.S_ISSOCK(os.stat(front).st_mode)
        early = send_early_request(unix_client(front))  # this connection starts the daemon
        assert not os.path.exists(dm.admin), "the daemon was running before any connection"
        response = read_response(early)
        assert response.startswith(b"HTTP/1.1 200 "), response[:300]
        wait_admin(dm)

        assert psutil.Process(dm.proc.pid).cmdline()[1:3] == ["-m", "flypool"]  # exec'd
        assert os.stat(front).st_ino == file_inode, "the daemon replaced the socket file"
        # Not every socket with the front's address: the early request's accepted
        # connection has it too, and the daemon closes that one only when it reads
        # the client's EOF, which may come after the test saw the answer end.
        listening = unix_inodes(front, listening=True)
        held = socket_inodes(dm.proc.pid)
        listeners = sorted(fd for fd, inode in held.items() if inode in listening)
        assert listeners == [3], (held, listening)
        # ...but it does close it, on that EOF (well before the 5 s lingering close ends).
        eventually(
            lambda: (
                not set(socket_inodes(dm.proc.pid).values()) & unix_inodes(front, listening=False)
            ),
            3,
            what="the daemon to close the early request's connection",
        )
        code, body, _ = get(front, "/")
        assert code == 200, body
        check_workers_clean(dm, socket_inodes(dm.proc.pid)[3])
        assert stop_daemon(dm) == 0, dm.log()[-3000:]
        # The file belongs to whoever passed the socket (a socket unit): it stays.
        assert os.stat(front).st_ino == file_inode, "the daemon removed the socket file"


@needs_socket_activate
def test_socket_activation_tcp(tmp_short: Path) -> None:
    """The same with a TCP listen entry: the passed 127.0.0.1:PORT socket is adopted."""
    d = tmp_short
    port = free_port()
    addr = f"127.0.0.1:{port}"
    cfg = write_config(d, {"workers": 2, "listen": [addr]})
    argv = [SOCKET_ACTIVATE, "-l", addr, "--", *FLYPOOL_RUN, str(cfg)]
    with launched(d, cfg, argv, child_env()) as dm:

        def listening() -> bool:
            with contextlib.suppress(psutil.Error):
                return any(
                    getattr(c.laddr, "port", None) == port and c.status == psutil.CONN_LISTEN
                    for c in psutil.Process(dm.proc.pid).net_connections(kind="tcp")
                )
            return False

        eventually(listening, 10, what=f"systemd-socket-activate listening on {addr}")
        early = send_early_request(tcp_client(port))  # this connection starts the daemon
        assert not os.path.exists(dm.admin), "the daemon was running before any connection"
        response = read_response(early)
        assert response.startswith(b"HTTP/1.1 200 "), response[:300]
        wait_admin(dm)
        listeners = [
            c
            for c in psutil.Process(dm.proc.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert [c.fd for c in listeners] == [3], listeners
        # psutil names one fd per socket: a duplicate of fd 3 shows only here.
        held = socket_inodes(dm.proc.pid)
        assert [fd for fd, inode in held.items() if inode == held[3]] == [3], held
        check_workers_clean(dm, socket_inodes(dm.proc.pid)[3])
        assert stop_daemon(dm) == 0, dm.log()[-3000:]


def _listener(kind: str, d: Path) -> tuple[socket.socket, str, Connect]:
    """A listening socket as a socket unit would hold it, its listen entry, a client."""
    if kind == "unix":
        path = str(d / "app.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(2048)
        return s, f"unix:{path}", unix_client(path)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(2048)
    port = s.getsockname()[1]
    return s, f"127.0.0.1:{port}", tcp_client(port)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_daemon_restart_keeps_passed_socket(kind: str, tmp_short: Path) -> None:
    """What socket activation is for: no connection refused while the daemon restarts.

    The test holds the listening socket, like a systemd socket unit, and passes it
    to two daemons in turn. A request sent while no daemon runs waits in the
    backlog and the second daemon answers it.
    """
    d = tmp_short
    listener, entry, connect = _listener(kind, d)
    cfg = write_config(d, {"workers": 2, "listen": [entry]})
    argv = [PYTHON, "-c", ACTIVATOR, str(listener.fileno()), *FLYPOOL_RUN, str(cfg)]
    start = {"pass_fds": (listener.fileno(),)}
    try:
        with launched(d, cfg, argv, child_env(), **start) as first:
            wait_admin(first)
            old = set(first.wait_ready(2))
            s = send_early_request(connect)
            assert read_response(s).startswith(b"HTTP/1.1 200 ")
            assert stop_daemon(first) == 0, first.log()[-3000:]
        if kind == "unix":
            assert os.path.exists(entry[len("unix:") :]), "the daemon removed the socket file"
        waiting = send_early_request(connect)  # no daemon runs now
        with launched(d, cfg, argv, child_env(), **start) as second:
            response = read_response(waiting)
            assert response.startswith(b"HTTP/1.1 200 "), response[:300]
            wait_admin(second)
            assert not old & set(second.wait_ready(2))
            assert stop_daemon(second) == 0, second.log()[-3000:]
    finally:
        listener.close()


# -- unit files and run scripts -----------------------------------------------------


def read_unit(path: Path) -> configparser.RawConfigParser:
    """A systemd unit file as INI (repeated keys: the last one wins)."""
    parser = configparser.RawConfigParser(
        strict=False, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    assert parser.read(path) == [str(path)], f"cannot read {path}"
    return parser


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (ListenStream=, After=)."""
    values, current = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.partition("=")[0].strip() == key:
            values.append(line.partition("=")[2].strip())
    return values


def test_service_unit() -> None:
    """flypool.service: notify-ready, HUP reload, drain-friendly stop, hardening."""
    unit = read_unit(SERVICE_UNIT)
    s = unit["Service"]
    assert s["Type"] == "notify"
    assert s["NotifyAccess"] == "main"
    assert s["ExecStart"] == "/opt/flypool/bin/flypool run -c /etc/flypool/flypool.toml"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["KillMode"] == "mixed"  # TERM to the daemon only: it drains its workers
    assert s["KillSignal"] == "SIGTERM"
    assert int(s["TimeoutStopSec"]) >= 90
    assert s["Restart"] == "on-failure"
    assert s["RuntimeDirectory"] == "flypool"
    assert s["RuntimeDirectoryPreserve"] == "yes"
    assert s["NoNewPrivileges"] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert s["ReadWritePaths"].split() == ["/run/flypool", "/srv"]
    assert s["PrivateTmp"] == "yes"
    assert s["ProtectHome"] == "read-only"
    assert int(s["LimitNOFILE"]) >= 65536
    assert "User" not in s and "Group" not in s  # documented, not imposed
    assert "Also" not in s
    # Socket activation is optional: nothing pulls the socket unit in.
    for key in ("Requires", "Wants", "BindsTo", "Requisite"):
        assert "flypool.socket" not in " ".join(unit_values(SERVICE_UNIT, "Unit", key))
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_socket_unit() -> None:
    """flypool.socket: a Unix ListenStream that is a valid flypool listen entry."""
    unit = read_unit(SOCKET_UNIT)
    s = unit["Socket"]
    streams = unit_values(SOCKET_UNIT, "Socket", "ListenStream")
    assert streams == ["/run/flypool/blog.sock"]
    for stream in streams:
        assert str(parse_listen("unix:" + stream)) == "unix:" + stream
    assert s["SocketMode"] == "0660"
    assert int(s["Backlog"]) >= 2048
    assert s["FileDescriptorName"] == "blog"
    assert s["Service"] == "flypool.service"
    assert unit["Install"]["WantedBy"] == "sockets.target"
    # The service shares the directory and leaves it in place for the socket.
    service = read_unit(SERVICE_UNIT)["Service"]
    assert Path(streams[0]).parent == Path("/run") / service["RuntimeDirectory"]


@pytest.mark.parametrize("script", ["run", "log/run"])
def test_runit_scripts(script: str) -> None:
    """Executable POSIX sh scripts that exec the long-running program (runsv signals it)."""
    path = RUNIT_DIR / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(path)], check=True, timeout=10)
    commands = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if script == "run":
        assert "exec 2>&1" in commands
        assert commands[-1] == "exec /opt/flypool/bin/flypool run -c /etc/flypool/flypool.toml"
    else:
        assert commands[-1] == "exec svlogd -tt /var/log/flypool"


def test_runit_run_script_runs_the_daemon(tmp_short: Path) -> None:
    """The run script execs the daemon (same pid, so `sv hup/term` reach it) with 2>&1."""
    d = tmp_short
    fake = d / "flypool"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho err >&2\nexec sleep 30\n')
    fake.chmod(0o755)
    script = (RUNIT_DIR / "run").read_text().replace("/opt/flypool/bin/flypool", str(fake))
    script = script.replace("mkdir -p /run/flypool", ":")
    run = d / "run"
    run.write_text(script)
    run.chmod(0o755)
    out = d / "out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([str(run)], stdout=f, stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: "err" in out.read_text(), 10, what="fake daemon output")
        assert "argv: run -c /etc/flypool/flypool.toml" in out.read_text()
        # exec'd all the way down: runsv's child is the daemon itself
        eventually(lambda: psutil.Process(proc.pid).name() == "sleep", 10, what="exec")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

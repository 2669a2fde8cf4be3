"""Daemon death, stale and contested sockets, aborted clients, admin access, privileges."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.support import (
    PYTHON,
    Daemon,
    eventually,
    get,
    running_daemon,
    short_dir,
    write_config,
)

TEST_USER = "flypooltest"


def test_sigkilled_daemon_takes_its_workers_and_the_next_start_cleans_up() -> None:
    d_dir = Path(short_dir())
    cfg = write_config(d_dir, {"workers": 2})
    log = open(d_dir / "first.log", "wb")  # noqa: SIM115
    first = subprocess.Popen(
        [PYTHON, "-m", "flypool", "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        admin = str(d_dir / "admin.sock")
        eventually(lambda: os.path.exists(admin), 15, what="admin socket")
        probe = Daemon(d_dir, cfg, first, d_dir / "first.log")
        pids = probe.wait_ready(2)
        first.kill()  # no hand-over, no cleanup
        first.wait(10)
        # PR_SET_PDEATHSIG: the workers get SIGTERM and exit by themselves.
        eventually(
            lambda: not any(psutil.pid_exists(p) for p in pids), 10, what="orphaned workers to exit"
        )
        assert (d_dir / "app.sock").exists()  # the stale front socket is still there
        stale = [p for p in d_dir.iterdir() if p.is_dir() and p.name.startswith("flypool.")]
        assert stale
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    # The next daemon removes the stale socket and runtime directory and serves.
    with running_daemon({"workers": 1}, directory=d_dir) as d:
        assert get(d.front, "/")[0] == 200
        assert not any(p.exists() for p in stale)


def test_second_daemon_on_the_same_socket_refuses_to_start() -> None:
    with running_daemon({"workers": 1}) as d:
        other = Path(short_dir())
        cfg = write_config(other, {"listen": [f"unix:{d.front}"], "workers": 1})
        res = subprocess.run(
            [PYTHON, "-m", "flypool", "run", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 1
        assert "another process is listening" in res.stdout + res.stderr
        # The first daemon's socket was not stolen.
        assert get(d.front, "/")[0] == 200


def test_a_thousand_aborted_requests_leak_nothing() -> None:
    with running_daemon({"workers": 2, "worker_concurrency": 0}) as d:
        daemon = psutil.Process(d.proc.pid)
        assert get(d.front, "/")[0] == 200
        fds_before = daemon.num_fds()
        for i in range(1000):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(d.front)
                if i % 3 == 0:  # mid-upload
                    s.sendall(
                        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                        + b"x" * 1000
                    )
                elif i % 3 == 1:  # mid-download
                    s.sendall(b"GET /?size=10000000 HTTP/1.1\r\nHost: x\r\n\r\n")
                    s.recv(1000)
                else:  # before the answer
                    s.sendall(b"GET /?delay=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
        eventually(
            lambda: all(w["sessions"] == 0 for w in d.app()["workers"]),
            15,
            what="in-flight back to 0",
        )
        assert d.app()["queue"] == 0
        # Pooled idle upstream connections are retired after ~1 s; allow for them.
        eventually(
            lambda: daemon.num_fds() <= fds_before + 2, 15, what=f"fd count back near {fds_before}"
        )
        assert get(d.front, "/")[0] == 200


def _replaced(d: Daemon, victim: int) -> bool:
    pids = d.ready_pids()
    return victim not in pids and len(pids) == 2


def test_dead_workers_leave_no_descriptors_behind() -> None:
    with running_daemon({"workers": 2}) as d:
        daemon = psutil.Process(d.proc.pid)
        assert get(d.front, "/")[0] == 200
        eventually(lambda: d.app()["upstream_connections"] == 0, 10, what="idle conns retired")
        fds = daemon.num_fds()
        for _ in range(4):
            victim = d.ready_pids()[0]
            os.kill(victim, signal.SIGKILL)
            eventually(lambda: _replaced(d, victim), 20, what="replacement")  # noqa: B023
        # Each worker's output pipes are closed with it (uvloop leaves them open).
        eventually(lambda: daemon.num_fds() <= fds, 10, what=f"fds back to {fds}")


def _ensure_test_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user and switch to it")
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ],
            check=True,
            timeout=30,
        )
        return pwd.getpwnam(TEST_USER)


def _as_user(user: pwd.struct_passwd, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--reuid",
            str(user.pw_uid),
            "--regid",
            str(user.pw_gid),
            "--init-groups",
            "--",
            PYTHON,
            "-m",
            "flypool",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "HOME": "/"},
    )


def test_admin_socket_refuses_other_users_and_admits_admin_group() -> None:
    user = _ensure_test_user()
    d_dir = Path(short_dir())
    os.chmod(d_dir, 0o755)
    # Mode 0666 so the connection itself succeeds: the daemon's peer check must refuse.
    with running_daemon({"workers": 1}, daemon={"admin_socket_mode": "0666"}, directory=d_dir) as d:
        res = _as_user(user, ["status", "--admin-socket", d.admin])
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert "not allowed" in res.stderr
        assert d.cli("status").returncode == 0  # root is allowed
    group = os.getgrouplist(TEST_USER, user.pw_gid)
    import grp

    gname = grp.getgrgid(group[0]).gr_name
    with running_daemon(
        {"workers": 1}, daemon={"admin_group": gname}, directory=Path(short_dir())
    ) as d:
        os.chmod(d.dir, 0o755)
        assert oct(os.stat(d.admin).st_mode & 0o777) == "0o660"
        res = _as_user(user, ["status", "--admin-socket", d.admin])
        assert res.returncode == 0, (res.stdout, res.stderr)


def test_workers_run_as_the_apps_user_and_group() -> None:
    user = _ensure_test_user()
    d_dir = Path(short_dir())
    os.chmod(d_dir, 0o755)
    with running_daemon({"workers": 1, "user": TEST_USER}, directory=d_dir) as d:
        pid = d.ready_pids()[0]
        proc = psutil.Process(pid)
        assert proc.uids().real == user.pw_uid and proc.uids().effective == user.pw_uid
        assert proc.gids().real == user.pw_gid
        assert 0 not in proc.gids()
        with open(f"/proc/{pid}/status") as f:
            groups = next(line for line in f if line.startswith("Groups:")).split()[1:]
        assert "0" not in groups
        assert get(d.front, "/")[0] == 200


def test_listen_group_gives_the_web_server_access() -> None:
    user = _ensure_test_user()
    import grp

    gname = grp.getgrgid(user.pw_gid).gr_name
    with running_daemon({"workers": 1, "listen_mode": "0660", "listen_group": gname}) as d:
        st = os.stat(d.front)
        assert st.st_gid == user.pw_gid and st.st_mode & 0o777 == 0o660
        os.chmod(d.dir, 0o755)
        # The test user (in that group, like www-data for nginx) can connect.
        res = subprocess.run(
            [
                "setpriv",
                "--reuid",
                str(user.pw_uid),
                "--regid",
                str(user.pw_gid),
                "--init-groups",
                "--",
                PYTHON,
                "-c",
                f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({d.front!r});"
                "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(12))",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "200" in res.stdout, res.stderr


def test_root_workers_need_an_explicit_user_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("only meaningful when the daemon runs as root")
    d_dir = Path(short_dir())
    cfg = write_config(d_dir, {"workers": 1, "user": ""})
    res = subprocess.run(
        [PYTHON, "-m", "flypool", "run", "-c", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 2
    assert 'user = "root"' in res.stdout + res.stderr
    assert not (d_dir / "admin.sock").exists()


def test_sigterm_stops_even_with_signal_ignoring_workers() -> None:
    app = {"workers": 1, "stop_timeout": "500ms", "env": {"EXAMPLE_IGNORE_SIGTERM": "1"}}
    with running_daemon(app) as d:
        pid = d.ready_pids()[0]
        d.signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        assert not psutil.pid_exists(pid)

"""Preloaded spawning and stuck-worker stacks through a real `flypool run` daemon (SPEC §11).

Every test runs the daemon as a subprocess with real workers: the bundled
example, gunicorn (sync) and uvicorn forked from a per-release preloader,
and ``tests/apps/preload_versioned.py`` (a stdlib server whose answer names
the release its preloader imported).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import (
    EXAMPLE,
    PYTHON,
    Daemon,
    LoadGen,
    eventually,
    get,
    log_events,
    make_release,
    point_current,
    running_daemon,
    short_dir,
    write_config,
)

APPS = Path(__file__).parent / "apps"
VENV_BIN = Path(PYTHON).parent
EXAMPLE_PRELOAD: dict[str, Any] = {"command": EXAMPLE, "preload": ["flypool.example.server"]}
VERSIONED: dict[str, Any] = {
    "command": [PYTHON, "-m", "preload_versioned", "{socket}"],
    "preload": ["preload_app", "release_version"],
}
NO_PY_SPY = {"FLYPOOL_PY_SPY": "off"}


# ---------------------------------------------------------------------------- helpers


def release(base: Path, name: str, *, broken: bool = False) -> Path:
    """releases/NAME holding the versioned test app; a broken one fails at import."""
    rel = make_release(base, name)
    for f in ("preload_app.py", "preload_versioned.py", "preload_asgi.py"):
        shutil.copy(APPS / f, rel / f)
    code = (
        f'raise RuntimeError("release {name} is broken")\n' if broken else f'VERSION = "{name}"\n'
    )
    (rel / "release_version.py").write_text(code)
    return rel


def deployed(*names: str) -> Path:
    """A Capistrano-style app directory with these releases; current -> the first."""
    base = Path(short_dir())
    first = None
    for n in names:
        rel = release(base, n.rstrip("!"), broken=n.endswith("!"))
        first = first or rel
    assert first is not None
    point_current(base, first)
    return base


def workers(d: Daemon) -> list[dict[str, Any]]:
    return d.app()["workers"]  # type: ignore[no-any-return]


def ready_preloader(d: Daemon, *, release: str | None = None) -> dict[str, Any]:
    """The one preloader in state ready (of ``release`` when given)."""

    def check() -> dict[str, Any] | None:
        found = [
            p
            for p in d.app()["preloaders"]
            if p["state"] == "ready" and (release is None or p["release"] == release)
        ]
        return found[0] if len(found) == 1 else None

    return eventually(check, 20, what=f"a ready preloader of {release or 'the app'}")


def ppid(pid: int) -> int:
    return psutil.Process(pid).ppid()


def gone(pid: int) -> bool:
    """Exited and reaped (a zombie still has its pid)."""
    return not psutil.pid_exists(pid)


def version(d: Daemon) -> str:
    status, body, _ = get(d.front, "/version", 10)
    assert status == 200, (status, body)
    return body.decode().split()[0]


def events(d: Daemon, event: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in log_events(d, event) if all(e.get(k) == v for k, v in match.items())]


def assert_preloaded(d: Daemon, n: int) -> dict[str, Any]:
    """``n`` ready workers, all forked from the one ready preloader; returns it."""
    pids = d.wait_ready(n)
    pre = ready_preloader(d)
    ws = workers(d)
    assert [w["spawn"] for w in ws] == ["preload"] * n, ws
    assert all(ppid(p) == pre["pid"] for p in pids), (pids, pre)
    return pre


# ---------------------------------------------------------------------------- workers


def test_example_workers_are_forked_from_the_preloader() -> None:
    """Status (JSON and text) says spawn "preload"; each worker is a child of the preloader."""
    with running_daemon({**EXAMPLE_PRELOAD, "workers": 2}) as d:
        pre = assert_preloaded(d, 2)
        assert pre["modules"] == ["flypool.example.server"] and pre["workers"] == 2
        pids = set(d.ready_pids())
        for _ in range(6):
            status, _, headers = get(d.front, "/", 10)
            assert status == 200 and int(headers["x-worker-pid"]) in pids
        text = d.cli("status").stdout
        assert text.count("Spawn: preload") == 2, text
        assert f"Preloader: PID {pre['pid']} ready" in text, text
        ready = events(d, "preloader ready")
        assert len(ready) == 1 and ready[0]["import_s"] is not None
    # The running_daemon exit checks no worker is left; the preloader went too.
    assert gone(pre["pid"])


def test_cold_app_says_cold() -> None:
    """Without ``preload`` nothing changes: cold workers, no preloader."""
    with running_daemon({"workers": 1}) as d:
        d.wait_ready(1)
        app = d.app()
        assert [w["spawn"] for w in app["workers"]] == ["cold"]
        assert app["preloaders"] == []
        assert "Spawn: cold" in d.cli("status").stdout


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_gunicorn_and_uvicorn_workers_are_preloaded(server: str) -> None:
    """Console scripts of the virtualenv, forked from a preloader that imported the server."""
    base = deployed("A")
    if server == "gunicorn":
        app = {
            "command": [
                str(VENV_BIN / "gunicorn"),
                "--bind",
                "unix:{socket}",
                "--workers",
                "1",
                "flypool.example.wsgi:app",
            ],
            "preload": ["gunicorn.app.wsgiapp", "flypool.example.wsgi"],
            "ready_path": "/",
        }
    else:
        app = {
            "command": [str(VENV_BIN / "uvicorn"), "--uds", "{socket}", "preload_asgi:app"],
            "preload": ["uvicorn.main", "preload_asgi"],
        }
    with running_daemon({**app, "root": str(base / "current"), "workers": 2}) as d:
        pre = assert_preloaded(d, 2)
        status, body, _ = get(d.front, "/", 10)
        assert status == 200 and f"server={server}".encode() in body, body
        if server == "uvicorn":
            assert int(body.split()[0].split(b"=")[1]) in {w["pid"] for w in workers(d)}
        assert pre["release"] == str(base / "releases" / "A")


# ---------------------------------------------------------------------------- restarts


def test_rolling_restart_starts_a_preloader_for_the_new_release() -> None:
    """current -> B, restart: a new preloader imports B, the old one is stopped and reaped."""
    base = deployed("A", "B")
    app = {**VERSIONED, "root": str(base / "current"), "workers": 2}
    with running_daemon(app) as d:
        old = assert_preloaded(d, 2)
        old_pids = set(d.ready_pids())
        assert version(d) == "version=A"
        point_current(base, base / "releases" / "B")
        done = d.cli("restart", "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        new = assert_preloaded(d, 2)
        assert new["pid"] != old["pid"] and new["release"] == str(base / "releases" / "B")
        assert not old_pids & set(d.ready_pids())
        assert {version(d) for _ in range(6)} == {"version=B"}
        # Stopped once its generation is gone, and reaped by the daemon: no zombie.
        eventually(lambda: gone(old["pid"]), 10, what="old preloader reaped")
        (stopped,) = events(d, "preloader stopped", pid=old["pid"])
        assert stopped["reason"] == "no worker of its generation is left"
        assert [p["pid"] for p in d.app()["preloaders"]] == [new["pid"]]


def test_import_failure_is_a_deployment_error() -> None:
    """A broken release: restart --wait exits 1, status shows the preloader's traceback."""
    base = deployed("A", "B!")
    app = {**VERSIONED, "root": str(base / "current"), "workers": 2}
    with running_daemon(app) as d:
        old = assert_preloaded(d, 2)
        old_pids = set(d.ready_pids())
        point_current(base, base / "releases" / "B")
        done = d.cli("restart", "--wait")
        assert done.returncode == 1, done.stdout + done.stderr
        st = d.app()
        err = st["deployment_error"]
        assert err is not None and st["state"] == "deployment_error"
        assert err["release"] == str(base / "releases" / "B")
        assert "preloader" in err["reason"] and "importing" in err["reason"], err
        assert any("RuntimeError: release B is broken" in line for line in err["output"]), err
        assert "RuntimeError: release B is broken" in d.cli("status").stdout
        # The old generation keeps serving, from its own preloader.
        assert set(d.ready_pids()) == old_pids
        assert version(d) == "version=A"
        assert ready_preloader(d)["pid"] == old["pid"]


def test_thread_in_the_preloader_spawns_cold_with_the_reason() -> None:
    """A thread started at import: fork refused, cold spawn, the reason (thread name) logged."""
    app = {**EXAMPLE_PRELOAD, "preload": ["preload_app"], "workers": 1}
    base = deployed("A")
    app.update(root=str(base / "current"), env={"PRELOAD_APP_THREAD": "1"})
    with running_daemon(app) as d:
        (pid,) = d.wait_ready(1)
        assert [w["spawn"] for w in workers(d)] == ["cold"]
        pre = ready_preloader(d)
        assert ppid(pid) == d.proc.pid  # a child of the daemon, not of the preloader
        (cold,) = events(d, "spawning cold")
        assert "threads are running in the preloader" in cold["reason"], cold
        assert "app-poller" in cold["reason"], cold
        assert pre["workers"] == 0
        assert get(d.front, "/", 10)[0] == 200


def test_killed_preloader_workers_keep_serving_next_spawn_starts_a_new_one() -> None:
    with running_daemon({**EXAMPLE_PRELOAD, "workers": 2}) as d:
        pre = assert_preloaded(d, 2)
        pids = set(d.ready_pids())
        os.kill(pre["pid"], signal.SIGKILL)
        eventually(lambda: events(d, "preloader gone", pid=pre["pid"]), 10, what="noticed")
        eventually(lambda: gone(pre["pid"]), 10, what="dead preloader reaped")
        for _ in range(10):
            assert get(d.front, "/", 10)[0] == 200
        assert set(d.ready_pids()) == pids
        assert d.cli("scale", "app", "3").returncode == 0
        d.wait_ready(3)
        new = ready_preloader(d)
        assert new["pid"] != pre["pid"]
        (added,) = set(d.ready_pids()) - pids
        assert ppid(added) == new["pid"]
        assert [w["spawn"] for w in workers(d)] == ["preload"] * 3
        assert set(d.ready_pids()) >= pids  # the orphans still serve


# ---------------------------------------------------------------------------- other features


def test_max_requests_recycles_preloaded_workers() -> None:
    with running_daemon({**EXAMPLE_PRELOAD, "workers": 1, "max_requests": 3}) as d:
        pre = assert_preloaded(d, 1)
        (first,) = d.ready_pids()
        for _ in range(3):
            assert get(d.front, "/", 10)[0] == 200
        eventually(lambda: first not in d.ready_pids() and len(d.ready_pids()) == 1, 15)
        (second,) = d.ready_pids()
        assert ppid(second) == pre["pid"]  # same generation: same preloader
        assert [w["spawn"] for w in workers(d) if w["pid"] == second] == ["preload"]


def test_memory_limit_replaces_a_preloaded_worker() -> None:
    app = {**EXAMPLE_PRELOAD, "workers": 1, "memory_limit": "150MB"}
    with running_daemon(app) as d:
        pre = assert_preloaded(d, 1)
        (first,) = d.ready_pids()
        assert get(d.front, "/grow?mb=200", 20)[0] == 200
        eventually(lambda: first not in d.ready_pids() and len(d.ready_pids()) == 1, 20)
        assert events(d, "replacing worker", pid=first)
        (second,) = d.ready_pids()
        assert ppid(second) == pre["pid"]
        assert [w["spawn"] for w in workers(d) if w["pid"] == second] == ["preload"]


def test_elastic_pool_grows_with_preloaded_workers() -> None:
    app = {
        **EXAMPLE_PRELOAD,
        "workers": 1,
        "max_workers": 3,
        "worker_idle_time": "1s",
        "max_queue": 1000,
    }
    with running_daemon(app) as d:
        pre = assert_preloaded(d, 1)
        with LoadGen(d.front, clients=4, target="/?delay=0.2") as load:
            eventually(lambda: d.app()["workers_target"] == 3, 20, what="grow to 3")
            d.wait_ready(3)
            assert [w["spawn"] for w in workers(d)] == ["preload"] * 3
            assert all(ppid(p) == pre["pid"] for p in d.ready_pids())
        assert load.failures() == {}, load.statuses
        eventually(lambda: d.app()["workers_target"] == 1, 15, what="shrink to 1")
        d.wait_ready(1)
        assert ready_preloader(d)["pid"] == pre["pid"]


# ---------------------------------------------------------------------------- USR2


def test_usr2_keeps_preloaded_workers() -> None:
    """No worker restarts across USR2; their exits are still seen; the old preloader is reaped."""
    with running_daemon({**EXAMPLE_PRELOAD, "workers": 2}) as d:
        pre = assert_preloaded(d, 2)
        pids = sorted(d.ready_pids())
        with LoadGen(d.front, clients=2, target="/") as load:
            d.signal(signal.SIGUSR2)
            eventually(lambda: log_events(d, "hand-over complete"), 20, what="hand-over")
        assert load.failures() == {}, load.statuses
        assert sorted(d.ready_pids()) == pids
        assert [w["spawn"] for w in workers(d)] == ["preload"] * 2
        assert not log_events(d, "worker exited")
        # The lifeline crossed the execv: no preloaded worker got its SIGTERM.
        assert all(psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
        # The old preloader exited at the switch and the new image reaped it.
        eventually(lambda: gone(pre["pid"]), 10, what="old preloader reaped")
        assert events(d, "preloader of the previous image exited", pid=pre["pid"])
        # An adopted preloaded worker's exit is seen (through its pidfd): it is replaced.
        os.kill(pids[0], signal.SIGKILL)
        eventually(lambda: pids[0] not in d.ready_pids() and len(d.ready_pids()) == 2, 15)
        new = ready_preloader(d)
        assert new["pid"] != pre["pid"]
        assert [w["spawn"] for w in workers(d)] == ["preload"] * 2
        assert pids[1] in d.ready_pids()


@contextlib.contextmanager
def killable_daemon(app: dict[str, Any]) -> Iterator[Daemon]:
    """A daemon this test may SIGKILL (running_daemon insists on a clean stop)."""
    d = Path(short_dir())
    cfg = write_config(d, app)
    log_path = d / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [PYTHON, "-m", "flypool", "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
    dm = Daemon(d, cfg, proc, log_path)
    try:
        eventually(lambda: os.path.exists(dm.admin), 15, what="admin socket")
        yield dm
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in dm.seen_pids:
            # pid 0 (a worker seen while spawning) would signal our own group.
            if pid > 0 and _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


def test_daemon_killed_after_usr2_takes_preloaded_workers_with_it() -> None:
    """The lifeline's write end was carried across the execv (and only the daemon holds it)."""
    with killable_daemon({**EXAMPLE_PRELOAD, "workers": 2}) as d:
        assert_preloaded(d, 2)
        pids = d.ready_pids()
        d.signal(signal.SIGUSR2)
        eventually(lambda: log_events(d, "hand-over complete"), 20, what="hand-over")
        assert sorted(d.ready_pids()) == sorted(pids)
        # A worker forked by the new image's preloader, with the adopted lifeline.
        assert d.cli("scale", "app", "3").returncode == 0
        d.wait_ready(3)
        new = ready_preloader(d)["pid"]
        everyone = {*d.ready_pids(), new}
        assert set(pids) < everyone
        d.proc.kill()
        d.proc.wait(10)
        eventually(lambda: not any(_alive(p) for p in everyone), 10, what="all workers gone")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------- stuck workers


def _stuck_request(d: Daemon) -> dict[str, Any]:
    """GET /stuck through the daemon; returns what the client got (504 expected)."""
    got: dict[str, Any] = {}

    def run() -> None:
        try:
            got["status"] = get(d.front, "/stuck", 30)[0]
        except Exception as exc:  # reported through got
            got["error"] = repr(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    return got


def _one_stack_event(d: Daemon, pid: int) -> dict[str, Any]:
    (ev,) = eventually(lambda: events(d, "worker stack", pid=pid), 15, what="worker stack event")
    # ONE event, logged before the worker was signalled.
    lines = d.log().splitlines()

    def first(event: str) -> int:
        for i, line in enumerate(lines):
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("event") == event and rec.get("pid") == pid:
                    return i
        raise AssertionError(f"no {event} for {pid}")

    assert first("worker stack") < first("stopping worker")
    assert len(events(d, "worker stack", pid=pid)) == 1
    return ev


STUCK_APP: dict[str, Any] = {
    "command": [PYTHON, "-m", "preload_versioned", "{socket}"],
    "workers": 1,
    "max_request_time": "500ms",
}


def test_stuck_worker_stack_names_the_function_py_spy() -> None:
    """max_request_time on a cold worker: 504, then one event with py-spy's stack."""
    base = deployed("A")
    with running_daemon({**STUCK_APP, "root": str(base / "current")}) as d:
        (pid,) = d.wait_ready(1)
        assert _stuck_request(d) == {"status": 504}
        ev = _one_stack_event(d, pid)
        assert ev["source"] == "py-spy", ev
        assert "stuck_in_known_function" in ev["stack"], ev["stack"]
        assert (ev["app"], ev["method"], ev["path"]) == ("app", "GET", "/stuck")
        assert ev["age_s"] >= 0.5 and ev["reason"] == "max_request_time exceeded"
        d.wait_ready(1)  # replaced


def test_stuck_preloaded_worker_stack_from_faulthandler() -> None:
    """Without py-spy, a preloaded worker dumps its stack through faulthandler on its stderr."""
    base = deployed("A")
    app = {**STUCK_APP, **VERSIONED, "root": str(base / "current"), "workers": 1}
    with running_daemon(app, env=NO_PY_SPY) as d:
        (pid,) = d.wait_ready(1)
        assert _stuck_request(d) == {"status": 504}
        ev = _one_stack_event(d, pid)
        assert ev["source"] == "faulthandler" and ev["spawn"] == "preload", ev
        assert "stuck_in_known_function" in ev["stack"], ev["stack"]
        assert (ev["method"], ev["path"]) == ("GET", "/stuck")


def test_no_stack_says_why() -> None:
    """Without py-spy and without preload there is no stack, and the event says why."""
    base = deployed("A")
    with running_daemon({**STUCK_APP, "root": str(base / "current")}, env=NO_PY_SPY) as d:
        (pid,) = d.wait_ready(1)
        assert _stuck_request(d) == {"status": 504}
        ev = _one_stack_event(d, pid)
        assert ev["stack"] is None
        assert ev["no_stack"] == (
            "py-spy is turned off (FLYPOOL_PY_SPY=off) and the worker was not preloaded"
        )
        assert (ev["method"], ev["path"]) == ("GET", "/stuck")


def test_worker_ignoring_the_stop_signal_logs_its_stack_before_sigkill() -> None:
    """stop_timeout passed: one stack event, then SIGKILL."""
    app = {
        **EXAMPLE_PRELOAD,
        "workers": 2,
        "stop_timeout": "1s",
        "env": {"EXAMPLE_IGNORE_SIGTERM": "1"},
    }
    with running_daemon(app, env=NO_PY_SPY) as d:
        pids = d.wait_ready(2)
        assert d.cli("scale", "app", "1").returncode == 0
        (ev,) = eventually(
            lambda: [e for p in pids for e in events(d, "worker stack", pid=p)], 15, what="stack"
        )
        assert ev["source"] == "faulthandler", ev
        assert "flypool/example" in ev["stack"], ev["stack"]
        assert ev["reason"] == "ignored SIGTERM past stop_timeout; killing"
        eventually(
            lambda: events(d, "worker ignored stop signal; killing", pid=ev["pid"]), 10, what="kill"
        )
        eventually(lambda: not _alive(ev["pid"]), 10, what="killed worker gone")
        text = d.log()
        assert text.index('"worker stack"') < text.index('"worker ignored stop signal; killing"')


def _fd_kinds(pid: int) -> list[str]:
    """What each descriptor of ``pid`` is, from /proc (pipe, socket, a path...).

    Copies of stdin/stdout/stderr at higher numbers are left out: a cold
    worker has three of them (uvloop's process spawn leaves them open), and
    they are the worker's own descriptors, not the daemon's.
    """
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    stdio = {targets.get(fd) for fd in (0, 1, 2)}
    return sorted(t.split(":[")[0] for fd, t in targets.items() if fd <= 2 or t not in stdio)


def test_a_preloaded_worker_has_the_descriptors_of_a_cold_one_plus_the_lifeline() -> None:
    """Fork hygiene through the daemon, read from /proc: one pipe more (the lifeline), no more."""
    with running_daemon({"workers": 1}) as d:
        (cold,) = d.wait_ready(1)
        assert get(d.front, "/", 10)[0] == 200
        cold_fds = _fd_kinds(cold)
    with running_daemon({**EXAMPLE_PRELOAD, "workers": 1}) as d:
        assert_preloaded(d, 1)
        (pre,) = d.ready_pids()
        assert get(d.front, "/", 10)[0] == 200
        pre_fds = _fd_kinds(pre)
    assert pre_fds == sorted([*cold_fds, "pipe"]), (pre_fds, cold_fds)

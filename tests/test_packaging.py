"""Packaging: the wheel, the example config and the Debian package (packaging/deb/build.sh).

The .deb test really installs the package on this machine (as root), checks it,
then purges it again, whatever happened in between.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flypool import __version__
from flypool.config import load_config, parse_listen
from tests.support import eventually, get, short_dir

REPO = Path(__file__).resolve().parent.parent
BUILD_SH = REPO / "packaging" / "deb" / "build.sh"
EXAMPLE_CONFIG = REPO / "packaging" / "flypool.toml"
UNITS = ("flypool.service", "flypool.socket")
PREFIX = Path("/opt/flypool")


def _env() -> dict[str, str]:
    """This environment without what would point a Python at the source tree or .venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output unless it exits 0."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, (
        f"{shlex.join(argv)} exited with {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


def _exists(argv: list[str]) -> bool:
    """Whether a lookup command (getent) finds what it is asked for."""
    return subprocess.run(argv, capture_output=True).returncode == 0


def _package_known() -> bool:
    """Whether dpkg has flypool installed, half-installed or with config files left."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", "flypool"], capture_output=True, text=True
    )
    return proc.returncode == 0 and proc.stdout.strip() not in ("", "not-installed")


# --- the wheel and the example config ----------------------------------------


@pytest.mark.timeout(180)
def test_wheel_builds(tmp_path: Path) -> None:
    """The wheel has the package, its data files and the console script, and nothing else."""
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(REPO)], 170)
    wheels = list(tmp_path.glob("flypool-*.whl"))
    # py3-none-any, or a CPython wheel when setup.py compiled the hot path's twins.
    assert [w.name.split("-")[:2] for w in wheels] == [["flypool", __version__]], wheels
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        dist_info = f"flypool-{__version__}.dist-info"
        entry_points = configparser.ConfigParser()
        entry_points.read_string(whl.read(f"{dist_info}/entry_points.txt").decode())
    for name in ("flypool/__init__.py", "flypool/py.typed", "flypool/example/server.py"):
        assert name in names
    assert entry_points["console_scripts"]["flypool"] == "flypool.cli:main"
    strays = sorted(n for n in names if not n.startswith(("flypool/", f"{dist_info}/")))
    assert strays == []


def test_example_config_is_valid() -> None:
    """packaging/flypool.toml (installed as /etc/flypool/flypool.toml) passes `flypool check`."""
    _run([sys.executable, "-m", "flypool", "check", "-c", str(EXAMPLE_CONFIG)])
    config = load_config(str(EXAMPLE_CONFIG))
    assert config.daemon.admin_socket == "/run/flypool/admin.sock"
    (app,) = config.apps
    assert (app.name, app.root, app.user, app.group) == (
        "blog",
        "/srv/blog/current",
        "www-data",
        "www-data",
    )
    assert app.command[0] == "/srv/blog/venv/bin/gunicorn"
    assert [str(a) for a in app.listen] == ["unix:/run/flypool/blog.sock"]
    assert app.ready_path and app.health_path


def test_socket_unit_matches_example_config() -> None:
    """flypool.socket listens where the example app does: the daemon adopts sockets by address."""
    unit = REPO / "systemd" / "flypool.socket"
    streams = [
        line.partition("=")[2].strip()
        for line in unit.read_text().splitlines()
        if line.startswith("ListenStream=")
    ]
    listen = tomllib.loads(EXAMPLE_CONFIG.read_text())["app"][0]["listen"]
    assert [f"unix:{s}" if s.startswith("/") else s for s in streams] == listen
    assert all(parse_listen(a).kind == "unix" for a in listen)


# --- the Debian package ------------------------------------------------------


@contextlib.contextmanager
def _dpkg_test_lock() -> Iterator[None]:
    """Serialise concurrent runs of the install test: both would install the same package."""
    with open("/tmp/flypool-deb-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _skip_unless_clean_machine() -> None:
    """Skip rather than overwrite (and then purge) a real flypool installation."""
    if _package_known():
        pytest.skip("the flypool package is installed on this machine: purge it to run this test")
    if PREFIX.exists() or Path("/etc/flypool").exists():
        pytest.skip(f"{PREFIX} or /etc/flypool exists: this test would delete it")
    if _exists(["getent", "passwd", "flypool"]) or _exists(["getent", "group", "flypool"]):
        pytest.skip("a flypool user or group exists: the purge in this test would delete it")


def _check_daemon_runs(flypool: str) -> None:
    """The installed daemon serves a request through the packaged venv's example worker."""
    d = Path(short_dir())
    config = d / "flypool.toml"
    config.write_text(
        "[daemon]\n"
        f'admin_socket = "{d}/admin.sock"\n'
        f'runtime_dir = "{d}"\n'
        "[[app]]\n"
        'name = "smoke"\n'
        f'root = "{d}"\n'
        f'command = ["{PREFIX}/bin/python3", "-m", "flypool.example", "--socket", "{{socket}}"]\n'
        f'listen = ["unix:{d}/app.sock"]\n'
        "workers = 1\n"
        # This test runs only as root: root workers must be asked for explicitly.
        'user = "root"\n'
    )
    log_path = d / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [flypool, "run", "-c", str(config)], stdout=log, stderr=log, env=_env()
        )
    front = d / "app.sock"
    try:

        def listening() -> bool:
            assert proc.poll() is None, f"daemon exited: {log_path.read_text()}"
            return front.exists()

        eventually(listening, timeout=30, what="the packaged daemon's front socket")
        # The request waits in the daemon's queue until the worker is ready.
        status, _, _ = get(str(front), timeout=30)
        assert status == 200, log_path.read_text()
        _run([flypool, "status", "--admin-socket", str(d / "admin.sock")])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        shutil.rmtree(d, ignore_errors=True)
    assert code == 0


def _check_installed() -> None:
    """Everything the package promises, once `dpkg -i` has run."""
    flypool = "/usr/bin/flypool"
    assert os.readlink(flypool) == f"{PREFIX}/bin/flypool"
    assert _run([flypool, "--version"]).stdout.startswith(f"flypool {__version__} (")
    _run([flypool, "check", "-c", "/etc/flypool/flypool.toml"])
    assert Path("/etc/flypool/flypool.toml").read_bytes() == EXAMPLE_CONFIG.read_bytes()
    conffiles = _run(["dpkg-query", "-W", "-f=${Conffiles}", "flypool"]).stdout
    assert "/etc/flypool/flypool.toml" in conffiles

    user = _run(["getent", "passwd", "flypool"]).stdout.strip().split(":")
    assert int(user[2]) < 1000 and user[5] == "/nonexistent", user
    assert _exists(["getent", "group", "flypool"])

    for unit in UNITS:
        installed = Path("/lib/systemd/system") / unit
        assert installed.read_bytes() == (REPO / "systemd" / unit).read_bytes()
    service = Path("/lib/systemd/system/flypool.service").read_text().splitlines()
    (exec_start,) = [line for line in service if line.startswith("ExecStart=")]
    binary = shlex.split(exec_start.partition("=")[2])[0]
    assert os.access(binary, os.X_OK), exec_start

    # The venv runs on the system Python, from /opt/flypool, with no build path left in it.
    code = "import flypool, sys; print(sys.prefix, flypool.__file__)"
    prefix, module = _run([f"{PREFIX}/bin/python3", "-c", code]).stdout.split()
    assert prefix == str(PREFIX) and module.startswith(f"{PREFIX}/lib/")
    _check_daemon_runs(flypool)
    _run(["dpkg", "--verify", "flypool"])
    # Running it wrote nothing (the .pyc files are shipped): dpkg knows every file.
    owned = set(_run(["dpkg-query", "-L", "flypool"]).stdout.splitlines())
    found = {str(p) for p in PREFIX.rglob("*")}
    assert sorted(found - owned) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="installs a .deb: needs root")
@pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None,
    reason="needs dpkg and dpkg-deb (a Debian system)",
)
def test_deb_builds_installs_and_purges(tmp_path: Path) -> None:
    """build.sh makes a .deb that installs a working flypool, and a purge removes it all."""
    with _dpkg_test_lock():
        _skip_unless_clean_machine()
        out = _run(["bash", str(BUILD_SH), "--outdir", str(tmp_path)], timeout=240).stdout
        deb = Path(out.splitlines()[-1])
        arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
        assert deb == tmp_path / f"flypool_{__version__}_{arch}.deb"
        fields = _run(["dpkg-deb", "--field", str(deb), "Package", "Version", "Depends"]).stdout
        assert f"Version: {__version__}" in fields
        assert "python3 (>= 3.11)" in fields and "util-linux" in fields

        try:
            _run(["dpkg", "-i", str(deb)], timeout=120)
            _check_installed()
        finally:
            purge = subprocess.run(
                ["dpkg", "--purge", "flypool"], capture_output=True, text=True, timeout=120
            )
        assert purge.returncode == 0, purge.stderr
        assert not PREFIX.exists()
        assert not Path("/usr/bin/flypool").exists()
        assert not Path("/etc/flypool").exists()
        assert not any((Path("/lib/systemd/system") / unit).exists() for unit in UNITS)
        assert not _exists(["getent", "passwd", "flypool"])
        assert not _exists(["getent", "group", "flypool"])
        assert not _package_known()

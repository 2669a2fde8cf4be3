"""User-space instructions per keep-alive GET through a flypool daemon (callgrind).

Run from the repository root::

    .venv/bin/python benchmarks/instructions.py [--src DIR] [--impl compiled|pure] [-n 1000]

A deterministic count where wall-clock and CPU figures on a shared machine are
not (issue 10): one daemon (one worker, ``worker_concurrency = 0``, the fast
keep-alive backend of router_compare.py on a Unix socket, or with
``--backend gunicorn`` its one sync gunicorn worker, which closes every
connection) runs under
``valgrind --tool=callgrind`` with instrumentation off; after 300 warm-up
requests it is switched on (``callgrind_control -i on``) for ``-n`` GETs sent
one after another on one keep-alive connection (a Unix socket), then off.
The figure is the daemon's instructions (every thread, user space only: the
kernel's share of a request is not counted) divided by ``-n``. The worker
runs natively (valgrind does not follow the exec). The psutil sampler thread
is off (``NOSAMPLER=1``), so its samples do not land in the window.

``--src DIR`` runs another source tree (a ``flypool`` package in DIR, e.g. an
unpacked wheel of another commit) through ``benchmarks/apps/run_from.py``.
``--keep`` leaves the callgrind files for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

REQ = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
WARMUP = 300


BACKENDS = {
    "fast": [h.PY, str(h.APPS / "fast_backend.py"), "--socket", "{socket}"],
    # One sync worker: it closes every connection (a connect per request).
    "gunicorn": h.gunicorn("unix:{socket}", "flypool.example.wsgi:app"),
}


def config(tmp: Path, backend: list[str]) -> Path:
    """The daemon's configuration in ``tmp``."""
    (tmp / "run").mkdir()
    toml = (
        f'[daemon]\nadmin_socket = "{tmp}/admin.sock"\nruntime_dir = "{tmp}/run"\n'
        'log_format = "json"\n\n[[app]]\nname = "app"\n'
        f'root = "{tmp}"\ncommand = {h._toml(backend)}\nlisten = ["unix:{tmp}/front.sock"]\n'
        "workers = 1\nworker_concurrency = 0\n"
        # The daemon's FLYPOOL_IMPL is not the worker's business (gunicorn imports flypool).
        'env = { FLYPOOL_IMPL = "auto" }\n' + ('user = "root"\n' if os.geteuid() == 0 else "")
    )
    path = tmp / "flypool.toml"
    path.write_text(toml)
    return path


def connect(path: Path, deadline: float, alive: subprocess.Popen[bytes]) -> socket.socket:
    """A keep-alive connection to the front socket, once the daemon answers on it."""
    while True:
        if alive.poll() is not None:
            raise h.BenchError(f"the daemon exited with {alive.returncode}")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(str(path))
            get(s)
            return s
        except (OSError, h.BenchError):
            s.close()
            if time.monotonic() > deadline:
                raise h.BenchError("the daemon did not answer within 120 s") from None
            time.sleep(0.3)


def get(s: socket.socket) -> None:
    """One GET; its answer (one read: the backend's answer is small) must be a 200."""
    s.sendall(REQ)
    if not s.recv(65536).startswith(b"HTTP/1.1 200"):
        raise h.BenchError("an answer was not a 200")


def control(pid: int, *args: str) -> None:
    """``callgrind_control ARGS PID``: instrumentation on/off, dump."""
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def total_instructions(files: list[Path]) -> int:
    """The largest ``summary:``/``totals:`` figure of callgrind's dumps (the on-window)."""
    best = 0
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                best = max(best, int(line.split()[1]))
    return best


def main() -> int:
    """Count; print one line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", help="a directory holding another flypool package")
    ap.add_argument("--impl", default="compiled", choices=("compiled", "pure"))
    ap.add_argument("-n", type=int, default=1000, help="requests counted (default 1000)")
    ap.add_argument("--backend", default="fast", choices=sorted(BACKENDS))
    ap.add_argument("--keep", action="store_true", help="keep the callgrind files")
    args = ap.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("instructions.py: needs valgrind (apt-get install valgrind)")
    tmp = h.tmpdir("fpins")
    env = dict(os.environ, FLYPOOL_IMPL=args.impl, NOSAMPLER="1")
    launcher = [str(h.APPS / "run_from.py")]
    env["FLYPOOL_SRC"] = str(Path(args.src).resolve()) if args.src else str(h.HERE.parent / "src")
    out, conf = tmp / "callgrind.out", config(tmp, BACKENDS[args.backend])
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            h.PY, *launcher, "-m", "flypool", "run", "-c", str(conf)]  # fmt: skip
    with open(tmp / "daemon.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        s = connect(tmp / "front.sock", time.monotonic() + 120, proc)
        for _ in range(WARMUP):
            get(s)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True
        )
        for _ in range(args.n):
            get(s)
        for verb in ("-i", "-d"):
            extra = ["off"] if verb == "-i" else []
            subprocess.run(
                ["callgrind_control", verb, *extra, str(proc.pid)], check=True, capture_output=True
            )
        s.close()
    finally:
        proc.terminate()
        proc.wait(60)
    count = total_instructions(sorted(tmp.glob("callgrind.out*")))
    where = args.src or "this tree"
    print(f"{where} ({args.impl}, {args.backend}): {count / args.n:,.0f} instructions per GET "
          f"(n={args.n}; callgrind, user space, daemon only)")  # fmt: skip
    if args.keep:
        print(f"callgrind files: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A big pool's status: ``GET /status`` and ``flypool status --json`` with 64 workers.

One daemon with ``--workers`` (64) example workers. Once all are ready, ``GET /status``
on the admin socket is timed ``--status-times`` times (a new connection each, as the CLI
does), then the venv's ``flypool status --json`` ``--cli-times`` times (wall time, the
interpreter's start included; ``python -c pass`` and ``python -c "import flypool.cli"``
are timed alike for reference). Target: ``GET /status`` p95 < 50 ms.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import harness as h

S = h.Suite("scale", "Scale: a 64-worker pool's status", __doc__)
S.arg("--workers", type=int, default=64, help="workers (default 64)")
S.arg("--status-times", type=int, default=50, help="GET /status runs (default 50)")
S.arg("--cli-times", type=int, default=10, help="runs of each command (default 10)")


def timed(argv: list[str], times: int) -> list[float]:
    """Wall time in ms of ``times`` runs of ``argv``, each of which must exit 0."""
    walls = []
    for _ in range(times):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, timeout=60)
        walls.append((time.perf_counter() - started) * 1e3)
        if done.returncode:
            raise h.BenchError(f"{argv} exited {done.returncode}: {done.stderr[-300:]!r}")
    return walls


def run(s: h.Suite, a: Any) -> None:
    """Start the pool, time the status."""
    started = time.monotonic()
    with h.start_flypool(
        [h.PY, "-m", "flypool.example", "--socket", "{socket}"], workers=a.workers, timeout=300
    ) as fp:
        ready_s = time.monotonic() - started
        size = len(json.dumps(fp.status()))
        status_ms = []
        for _ in range(a.status_times):
            t = time.perf_counter()
            listed = len(fp.app(10.0)["workers"])
            status_ms.append((time.perf_counter() - t) * 1e3)
            if listed < a.workers:
                raise h.BenchError(f"the status lists {listed} workers")
        cli = Path(h.PY).with_name("flypool")
        cli_ms = timed([str(cli), "status", "--json", "--admin-socket", fp.admin], a.cli_times)
        rss = h.snapshot(fp.proc.pid)["rss"]
    times = {
        "`GET /status` on the admin socket": status_ms,
        "`flypool status --json` (wall)": cli_ms,
        "`python -c pass`": timed([h.PY, "-c", "pass"], a.cli_times),
        "`python -c 'import flypool.cli'`": timed([h.PY, "-c", "import flypool.cli"], a.cli_times),
    }
    rows = [[what, len(v), h.median(v), h.pct(v, 95), max(v)] for what, v in times.items()]
    s.data = {"workers": a.workers, "ready_s": ready_s, "status_bytes": size, "rss": rss} | times
    s.md(f"{a.workers} workers ready in {ready_s:.1f} s; status JSON {size:,} bytes; daemon "
         f"RSS {rss / 2**20:.1f} MiB.")  # fmt: skip
    s.md(h.table("measurement|n>|median ms>|p95 ms>|max ms>", rows))
    s.check(f"`GET /status` p95 with {a.workers} workers", h.pct(status_ms, 95), "< 50 ms")
    s.check(f"`flypool status --json` median wall time with {a.workers} workers (interpreter "
            "start included)", h.median(cli_ms), "< 50 ms")  # fmt: skip


if __name__ == "__main__":
    S.main(run)

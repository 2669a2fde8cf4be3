"""Launcher for benchmarks/hotpath_ab.py: run ``flypool`` from another source tree.

    FLYPOOL_SRC=/tmp/snap/pure .venv/bin/python benchmarks/apps/run_from.py -m flypool run ...

``$FLYPOOL_SRC`` (a directory holding a ``flypool`` package, e.g. ``git archive
COMMIT src/flypool | tar -x -C DIR --strip-components=1``, possibly with
modules compiled in place by mypyc) goes first on ``sys.path``, so an A/B can
compare two commits, or a pure tree with a compiled one, in one run. With
``NOSAMPLER=1`` the daemon samples its workers' CPU and memory once at start
and never again (no psutil thread during the run), to measure what that
thread costs.
"""

from __future__ import annotations

import os
import runpy
import sys

sys.path.insert(0, os.environ["FLYPOOL_SRC"])
if sys.argv[1:3] != ["-m", "flypool"]:
    raise SystemExit(f"usage: run_from.py -m flypool ARGS... (got {sys.argv[1:3]})")
sys.argv = ["flypool", *sys.argv[3:]]

import flypool.http.client  # noqa: E402 (after the path change, on purpose)

print(f"run_from: flypool.http.client is {flypool.http.client.__file__}", file=sys.stderr)
if os.environ.get("NOSAMPLER") == "1":
    import flypool.daemon

    flypool.daemon.SAMPLE_INTERVAL = 1e9  # one sample at start only
runpy.run_module("flypool", run_name="__main__", alter_sys=True)

"""Launches the example worker, or misbehaves as files in the release directory say.

Tests build "releases" (directories) and break them by dropping files in them:
``never_ready`` (never listens), ``fail_at_boot`` (handled by the example app
itself: exits 3 with a traceback line), ``fail_worker_N`` (only worker number N
fails at boot). Usage: ``release_worker.py SOCKET``.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    number = os.environ.get("FLYPOOL_WORKER", "")
    if os.path.exists("never_ready"):
        print("release_worker: never_ready present, not listening", flush=True)
        while True:
            time.sleep(3600)
    if os.path.exists(f"fail_worker_{number}"):
        print(f"RuntimeError: worker {number} told to fail at boot", file=sys.stderr, flush=True)
        sys.exit(3)
    os.execv(sys.executable, [sys.executable, "-m", "flypool.example", "--socket", sys.argv[1]])


if __name__ == "__main__":
    main()

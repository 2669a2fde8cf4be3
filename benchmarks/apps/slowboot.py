"""A WSGI app that is slow to boot: the workload of ``benchmarks/deploy_compare.py``.

- Importing it takes ``SLOWBOOT_BOOT_S`` seconds (default 1): a stand-in for
  an app that loads a framework, connects to databases and warms caches.
- Every request takes ``SLOWBOOT_REQUEST_S`` seconds (default 0.005).
- The answer is ``pid=<pid> gen=<generation>``, the generation being the
  ``APP_GEN`` environment variable or else the first line of the file
  ``generation.txt`` in the working directory (read once, at import), so a
  client can tell which process and which release answered.
- A broken release: when a file ``broken`` exists in this module's directory
  or in the working directory, or ``SLOWBOOT_BROKEN`` is set to a non-empty
  value other than ``0``, the import raises `RuntimeError` after the boot delay.

The callable is exported as ``app`` (gunicorn, flypool) and ``application``
(Passenger's WSGI loader).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BOOT_S = float(os.environ.get("SLOWBOOT_BOOT_S", "1"))
"""Seconds the import takes."""
REQUEST_S = float(os.environ.get("SLOWBOOT_REQUEST_S", "0.005"))
"""Seconds each request takes."""


def read_generation() -> str:
    """``APP_GEN``, else the first line of ``./generation.txt``, else ``"0"``."""
    gen = os.environ.get("APP_GEN")
    if gen:
        return gen
    try:
        return Path("generation.txt").read_text().strip().splitlines()[0] or "0"
    except (OSError, IndexError):
        return "0"


def is_broken() -> bool:
    """Whether this release is to fail at import (``broken`` file or ``SLOWBOOT_BROKEN``)."""
    flag = os.environ.get("SLOWBOOT_BROKEN", "")
    if flag and flag != "0":
        return True
    return (Path(__file__).resolve().parent / "broken").exists() or Path("broken").exists()


time.sleep(BOOT_S)
GENERATION = read_generation()
"""The release this process loaded."""
if is_broken():
    raise RuntimeError(f"slowboot: release gen={GENERATION} is broken (a 'broken' file exists)")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Sleep ``REQUEST_S`` and answer ``pid=<pid> gen=<generation>``."""
    time.sleep(REQUEST_S)
    body = f"pid={os.getpid()} gen={GENERATION}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


application = app
"""Passenger's WSGI loader looks for this name."""

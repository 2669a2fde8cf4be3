"""Preloaded spawning for Python apps (SPEC §11).

One preloader per release imports the app's ``preload`` modules once; workers
are forked from it and run the command's own entry point in-process.

- :mod:`flypool.preload.command`: which commands can be preloaded, and how
  (interpreter, options, entry point); the reason when they cannot.
- :mod:`flypool.preload.server`: the preloader process itself (standard
  library only: it runs under the app's interpreter, which may not have
  flypool installed).
- :mod:`flypool.preload.preloader`: the daemon's side: start, fork, watch
  the forked workers, stop.
- :mod:`flypool.preload.lifeline`: how forked workers learn that the daemon
  died (they are not its children).
"""

from __future__ import annotations

from flypool.exit_status import UNKNOWN_EXIT
from flypool.preload.command import EntryKind, NotPreloadable, Plan, plan_command
from flypool.preload.preloader import (
    PreloadedProcess,
    Preloader,
    PreloaderGone,
    PreloadError,
    PreloaderState,
    PreloadRefused,
    PreloadUnavailable,
)
from flypool.preload.server import DUMP_SIGNAL

__all__ = [
    "DUMP_SIGNAL",
    "UNKNOWN_EXIT",
    "EntryKind",
    "NotPreloadable",
    "Plan",
    "PreloadError",
    "PreloadRefused",
    "PreloadUnavailable",
    "PreloadedProcess",
    "Preloader",
    "PreloaderGone",
    "PreloaderState",
    "plan_command",
]

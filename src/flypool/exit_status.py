"""How a worker's exit status reads to operators, and the status no one could learn."""

from __future__ import annotations

import signal
from typing import Final

UNKNOWN_EXIT: Final = -256
"""The status of a process whose exit was seen but whose status went to another
parent (a worker adopted across USR2, or forked by a preloader that died first).
Negative like a signal's, but no signal has this number."""


def describe_exit(code: int | None) -> str:
    """Exit code as shown to operators (negative codes are signals; None: not known yet)."""
    if code is None:
        return "unknown"
    if code == UNKNOWN_EXIT:
        return "unknown (another process reaped it)"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return str(code)

"""How exit statuses read in the log and status: a lost status is not a signal."""

from __future__ import annotations

import signal

import pytest

from flypool.exit_status import UNKNOWN_EXIT, describe_exit


def test_codes_and_signals() -> None:
    assert describe_exit(0) == "0"
    assert describe_exit(3) == "3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    # A worker killed by SIGHUP is -1: it must not be confused with "unknown".
    assert describe_exit(-signal.SIGHUP) == "signal SIGHUP"


def test_unknown_status_is_no_signal() -> None:
    with pytest.raises(ValueError):
        signal.Signals(-UNKNOWN_EXIT)
    assert describe_exit(UNKNOWN_EXIT).startswith("unknown")


def test_no_status_yet_is_unknown() -> None:
    assert describe_exit(None) == "unknown"

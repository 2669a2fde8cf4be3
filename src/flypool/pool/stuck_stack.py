"""One log event with the Python stack of a worker about to be killed for being stuck.

A worker is killed for two reasons a stack explains: a request passed
``max_request_time`` (the router fails it with 504 and the controller stops
the worker), or the worker ignored ``stop_signal`` for ``stop_timeout``
(SIGKILL follows). Just before that, :func:`log_stack` logs ONE structured
event, ``worker stack``, with the app (bound in the logger), the pid, the
reason, the request(s) it was stuck on (method, path, age) and the stack
from :func:`flypool.pool.stack_dump.dump_stack`: ``py-spy dump`` when
available, else faulthandler for preloaded workers, else ``no_stack``
saying why there is none.

``FLYPOOL_PY_SPY`` in the daemon's environment chooses py-spy: unset, it is
looked up (PATH, then next to flypool's interpreter); ``off`` (or empty)
turns it off (no ptrace of workers); anything else is the executable to run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flypool.pool.stack_dump import AUTO, dump_stack
from flypool.pool.worker import Worker

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

PY_SPY_ENV = "FLYPOOL_PY_SPY"
_OFF = frozenset({"", "off", "no", "none", "0", "false"})
EVENT = "worker stack"


@dataclass(frozen=True)
class HeldRequest:
    """A request the stuck worker held: what the event names."""

    method: str
    path: str
    age_s: float


@dataclass(frozen=True)
class Stuck:
    """Why a worker is being stopped without waiting: the event's context."""

    reason: str
    requests: tuple[HeldRequest, ...] = ()


def py_spy_setting() -> str | None:
    """The ``py_spy`` argument of ``dump_stack`` that ``FLYPOOL_PY_SPY`` asks for."""
    raw = os.environ.get(PY_SPY_ENV)
    if raw is None:
        return AUTO
    if raw.strip().lower() in _OFF:
        return None
    return raw


async def log_stack(
    w: Worker, log: FilteringBoundLogger, reason: str, requests: Sequence[HeldRequest] = ()
) -> None:
    """Take ``w``'s stack (bounded in time, off the loop) and log one ``worker stack`` event."""
    py_spy = py_spy_setting()
    preloaded = w.spawn == "preload"
    stack, source = await dump_stack(w.pid, preloaded=preloaded, output=w.fanout, py_spy=py_spy)
    fields: dict[str, Any] = {"pid": w.pid, "worker": w.number, "reason": reason, "spawn": w.spawn}
    if requests:
        first = requests[0]
        fields.update(method=first.method, path=first.path, age_s=round(first.age_s, 3))
        if len(requests) > 1:
            fields["requests"] = [
                {"method": r.method, "path": r.path, "age_s": round(r.age_s, 3)} for r in requests
            ]
    if stack is not None:
        log.warning(EVENT, stack=stack, source=source, **fields)
        return
    if py_spy is None:
        # dump_stack cannot tell "not installed" from "turned off here".
        source = source.replace(
            "py-spy is not installed", f"py-spy is turned off ({PY_SPY_ENV}=off)"
        )
    log.warning(EVENT, stack=None, no_stack=source, **fields)

"""Worker records and their state machine.

Theory of operation
-------------------
A worker is one OS process serving HTTP/1.1 on a private socket. Its life is
``spawning → ready → draining → stopping → exited``; a worker that never got
ready goes ``spawning → stopping/exited`` directly. What moves a worker is an
:class:`Event`, and the legal moves are the table :data:`TRANSITIONS` and
nothing else: every state change goes through :meth:`Worker.transition`,
which refuses an illegal one, so routing and the pool controller can rely on
the state they read. (h11's ``_state.py`` is the model: transitions are data.)

- ``BOOTED``: the readiness probe passed (``spawning → ready``).
- ``DRAIN``: out of routing; its in-flight requests finish (``ready → draining``).
- ``UNDRAIN``: a drain not yet signalled is called off (``draining → ready``):
  a restart aborted by a broken release keeps every old worker it can.
- ``STOP``: the stop signal is (or will be, once the process exists) sent.
  A worker retired while its process is still being created is ``stopping``
  with pid 0; the spawn step signals the process the moment it has one, so a
  process is never left untracked.
- ``EXIT``: the process is gone.

Only READY workers receive new requests (see :mod:`flypool.pool.balancer`).
``inflight`` counts requests a worker is serving, including tunnels; draining
waits for it to reach zero. ``generation`` is the restart number the worker
was spawned for: the balancer prefers newer generations on ties and the
controller uses it to tell old workers from new ones.

This module does no IO so it can be tested without an event loop.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any


class WorkerState(enum.Enum):
    """Lifecycle states reported in status (SPEC §1)."""

    SPAWNING = "spawning"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    EXITED = "exited"


class Event(enum.Enum):
    """What happened to a worker; the table says where it goes."""

    BOOTED = "booted"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    STOP = "stop"
    EXIT = "exit"


_S = WorkerState
TRANSITIONS: dict[WorkerState, dict[Event, WorkerState]] = {
    _S.SPAWNING: {Event.BOOTED: _S.READY, Event.STOP: _S.STOPPING, Event.EXIT: _S.EXITED},
    _S.READY: {Event.DRAIN: _S.DRAINING, Event.STOP: _S.STOPPING, Event.EXIT: _S.EXITED},
    _S.DRAINING: {Event.UNDRAIN: _S.READY, Event.STOP: _S.STOPPING, Event.EXIT: _S.EXITED},
    _S.STOPPING: {Event.EXIT: _S.EXITED},
    _S.EXITED: {},
}

# States whose worker counts towards the target (it serves or is about to).
LIVE = frozenset({_S.SPAWNING, _S.READY})
# States whose worker is on its way out but still a process.
LEAVING = frozenset({_S.DRAINING, _S.STOPPING})


class IllegalTransition(RuntimeError):
    """A state change the table does not allow."""


OUTPUT_LINES = 20


class Worker:
    """One worker process as the pool sees it."""

    __slots__ = (
        "address",
        "attempt",
        "canary",
        "cpu_percent",
        "deadline",
        "exit_status",
        "extra",
        "fanout",
        "generation",
        "idle_conns",
        "inflight",
        "last_used",
        "number",
        "output",
        "output_fds",
        "pid",
        "proc",
        "processed",
        "pumps",
        "ready_at",
        "release",
        "replace_reason",
        "restarts",
        "rss_bytes",
        "spawn",
        "started_at",
        "state",
        "suspect",
        "timer",
    )

    def __init__(
        self,
        number: int,
        generation: int,
        release: str,
        address: str,
        started_at: float,
        state: WorkerState = WorkerState.SPAWNING,
    ) -> None:
        self.number = number
        self.generation = generation
        self.release = release
        # Unix socket path, or "127.0.0.1:PORT" for tcp workers.
        self.address = address
        self.started_at = started_at
        # Set only here and by transition(); a worker passed on by USR2 is
        # created in the state it had in the previous image.
        self.state = state
        self.pid = 0
        self.inflight = 0
        self.processed = 0
        self.last_used = started_at
        self.ready_at = 0.0
        self.restarts = 0
        self.cpu_percent = 0.0
        self.rss_bytes = 0
        self.exit_status: int | None = None
        # Crash-loop failures counted when this worker was spawned: a worker
        # that dies right after ready continues that count, not a fresh one.
        self.attempt = 0
        # Why the controller should replace it (max_requests, memory_limit);
        # it keeps serving until its replacement is ready.
        self.replace_reason: str | None = None
        # Spawned by the elastic pool beyond ``workers``: last choice on ties.
        self.extra = False
        # One of a canary restart's new workers (SPEC §7): the router keeps a
        # request away from canaries after one answered it 5xx.
        self.canary = False
        # "cold" (fork+exec) or "preload" (forked from a preloader, SPEC §11).
        self.spawn = "cold"
        # Preloaded workers: their stderr lines also go through this
        # (a stack_dump.LineFanout), where a faulthandler dump is picked up.
        self.fanout: Any = None
        # DRAINING: when in-flight requests are cut; STOPPING: when SIGKILL follows.
        self.deadline = 0.0
        self.timer: Any = None
        # A connection to it broke before any answer: no new requests until
        # a liveness check (a few ms later) clears it or it turns out dead.
        self.suspect = False
        # Idle keep-alive upstream connections (flypool.http.upstream objects).
        self.idle_conns: list[Any] = []
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self.proc: Any = None
        # Tasks reading its stdout/stderr (they end at EOF).
        self.pumps: list[Any] = []
        # Read ends of the worker's stdout/stderr pipes (passed on by USR2).
        self.output_fds: tuple[int, int] = (-1, -1)

    def transition(self, event: Event) -> WorkerState:
        """Apply ``event`` as the table says; return the previous state."""
        old = self.state
        new = TRANSITIONS[old].get(event)
        if new is None:
            raise IllegalTransition(f"worker {self.pid}: {event.value} in state {old.value}")
        self.state = new
        return old

    def can(self, event: Event) -> bool:
        """Whether ``event`` is legal in the current state."""
        return event in TRANSITIONS[self.state]

    @property
    def live(self) -> bool:
        """Spawning or ready: counts towards the target."""
        return self.state in LIVE

    @property
    def leaving(self) -> bool:
        """Draining or stopping: a process on its way out."""
        return self.state in LEAVING

    def __repr__(self) -> str:
        return f"<Worker #{self.number} pid={self.pid} gen={self.generation} {self.state.value}>"

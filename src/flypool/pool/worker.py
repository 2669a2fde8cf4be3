"""Worker records and their state machine.

Theory of operation
-------------------
A worker is one OS process serving HTTP/1.1 on a private socket. Its life is
``spawning → ready → draining → stopping → exited``; a worker that never got
ready goes ``spawning → stopping/exited`` directly. The legal moves are the
table below and nothing else: every state change goes through
:meth:`Worker.transition`, which refuses an illegal one, so routing and the
restart engine can rely on the state they read.

Only READY workers receive new requests (see :mod:`flypool.pool.balancer`).
``inflight`` counts requests a worker is serving, including tunnels; draining
waits for it to reach zero. ``generation`` is the restart number the worker
was spawned for: the balancer prefers newer generations on ties and the
restart engine uses it to tell old workers from new ones.

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


TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.SPAWNING: frozenset({WorkerState.READY, WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.READY: frozenset({WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.DRAINING: frozenset({WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.STOPPING: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow."""


OUTPUT_LINES = 20


class Worker:
    """One worker process as the pool sees it."""

    __slots__ = (
        "address",
        "cpu_percent",
        "exit_status",
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
        "release",
        "restarts",
        "retiring",
        "rss_bytes",
        "started_at",
        "state",
        "suspect",
    )

    def __init__(
        self, number: int, generation: int, release: str, address: str, started_at: float
    ) -> None:
        self.number = number
        self.generation = generation
        self.release = release
        # Unix socket path, or "127.0.0.1:PORT" for tcp workers.
        self.address = address
        self.started_at = started_at
        self.state = WorkerState.SPAWNING
        self.pid = 0
        self.inflight = 0
        self.processed = 0
        self.last_used = started_at
        self.restarts = 0
        self.cpu_percent = 0.0
        self.rss_bytes = 0
        self.exit_status: int | None = None
        # Set the moment the pool decides to stop this worker, so a decision
        # taken just after (another TTOU, a restart) does not pick it again.
        self.retiring = False
        # A connection to it broke before any answer: no new requests until
        # a liveness check (a few ms later) clears it or it turns out dead.
        self.suspect = False
        # Idle keep-alive upstream connections (flypool.http.upstream objects).
        self.idle_conns: list[Any] = []
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self.proc: Any = None
        # Read ends of the worker's stdout/stderr pipes (passed on by USR2).
        self.output_fds: tuple[int, int] = (-1, -1)

    def transition(self, new: WorkerState) -> WorkerState:
        """Move to ``new`` if the table allows it; return the previous state."""
        old = self.state
        if new is old:
            return old
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"worker {self.pid}: {old.value} -> {new.value}")
        self.state = new
        return old

    @property
    def live(self) -> bool:
        """True until the process has exited."""
        return self.state is not WorkerState.EXITED

    def __repr__(self) -> str:
        return f"<Worker #{self.number} pid={self.pid} gen={self.generation} {self.state.value}>"

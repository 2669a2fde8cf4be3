"""balancer.pick and the worker state table, as plain objects (no IO)."""

from __future__ import annotations

import pytest

from flypool.pool.balancer import pick
from flypool.pool.worker import TRANSITIONS, Event, IllegalTransition, Worker, WorkerState


def _w(
    n: int,
    *,
    inflight: int = 0,
    gen: int = 0,
    last_used: float = 0.0,
    state: WorkerState = WorkerState.READY,
) -> Worker:
    w = Worker(n, gen, "/r", f"/s/{n}", 0.0, state)
    w.inflight = inflight
    w.last_used = last_used
    return w


def test_least_busy_wins() -> None:
    a, b = _w(1, inflight=2), _w(2, inflight=1)
    assert pick([a, b], 0) is b


def test_ties_go_to_the_newest_generation_then_the_longest_idle() -> None:
    """A release being rolled out gets traffic at once (PITFALLS: Passenger #2551)."""
    old, new = _w(1, gen=1, last_used=0.0), _w(2, gen=2, last_used=5.0)
    assert pick([old, new], 0) is new
    idle_long, idle_short = _w(3, gen=2, last_used=1.0), _w(4, gen=2, last_used=9.0)
    assert pick([idle_short, idle_long], 0) is idle_long


def test_elastic_extras_are_the_last_choice_on_ties() -> None:
    """An extra worker only gets requests the core workers cannot take, so it falls idle."""
    core, extra = _w(1, last_used=9.0), _w(2, last_used=0.0)
    extra.extra = True
    assert pick([extra, core], 0) is core
    core.inflight = 1
    assert pick([extra, core], 0) is extra


def test_only_ready_workers_with_a_free_slot_and_not_suspect() -> None:
    full = _w(1, inflight=1)
    draining = _w(2, state=WorkerState.DRAINING)
    spawning = _w(3, state=WorkerState.SPAWNING)
    suspect = _w(4)
    suspect.suspect = True
    assert pick([full, draining, spawning, suspect], 1) is None
    assert pick([full, draining, spawning, suspect], 0) is full  # 0 = unlimited
    free = _w(5)
    assert pick([full, free], 1, exclude={free}) is None


def test_state_table_allows_only_its_edges() -> None:
    w = _w(1, state=WorkerState.SPAWNING)
    w.transition(Event.BOOTED)
    assert w.state is WorkerState.READY
    w.transition(Event.DRAIN)
    with pytest.raises(IllegalTransition):
        w.transition(Event.BOOTED)  # a drained worker never comes back
    w.transition(Event.STOP)
    with pytest.raises(IllegalTransition):
        w.transition(Event.DRAIN)
    w.transition(Event.EXIT)
    for event in Event:
        assert not w.can(event)
        with pytest.raises(IllegalTransition):
            w.transition(event)


def test_a_worker_retired_before_its_process_exists_is_stopping() -> None:
    """TTIN then TTOU: the spawn is cancelled while pid is 0, and signalled once it has one."""
    w = _w(1, state=WorkerState.SPAWNING)
    assert w.pid == 0
    assert w.transition(Event.STOP) is WorkerState.SPAWNING
    assert w.state is WorkerState.STOPPING
    assert not w.can(Event.BOOTED)


def test_every_state_reaches_exited() -> None:
    for state, edges in TRANSITIONS.items():
        if state is not WorkerState.EXITED:
            assert edges[Event.EXIT] is WorkerState.EXITED


def test_a_canary_wins_no_tie_by_generation() -> None:
    """During a canary both generations see traffic: ties go to the worker idle longest."""
    old, canary = _w(1, gen=1, last_used=0.0), _w(2, gen=2, last_used=5.0)
    canary.canary = True
    assert pick([old, canary], 0) is old
    old.last_used = 9.0
    assert pick([old, canary], 0) is canary

"""Choosing a worker for a request: pure, no IO (SPEC §6)."""

from __future__ import annotations

from collections.abc import Sequence

from flypool.pool.worker import Worker, WorkerState

_READY = WorkerState.READY


def pick(workers: Sequence[Worker], concurrency: int, exclude: object = None) -> Worker | None:
    """The least busy READY worker with a free slot, or None.

    Ties go to the newest generation (a release being rolled out gets traffic
    at once, so a bad release shows its errors early), then to the worker idle
    longest. Elastic extras (beyond ``workers``) lose every tie, so when the
    load drops they are the ones that fall idle and get drained (SPEC §10).
    A canary gets no generation preference: the judge compares it with the
    old generation on the same traffic, which an idle canary winning every
    tie would starve (SPEC §7).
    ``concurrency`` 0 means unlimited. ``exclude`` is a worker (or a
    container of workers) already tried for this request.
    """
    best: Worker | None = None
    for w in workers:
        if w.state is not _READY or w.suspect:
            continue
        if concurrency and w.inflight >= concurrency:
            continue
        if exclude is not None and (
            w is exclude or (isinstance(exclude, (set, frozenset, list)) and w in exclude)
        ):
            continue
        if best is None:
            best = w
            continue
        if w.inflight != best.inflight:
            if w.inflight < best.inflight:
                best = w
        elif w.extra is not best.extra:
            if best.extra:
                best = w
        elif w.generation != best.generation and not (w.canary or best.canary):
            if w.generation > best.generation:
                best = w
        elif w.last_used < best.last_used:
            best = w
    return best

"""A controller's state as JSON, for the next image of a USR2 hand-over.

What crosses the ``execv`` is the desired state and the bookkeeping that
status shows: the target count (scale, TTIN/TTOU, the elastic pool), the
generation, a restart in progress (its plan), the crash-loop backoff, the
deployment error and counters. Workers themselves travel separately (with
their descriptors, see :mod:`flypool.handover`). The new image's controller
reconciles from there as if nothing had happened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flypool.pool.plans import RESTART_PLANS, RestartPlan
from flypool.pool.processes import Failure

if TYPE_CHECKING:
    from flypool.pool.controller import Controller


def snapshot(ctl: Controller, now: float) -> dict[str, Any]:
    """Everything but the workers, relative to loop time ``now``."""
    procs = ctl.procs
    plan = ctl.restart
    err = ctl.deployment_error
    return {
        "target": ctl.target,
        "generation": ctl.generation,
        "next_number": procs.next_number,
        "restart_seq": ctl.restart_seq,
        "last_restart": ctl.last_restart,
        "deployment_error": err.as_dict(backoff=False) if err else None,
        "restarts_total": ctl.restarts_total,
        "restart_durations": ctl.restart_durations[-100:],
        "spawn_failures_total": procs.spawn_failures_total,
        "crashes_total": procs.crashes_total,
        "failures": procs.failures,
        "backoff_s": max(0.0, procs.backoff_until - now),
        "elastic": {
            "floor": ctl.elastic.floor,
            "ceiling": ctl.elastic.ceiling,
            "ups": ctl.elastic.ups,
            "downs": ctl.elastic.downs,
        },
        "restart": plan_state(plan, now) if plan is not None else None,
    }


def restore(ctl: Controller, st: dict[str, Any], now: float) -> None:
    """Take over the state :func:`snapshot` wrote in the previous image."""
    procs = ctl.procs
    ctl.target = st["target"]
    ctl.generation = st["generation"]
    procs.next_number = max(procs.next_number, st["next_number"])
    ctl.restart_seq = st["restart_seq"]
    ctl.last_restart = st["last_restart"]
    err = st.get("deployment_error")
    ctl.deployment_error = Failure.from_dict(err) if err else None
    ctl.restarts_total = st.get("restarts_total", 0)
    ctl.restart_durations = list(st.get("restart_durations", []))
    procs.spawn_failures_total = st.get("spawn_failures_total", 0)
    procs.crashes_total = st.get("crashes_total", 0)
    procs.failures = st.get("failures", 0)
    procs.backoff_until = now + st.get("backoff_s", 0.0)
    el = st.get("elastic") or {}
    if ctl.elastic.enabled and el:
        ctl.elastic.configure(el["floor"], el["ceiling"], ctl.elastic.idle_time)
        ctl.elastic.ups = el.get("ups", 0)
        ctl.elastic.downs = el.get("downs", 0)
    if st.get("restart"):
        ctl.restart = plan_from_state(st["restart"], now)


def plan_state(plan: RestartPlan, now: float) -> dict[str, Any]:
    """A running restart as JSON."""
    return {
        "kind": plan.kind,
        "generation": plan.generation,
        "ids": plan.ids,
        "reason": plan.reason,
        "age_s": now - plan.started,
        "total": plan.total,
        "done": plan.done,
        "batch": plan.batch,
        "by_memory": plan.by_memory,
        "resist": plan.resist,
        "aborted": plan.aborted,
        "failures": plan.failures,
        "skips": plan.skips,
        "last_failure": plan.last_failure,
        "est_rss": plan.est_rss,
        "peak_rss": plan.peak_rss,
        "extra": plan.extra_state(now),
    }


def plan_from_state(st: dict[str, Any], now: float) -> RestartPlan:
    """The restart :func:`plan_state` described, carrying on where it was."""
    plan = RESTART_PLANS[st["kind"]](
        generation=st["generation"],
        restart_id=st["ids"][-1],
        reason=st["reason"],
        started=now - st["age_s"],
        total=st["total"],
        batch=st["batch"],
        by_memory=st["by_memory"],
        resist=st["resist"],
    )
    plan.ids = list(st["ids"])
    plan.done = st["done"]
    plan.aborted = st["aborted"]
    plan.failures = st["failures"]
    plan.skips = st["skips"]
    plan.last_failure = st["last_failure"]
    plan.est_rss = st["est_rss"]
    plan.peak_rss = st["peak_rss"]
    plan.restore_extra(st.get("extra") or {}, now)
    return plan

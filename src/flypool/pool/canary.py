"""The canary restart plan (SPEC §7): prove a release on live traffic, then roll or retire it.

Theory of operation
-------------------
A canary restart is one more :class:`~flypool.pool.plans.RestartPlan`. It
goes through three phases, all decided from what the controller shows it:

1. **spawn** — ``size`` new-generation workers are spawned *beyond* the
   target (the old generation keeps its full capacity). Every new-generation
   worker is flagged ``canary``: the router then re-asks an old worker when a
   canary answers an idempotent request with a 5xx (SPEC §6), and the
   balancer gives canaries no tie-break preference, so both generations see
   the same traffic mix.
2. **judge** — from the moment every canary is ready, each finished request
   is recorded in a :class:`~flypool.pool.canary_judge.CanaryWindow` (canary
   or old, latency, error = 5xx, reset, crash or timeout) and judged at once;
   the controller also wakes the plan once a second so that ``canary_timeout``
   fires without traffic. The statistics live in :mod:`canary_judge`.
3. **end** — *promote*: the plan hands over to a
   :class:`~flypool.pool.plans.RollingPlan` of the same generation (the
   canaries count as new workers already, and as many old workers are drained
   at once); *roll back*: the restart ends as ``rolled_back`` with the numbers
   as its reason and as the deployment error; the controller's steady plan
   then retires the canaries first (they are beyond the target) and every old
   worker keeps serving.

An operator may end the judging early (``flypool promote`` / ``rollback``).
A restart requested during a canary supersedes it: the stale canaries are
old workers now (drained first), and a new canary plan starts its own canary
of the newest release. Like every plan, this module does no IO and needs no event loop.
"""

from __future__ import annotations

from typing import Any

from flypool.pool import canary_judge as cj
from flypool.pool.plans import RESTART_PLANS, Decision, Plan, RestartPlan, RollingPlan, View
from flypool.pool.worker import Worker, WorkerState

_READY = WorkerState.READY
_SPAWNING = WorkerState.SPAWNING
# How often a judging canary is looked at without traffic (canary_timeout).
JUDGE_TICK_S = 1.0


class CanaryPlan(RestartPlan):
    """Spawn ``canary`` extra new workers, judge them against the old ones, then decide."""

    kind = "canary"

    def __init__(
        self, *, canary: int = 1, policy: cj.CanaryPolicy | None = None, **common: Any
    ) -> None:
        super().__init__(**common)
        self.size = max(1, canary)
        self.policy = policy or cj.CanaryPolicy()
        self.window = cj.CanaryWindow()
        # Loop time at which every canary was first ready; None while spawning.
        self.judging_since: float | None = None
        self.now = 0.0
        self.verdict: cj.Verdict = cj.judge(self.policy, self.window, 0.0)
        # "promote" or "rollback" once decided (by the judge or an operator).
        self.outcome: str | None = None
        self.decided_by = ""
        self.canaries: list[Worker] = []

    # -- evidence ------------------------------------------------------------

    def on_request_done(self, w: Worker, status: int, seconds: float, failed: bool) -> bool:
        """Record one finished request of either generation and judge at once."""
        if self.judging_since is None or self.outcome is not None:
            return False
        if w.generation > self.generation:
            return False
        self.window.record(w.canary, seconds, failed or status >= 500)
        self._judge(self.now)
        return self.outcome is not None

    def _judge(self, now: float) -> None:
        since = self.judging_since
        if since is None or self.outcome is not None:
            return
        v = cj.judge(self.policy, self.window, max(0.0, now - since))
        self.verdict = v
        if v.decision is cj.Decision.PROMOTE:
            self.end("promote", "judge")
        elif v.decision is cj.Decision.ROLLBACK:
            self.end("rollback", "judge", v.reason)

    def end(self, outcome: str, by: str, reason: str = "") -> None:
        """Decide now: ``"promote"`` or ``"rollback"`` (by the judge or an operator)."""
        if self.outcome is not None or self.aborted is not None:
            return
        self.outcome = outcome
        self.decided_by = by
        if outcome == "rollback":
            self.rolled_back = reason or "canary: rolled back by the operator"
            self.aborted = self.rolled_back
            release = next((w.release for w in self.canaries if w.release), "")
            self.failed_release = release

    # -- the plan ----------------------------------------------------------------

    def decide(self, v: View) -> Decision:
        """Spawn the canaries beyond the target; judge; finished on a rollback."""
        d = Decision()
        self.now = v.now
        if self.aborted is not None:
            d.finished = True
            return d
        # A spawn that began before this restart must not survive it.
        d.stop.extend(v.old_spawning)
        # Canaries of a superseded restart are old now: retire them first.
        d.drain.extend(w for w in v.old_ready if w.canary)
        new = v.new_ready + v.new_spawning
        for w in new:
            w.canary = True
        self.canaries = new
        if self.judging_since is None:
            if len(v.new_ready) >= self.size:
                self.judging_since = v.now
                self.verdict = cj.judge(self.policy, self.window, 0.0)
            else:
                d.spawn = max(0, min(self.size - len(new), v.spawn_limit))
                return d
        self._judge(v.now)
        d.finished = self.outcome == "rollback"
        return d

    def successor(self) -> Plan | None:
        """After a promotion: a rolling restart of the same generation carries on."""
        if self.outcome != "promote":
            return None
        for w in self.canaries:
            w.canary = False
        rolling = RollingPlan(
            generation=self.generation,
            restart_id=self.ids[-1],
            reason=self.reason,
            started=self.started,
            total=self.total,
            batch=self.batch,
            by_memory=self.by_memory,
            resist=self.resist,
        )
        rolling.est_rss = self.est_rss
        return rolling

    def wake_at(self, now: float) -> float | None:
        """Judging without traffic still has to notice canary_timeout."""
        if self.judging_since is None or self.outcome is not None:
            return None
        return now + JUDGE_TICK_S

    def spawn_failed(self, w: Worker, reason: str) -> None:
        """A canary that fails to boot (or dies) rolls the release back, whatever resist says."""
        if w.generation != self.generation:
            return
        self.failures += 1
        self.last_failure = reason
        if self.aborted is None:
            self.outcome = "rollback"
            self.decided_by = "boot"
            self.aborted = f"deployment error: {reason}"

    # -- status and hand-over ----------------------------------------------------

    def progress(self) -> dict[str, Any] | None:
        """SPEC §8's ``restart`` with ``phase: canary`` and the judge's numbers."""
        out = super().progress()
        assert out is not None
        out["mode"] = "rolling"
        out["phase"] = "canary"
        out["canary"] = {
            "workers": [w.pid for w in self.canaries if w.pid],
            **self.window.status(self.verdict),
        }
        if self.judging_since is None:
            out["canary"]["waiting_for"] = "ready"
        return out

    def extra_state(self, now: float) -> dict[str, Any]:
        """What a USR2 hand-over carries besides the common fields: size, policy, counts."""
        p = self.policy
        return {
            "size": self.size,
            "policy": [p.requests, p.timeout_s, p.max_error_rate, p.max_latency_ratio],
            "window": self.window.to_state(),
            "judging_for_s": None if self.judging_since is None else now - self.judging_since,
            "outcome": self.outcome,
            "decided_by": self.decided_by,
        }

    def restore_extra(self, st: dict[str, Any], now: float) -> None:
        """Carry on judging where the previous image stopped."""
        self.size = int(st["size"])
        req, timeout, rate, ratio = st["policy"]
        self.policy = cj.CanaryPolicy(
            requests=int(req),
            timeout_s=float(timeout),
            max_error_rate=float(rate),
            max_latency_ratio=float(ratio),
        )
        self.window = cj.CanaryWindow.from_state(st["window"])
        age = st.get("judging_for_s")
        self.judging_since = None if age is None else now - float(age)
        self.outcome = st.get("outcome")
        self.decided_by = st.get("decided_by", "")
        self.now = now
        self.verdict = cj.judge(self.policy, self.window, float(age or 0.0))


def policy_of(requests: int, timeout: float, rate: float, ratio: float) -> cj.CanaryPolicy:
    """The judge's policy from the app's ``canary_*`` keys (rates as fractions)."""
    return cj.CanaryPolicy(
        requests=requests,
        timeout_s=timeout,
        max_error_rate=min(rate, 0.999999),
        max_latency_ratio=ratio,
    )


RESTART_PLANS["canary"] = CanaryPlan

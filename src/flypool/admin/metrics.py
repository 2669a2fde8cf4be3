"""Prometheus text exposition of the daemon's counters (GET /metrics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from flypool.pool.worker import WorkerState

if TYPE_CHECKING:
    from flypool.pool.app import AppPool


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(pools: Iterable[AppPool]) -> str:
    """Every metric family, one sample per app (and per class/state)."""
    fams: dict[str, tuple[str, str, list[str]]] = {}

    def add(name: str, kind: str, help_: str, labels: dict[str, str], value: float) -> None:
        fam = fams.setdefault(name, (kind, help_, []))
        lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        fam[2].append(f"{name}{{{lab}}} {value}")

    for pool in pools:
        app = pool.name
        ctl = pool.controller
        r = pool.router
        st = r.stats
        for cls in range(1, 6):
            add(
                "flypool_requests_total",
                "counter",
                "Responses sent to clients, by status class.",
                {"app": app, "code": f"{cls}xx"},
                st.by_class[cls],
            )
        add(
            "flypool_requests_in_flight",
            "gauge",
            "Requests being served by workers.",
            {"app": app},
            sum(w.inflight for w in pool.workers),
        )
        add(
            "flypool_queue_length",
            "gauge",
            "Requests waiting for a free worker.",
            {"app": app},
            len(r.queue),
        )
        add(
            "flypool_queue_wait_seconds_total",
            "counter",
            "Time spent queued, summed.",
            {"app": app},
            round(st.queue_wait_total, 6),
        )
        add(
            "flypool_queue_waits_total",
            "counter",
            "Requests that waited in the queue.",
            {"app": app},
            st.queue_wait_count,
        )
        add(
            "flypool_queue_rejected_total",
            "counter",
            "Requests refused: queue full (503).",
            {"app": app},
            st.rejected_full,
        )
        add(
            "flypool_queue_timeouts_total",
            "counter",
            "Requests that timed out queued (504).",
            {"app": app},
            st.timeouts,
        )
        add(
            "flypool_upstream_connects_total",
            "counter",
            "Connections opened to workers.",
            {"app": app},
            st.connects,
        )
        for state in WorkerState:
            add(
                "flypool_workers",
                "gauge",
                "Workers by state.",
                {"app": app, "state": state.value},
                sum(1 for w in pool.workers if w.state is state),
            )
        add(
            "flypool_restarts_total",
            "counter",
            "Restarts finished (completed or aborted).",
            {"app": app},
            ctl.restarts_total,
        )
        add(
            "flypool_restart_duration_seconds_total",
            "counter",
            "Time spent restarting.",
            {"app": app},
            round(sum(ctl.restart_durations), 6),
        )
        add(
            "flypool_spawn_failures_total",
            "counter",
            "Workers that failed to get ready.",
            {"app": app},
            ctl.procs.spawn_failures_total,
        )
        add(
            "flypool_worker_crashes_total",
            "counter",
            "Ready workers that exited without being asked to.",
            {"app": app},
            ctl.procs.crashes_total,
        )
        add(
            "flypool_workers_target",
            "gauge",
            "Workers the pool keeps (scale, TTIN/TTOU, elastic pool).",
            {"app": app},
            ctl.target,
        )
        for direction, count in (("up", ctl.elastic.ups), ("down", ctl.elastic.downs)):
            add(
                "flypool_scale_events_total",
                "counter",
                "Elastic pool steps (SPEC section 10).",
                {"app": app, "direction": direction},
                count,
            )
        plan = ctl.restart
        last = ctl.last_restart or {}
        batch = plan.batch if plan is not None else last.get("batch", 0)
        peak = plan.peak_rss if plan is not None else last.get("peak_rss_bytes", 0)
        add(
            "flypool_restart_batch",
            "gauge",
            "Workers replaced at once by the running (else the last) restart.",
            {"app": app},
            batch or 0,
        )
        add(
            "flypool_restart_peak_memory_bytes",
            "gauge",
            "Peak RSS of all workers during the running (else the last) restart.",
            {"app": app},
            peak or 0,
        )
        for decision, count in ctl.canary_decisions.items():
            add(
                "flypool_canary_decisions_total",
                "counter",
                "Canary restarts promoted or rolled back (SPEC section 7).",
                {"app": app, "decision": decision},
                count,
            )
        add(
            "flypool_deployment_error",
            "gauge",
            "1 while the app shows a deployment error.",
            {"app": app},
            1 if ctl.deployment_error else 0,
        )
    lines: list[str] = []
    for name, (kind, help_, samples) in fams.items():
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)
    return "\n".join(lines) + "\n"

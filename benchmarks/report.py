"""Write ``benchmarks/RESULTS.md`` and ``benchmarks/out/all.json`` from the benchmarks' JSON.

Run from the repository root (``bash benchmarks/run`` does, as its last step)::

    .venv/bin/python benchmarks/report.py

Reads every ``benchmarks/out/*.json`` that exists (except ``all.json``) and
``benchmarks/out/run.tsv``, the step log ``benchmarks/run`` writes (exit
status, time and load average of each step). Writes:

- ``benchmarks/RESULTS.md``: date, machine (CPU model, cores, RAM), versions
  (from the JSONs), load before and after, the **Targets** table (every
  target of the benchmark issue: measured value, limit, PASS/FAIL, margin),
  the steps that failed, the exact commands (``bash benchmarks/run`` and
  each script's own command line from its JSON), then one section per suite
  with its tables (each JSON's ``markdown`` where present, else a table built
  from its ``summary``) and its PASS/FAIL checks. Everything after the line
  ``<!-- notes -->`` in the existing file is hand-written and kept verbatim.
- ``benchmarks/out/all.json``: every JSON merged under ``results`` (keyed by
  file name), plus the run log, machine, versions and the targets.

A JSON that finished before the current ``benchmarks/run`` started (a step
that failed before writing it, or one run by hand earlier) is still reported,
marked as stale. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Json = dict[str, Any]
"""One benchmark's decoded JSON object."""

BENCH_DIR = Path(__file__).resolve().parent
"""``benchmarks/`` in this checkout."""
OUT_DIR = BENCH_DIR / "out"
"""Where the benchmarks write their JSON."""
RESULTS = BENCH_DIR / "RESULTS.md"
"""The report."""
ALL_JSON = "all.json"
"""File name, in the output directory, of the merged raw figures."""
RUN_LOG = "run.tsv"
"""File name, in the output directory, of ``benchmarks/run``'s step log."""
NOTES_MARKER = "<!-- notes -->"
"""Everything after this line of RESULTS.md is hand-written and kept."""
DEFAULT_NOTES = """
## Notes

Hand-written notes go here: everything below the `<!-- notes -->` line above
is kept verbatim when `benchmarks/report.py` rewrites this file.
"""

MIB = 1024 * 1024
"""Bytes in a MiB (scale.py's "MB")."""
OVERHEAD_LIMIT_S = 0.020
"""Engine overhead target: less than 20 ms of restart time per swapped worker."""
DEPLOY_SYSTEMS = ("flypool-b1", "flypool-b2")
"""deploy_compare.py systems the deploy targets apply to (the noprobe one is a foil)."""

SECTIONS: list[tuple[str, str, str]] = [
    (
        "router_compare",
        "Suite 1: router tax — flypool against nginx and HAProxy",
        "`wrk -t1 -c32` keep-alive through each proxy to the same backend, "
        "interleaved rounds, medians.",
    ),
    (
        "deploy_compare",
        "Suites 2 and 3: deploys under load, good and broken releases",
        "flypool's rolling restart against Passenger, gunicorn HUP and uvicorn HUP.",
    ),
    (
        "scale",
        "Suite 4: scale — idle keep-alive connections, a big pool",
        "",
    ),
    (
        "restart_under_load",
        "Engine overhead: rolling restart under load",
        "Overhead per swap = (the daemon's restart duration - the sum of the new "
        "workers' boot times, batch by batch) / workers replaced.",
    ),
    (
        "soak",
        "Soak: steady load with SIGKILLs and rolling restarts",
        "",
    ),
]
"""Known benchmarks (the JSON's ``benchmark`` field), in report order, with a
title and a one-line description."""


# --------------------------------------------------------------------------- inputs


@dataclass
class Step:
    """One step of ``benchmarks/run``, from ``run.tsv``."""

    name: str
    exit_status: int
    elapsed_s: float
    started_epoch: float
    load_before: str
    load_after: str
    command: str


@dataclass
class RunLog:
    """What ``benchmarks/run`` recorded: ``meta`` key/values and the steps."""

    meta: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    @property
    def started_epoch(self) -> float | None:
        """When the run started (Unix time), if known."""
        return _float(self.meta.get("started_epoch"))


def read_run_log(path: Path) -> RunLog | None:
    """Parse ``run.tsv``; None when there is none."""
    if not path.exists():
        return None
    log = RunLog()
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if parts[0] == "meta" and len(parts) >= 3:
            log.meta[parts[1]] = "\t".join(parts[2:])
        elif parts[0] == "step" and len(parts) >= 8:
            log.steps.append(
                Step(
                    name=parts[1],
                    exit_status=_int(parts[2], -1),
                    elapsed_s=_float(parts[3]) or 0.0,
                    started_epoch=_float(parts[4]) or 0.0,
                    load_before=parts[5],
                    load_after=parts[6],
                    command="\t".join(parts[7:]),
                )
            )
    return log


def load_results(out_dir: Path, problems: list[str]) -> dict[str, Json]:
    """Every ``*.json`` in ``out_dir`` but the merged one, keyed by file stem."""
    results: dict[str, Json] = {}
    for path in sorted(out_dir.glob("*.json")):
        if path.name == ALL_JSON:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"`{path.name}` could not be read: {exc}")
            continue
        if not isinstance(data, dict):
            problems.append(f"`{path.name}` is not a JSON object")
            continue
        results[path.stem] = data
    return results


def _float(value: Any) -> float | None:
    """``value`` as a float, or None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any, default: int) -> int:
    """``value`` as an int, or ``default``."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _get(data: Any, *keys: str | int) -> Any:
    """``data[k1][k2]...``, or None when a level is missing."""
    for key in keys:
        if isinstance(data, dict) and isinstance(key, str):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def finished_epoch(data: Json) -> float | None:
    """When the benchmark wrote its JSON (its ``finished_at``), as Unix time."""
    text = data.get("finished_at")
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def is_stale(data: Json, run: RunLog | None) -> bool:
    """True when the JSON is older than the current ``benchmarks/run``."""
    start = run.started_epoch if run else None
    done = finished_epoch(data)
    return start is not None and done is not None and done < start


# --------------------------------------------------------------------------- machine, versions


def _first_line_with(path: str, prefix: str) -> str | None:
    """The first line of ``path`` that starts with ``prefix``."""
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(prefix):
                return line
    return None


def machine(results: dict[str, Json]) -> Json:
    """This machine (the report runs where the benchmarks ran) plus the JSONs' view of it."""
    cpu = _first_line_with("/proc/cpuinfo", "model name")
    mem = _first_line_with("/proc/meminfo", "MemTotal:")
    seen = [d["machine"] for d in results.values() if isinstance(d.get("machine"), dict)]
    cpu_model = cpu.split(":", 1)[1].strip() if cpu else _get(seen, 0, "cpu_model")
    ram_gib = int(mem.split()[1]) / MIB if mem else None
    return {
        "cpu_model": cpu_model or "unknown",
        "cores": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "ram_gib": ram_gib,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "json_machines_differ": len({(m.get("cpu_model"), m.get("nproc")) for m in seen}) > 1,
    }


VERSION_KEYS = ("python", "flypool", "nginx", "haproxy", "wrk", "passenger", "gunicorn", "uvicorn")
"""Versions the header lists, in order."""


def versions(results: dict[str, Json], run: RunLog | None) -> dict[str, str]:
    """Each tool's version, from the JSONs (``versions`` first, then ``machine``),
    preferring the JSONs of the current run."""
    ordered = sorted(results.values(), key=lambda d: is_stale(d, run))
    found: dict[str, str] = {}
    for data in ordered:
        for source in ("versions", "machine"):
            block = data.get(source)
            if not isinstance(block, dict):
                continue
            for key, value in block.items():
                if isinstance(value, str) and value and key not in found:
                    found[key] = value
    return found


def short_version(key: str, text: str) -> str:
    """A version string without its banner (``nginx version: nginx/1.22.1`` → ``1.22.1``)."""
    patterns = {
        "nginx": r"nginx/(\S+)",
        "haproxy": r"HAProxy version (\S+)",
        "wrk": r"wrk (\S+)",
        "passenger": r"Passenger\S* (\S+)",
        "gunicorn": r"version (\S+?)\)",
        "uvicorn": r"uvicorn (\S+)",
        "py-spy": r"py-spy (\S+)",
    }
    pattern = patterns.get(key)
    match = re.search(pattern, text) if pattern else None
    return match.group(1) if match else text


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 1) -> str:
    """A number for a table cell (thousands separators), ``—`` for None."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def cell(value: Any) -> str:
    """``value`` made safe for a Markdown table cell."""
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column (l or r), default left."""
    marks = [("---:" if a == "r" else "---") for a in align.ljust(len(headers), "l")]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def shift_headings(markdown: str, min_level: int) -> str:
    """Demote the Markdown headings so that the biggest is ``min_level`` (code blocks untouched)."""
    lines = markdown.splitlines()
    fence = False
    levels: list[int] = []
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"(#{1,6}) ", line)):
            levels.append(len(m.group(1)))
    shift = max(0, min_level - min(levels)) if levels else 0
    if not shift:
        return markdown.strip()
    out: list[str] = []
    fence = False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            line = "#" * shift + line
        out.append(line)
    return "\n".join(out).strip()


def summary_table(summary: Any) -> str:
    """A Markdown table from a ``summary`` (a list of flat objects, or one object)."""
    if isinstance(summary, list) and summary and all(isinstance(r, dict) for r in summary):
        keys: list[str] = []
        for row in summary:
            keys += [k for k, v in row.items() if k not in keys and not isinstance(v, dict | list)]
        return table(keys, ([row.get(k) for k in keys] for row in summary))
    if isinstance(summary, dict):
        rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict | list)]
        rows += [
            (k, json.dumps(v, separators=(", ", ": "))[:200])
            for k, v in summary.items()
            if isinstance(v, dict | list)
        ]
        return table(["", ""], rows)
    return f"```\n{json.dumps(summary, indent=1)[:2000]}\n```"


def load_text(load: Any) -> str:
    """A load average triple as text."""
    if isinstance(load, list | tuple) and load:
        return " ".join(f"{x:.2f}" if isinstance(x, float | int) else str(x) for x in load)
    return str(load) if load else "—"


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One target of the benchmark issue and what was measured against it."""

    suite: str
    target: str
    measured: str
    limit: str
    passed: bool | None
    margin: str
    source: str

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or "no data" when the figure is missing."""
        if self.passed is None:
            return "no data"
        return "PASS" if self.passed else "**FAIL**"


def pct(x: float) -> str:
    """A signed percentage."""
    return f"{x * 100:+.1f} %"


def margin_ge(value: float, limit: float) -> str:
    """Headroom of ``value >= limit``, relative to the limit."""
    return pct(value / limit - 1) if limit else "—"


def margin_le(value: float, limit: float) -> str:
    """Headroom of ``value <= limit``, relative to the limit."""
    return pct(1 - value / limit) if limit else "—"


def router_targets(data: Json | None) -> list[Target]:
    """Suite 1: flypool req/s >= HAProxy's and >= 0.95 x nginx's, CPU/req <= 1.2 x nginx's."""
    suite = "router tax"
    source = "router_compare"
    wanted = [
        ("flypool req/s ≥ HAProxy's", "haproxy", "req/s"),
        ("flypool req/s ≥ 0.95 x nginx's", "nginx", "req/s"),
        ("flypool CPU/req ≤ 1.2 x nginx's", "nginx", "CPU"),
    ]
    if data is None:
        return [Target(suite, name, "—", "—", None, "—", source) for name, _, _ in wanted]
    summary = {
        (r.get("backend"), r.get("target")): r
        for r in data.get("summary") or []
        if isinstance(r, dict)
    }
    targets: list[Target] = []
    checks = [c for c in data.get("checks") or [] if isinstance(c, dict)]
    backends = [str(b) for b in _get(data, "settings", "backends") or []]
    for backend in backends or ["example", "gunicorn"]:
        for name, proxy, kind in wanted:
            mine = [
                c
                for c in checks
                if str(c.get("name", "")).startswith(f"{backend}:")
                and proxy in str(c.get("name"))
                and (("CPU" in str(c.get("name"))) == (kind == "CPU"))
            ]
            if not mine:
                targets.append(Target(suite, f"{backend}: {name}", "—", "—", None, "—", source))
            for check in mine:
                other = str(check["name"]).rsplit("/", 1)[-1].strip().replace("-", "/")
                value = _float(check.get("value"))
                m = re.search(r"(>=|<=)\s*([0-9.]+)", str(check.get("limit", "")))
                limit = float(m.group(2)) if m else None
                ours = summary.get((backend, "flypool/unix"), {})
                theirs = summary.get((backend, other), {})
                key = (
                    "median_proxy_cpu_ms_per_1k_requests"
                    if kind == "CPU"
                    else "median_requests_per_s"
                )
                unit = "ms CPU/1k req" if kind == "CPU" else "req/s"
                detail = f" ({fmt(ours.get(key))} vs {fmt(theirs.get(key))} {unit})"
                margin = "—"
                if value is not None and limit is not None and m is not None:
                    margin = (
                        margin_ge(value, limit) if m.group(1) == ">=" else margin_le(value, limit)
                    )
                targets.append(
                    Target(
                        suite,
                        f"{backend}: {name}, vs {other}",
                        (f"{value:.3f}x" if value is not None else "—") + detail,
                        f"{m.group(1).replace('>=', '≥').replace('<=', '≤')} {limit:g}x"
                        if m and limit is not None
                        else str(check.get("limit")),
                        bool(check.get("passed")) if "passed" in check else None,
                        margin,
                        source,
                    )
                )
    return targets


def _runs(data: Json | None, suite: str, system: str) -> list[Json]:
    """deploy_compare.py's runs of one suite and system."""
    if data is None:
        return []
    return [
        r
        for r in data.get("runs") or []
        if isinstance(r, dict) and r.get("suite") == suite and r.get("system") == system
    ]


def _rounds_note(runs: Sequence[Json]) -> str:
    """ ", worst of N rounds" when there were several."""
    return f", worst of {len(runs)} rounds" if len(runs) > 1 else ""


def deploy_targets(data: Json | None) -> list[Target]:
    """Suite 2: 0 failed, max latency <= steady max + 50 ms, every process new in time."""
    suite = "deploy"
    source = "deploy_compare"
    targets: list[Target] = []
    for system in DEPLOY_SYSTEMS:
        runs = _runs(data, "deploy", system)
        batch = 2 if system.endswith("b2") else 1
        note = _rounds_note(runs)
        if not runs:
            targets += [
                Target(suite, f"{system}: {what}", "—", "—", None, "—", source)
                for what in ("0 failed requests", "max latency", "every worker new")
            ]
            continue
        failed = max(_int(r.get("failed"), 0) for r in runs)
        targets.append(
            Target(
                suite,
                f"{system}: 0 failed requests",
                f"{failed} of {fmt(sum(_int(r.get('requests'), 0) for r in runs))}{note}",
                "0",
                failed == 0 and not any(r.get("error") for r in runs),
                "—",
                source,
            )
        )
        # Max latency after the restart against the steady-state max + 50 ms.
        worst: tuple[float, float] | None = None
        for r in runs:
            value = _float(r.get("max_after_restart_ms"))
            limit = _float(_get(r, "targets", "max_latency_limit_ms"))
            if limit is None and (steady := _float(_get(r, "steady", "max_ms"))) is not None:
                limit = steady + 50
            if (
                value is not None
                and limit is not None
                and (worst is None or value - limit > worst[0] - worst[1])
            ):
                worst = (value, limit)
        targets.append(
            Target(
                suite,
                f"{system}: max latency after the restart ≤ steady max + 50 ms",
                f"{worst[0]:.1f} ms{note}" if worst else "—",
                f"≤ {worst[1]:.1f} ms" if worst else "≤ steady max + 50 ms",
                worst[0] <= worst[1] if worst else None,
                f"{worst[1] - worst[0]:+.1f} ms" if worst else "—",
                source,
            )
        )
        steps = _int(_get(data, "settings", "workers"), 4) // batch
        for label, key in (
            ("nominal boot", "all_new_limit_nominal_s"),
            ("measured boot", "all_new_limit_measured_boot_s"),
        ):
            pair: tuple[float, float] | None = None
            for r in runs:
                value = _float(r.get("all_new_after_s"))
                limit = _float(_get(r, "targets", key))
                if limit is None and label == "nominal boot":
                    boot = _float(_get(data, "settings", "boot_delay"))
                    limit = steps * boot + 0.4 if boot is not None else None
                if value is None or limit is None:
                    pair = None
                    break
                if pair is None or value - limit > pair[0] - pair[1]:
                    pair = (value, limit)
            boots = [b for r in runs if (b := _float(r.get("median_boot_s"))) is not None]
            boot_note = (
                f"; boot {statistics.median(boots):.2f} s"
                if label == "measured boot" and boots
                else ""
            )
            targets.append(
                Target(
                    suite,
                    f"{system}: every worker new ≤ {steps} x boot + 0.4 s ({label})",
                    f"{pair[0]:.2f} s{note}" if pair else "— (never all new)",
                    f"≤ {pair[1]:.2f} s{boot_note}" if pair else "—",
                    pair[0] <= pair[1] if pair else (False if runs else None),
                    f"{pair[1] - pair[0]:+.2f} s" if pair else "—",
                    source,
                )
            )
    return targets


def broken_targets(data: Json | None) -> list[Target]:
    """Suite 3: 0 failed requests, the old pool kept, the reason visible in ``/status``."""
    suite = "broken deploy"
    source = "deploy_compare"
    targets: list[Target] = []
    for system in DEPLOY_SYSTEMS:
        runs = _runs(data, "broken", system)
        if not runs:
            targets += [
                Target(suite, f"{system}: {what}", "—", "—", None, "—", source)
                for what in ("0 failed requests", "old pool kept", "reason visible")
            ]
            continue
        note = _rounds_note(runs)
        failed = max(_int(r.get("failed"), 0) for r in runs)
        targets.append(
            Target(
                suite,
                f"{system}: 0 failed requests",
                f"{failed} of {fmt(sum(_int(r.get('requests'), 0) for r in runs))}{note}",
                "0",
                failed == 0 and not any(r.get("error") for r in runs),
                "—",
                source,
            )
        )
        kept = [bool(_get(r, "broken", "old_pool_kept")) for r in runs]
        states = sorted({str(_get(r, "broken", "app_state_at_end")) for r in runs})
        targets.append(
            Target(
                suite,
                f"{system}: old pool kept (old workers still serve)",
                f"{'yes' if all(kept) else 'no'} (state at end: {', '.join(states)}){note}",
                "yes",
                all(kept),
                "—",
                source,
            )
        )
        reasons = [_get(r, "broken", "deployment_error", "reason") for r in runs]
        seen = [_float(_get(r, "broken", "deployment_error_seen_after_s")) for r in runs]
        visible = all(isinstance(x, str) and x and x != "None" for x in reasons)
        when = [s for s in seen if s is not None]
        targets.append(
            Target(
                suite,
                f"{system}: reason visible in `flypool status`",
                (f"{reasons[0]!r}" if visible else "no deployment_error")
                + (f", seen {max(when):.2f} s after the deploy" if when and visible else ""),
                "deployment_error.reason set",
                visible,
                "—",
                source,
            )
        )
    return targets


def scale_targets(data: Json | None) -> list[Target]:
    """Suite 4: throughput drop < 10 %, RSS < 100 MB, status < 50 ms."""
    suite = "scale"
    source = "scale"
    idle = _get(data, "idle") or {}
    pool = _get(data, "pool") or {}
    n_idle = _get(data, "settings", "idle")
    workers = pool.get("workers") or _get(data, "settings", "pool_workers")
    targets = []
    drop = _float(idle.get("throughput_drop"))
    targets.append(
        Target(
            suite,
            f"throughput drop with {fmt(n_idle)} idle keep-alive connections < 10 %",
            f"{drop * 100:.1f} %" if drop is not None else "—",
            "< 10 %",
            drop < 0.10 if drop is not None else None,
            f"{(0.10 - drop) * 100:+.1f} points" if drop is not None else "—",
            source,
        )
    )
    rss = _float(idle.get("rss_max_bytes"))
    limit = 100 * MIB
    targets.append(
        Target(
            suite,
            f"daemon RSS with {fmt(n_idle)} idle connections < 100 MB",
            f"{rss / MIB:.1f} MiB" if rss is not None else "—",
            "< 100 MiB",
            rss < limit if rss is not None else None,
            margin_le(rss, limit) if rss is not None else "—",
            source,
        )
    )
    p95 = _float(_get(pool, "get_status_ms", "p95"))
    targets.append(
        Target(
            suite,
            f"status with {fmt(workers)} workers < 50 ms (`GET /status` on the admin socket, p95)",
            f"{p95:.2f} ms" if p95 is not None else "—",
            "< 50 ms",
            p95 < 50 if p95 is not None else None,
            f"{50 - p95:+.1f} ms" if p95 is not None else "—",
            source,
        )
    )
    cli = _float(_get(pool, "cli_status_json_ms", "median"))
    bare = _float(_get(pool, "python_c_pass_ms", "median"))
    imp = _float(_get(pool, "python_import_flypool_cli_ms", "median"))
    if cli is not None:
        extra = []
        if bare is not None:
            extra.append(f"`python -c pass` {bare:.1f} ms")
        if imp is not None:
            extra.append(f"`import flypool.cli` {imp:.1f} ms")
        targets.append(
            Target(
                suite,
                f"status with {fmt(workers)} workers < 50 ms (`flypool status --json` wall time, "
                "median, interpreter start included)",
                f"{cli:.1f} ms" + (f" ({'; '.join(extra)})" if extra else ""),
                "< 50 ms",
                cli < 50,
                f"{50 - cli:+.1f} ms",
                source,
            )
        )
    return targets


def overhead_targets(results: dict[str, Json]) -> list[Target]:
    """Engine overhead: < 20 ms per swap, per batch size, with 4 and with 16 workers."""
    suite = "engine overhead"
    targets = []
    found = {
        stem: d
        for stem, d in results.items()
        if d.get("benchmark", stem) == "restart_under_load" or stem.startswith("restart_under_load")
    }
    by_workers: dict[int, tuple[str, Json]] = {}
    for stem, data in sorted(found.items()):
        workers = _int(_get(data, "settings", "workers"), 4)
        by_workers.setdefault(workers, (stem, data))
    for workers in sorted({4, 16} | set(by_workers)):
        if workers not in by_workers:
            targets.append(
                Target(
                    suite,
                    f"{workers} workers: overhead per swap < 20 ms",
                    "— (not run)",
                    "< 20 ms",
                    None,
                    "—",
                    "restart_under_load" + ("" if workers == 4 else f"_w{workers}"),
                )
            )
            continue
        stem, data = by_workers[workers]
        runs = [r for r in data.get("runs") or [] if isinstance(r, dict)]
        for batch in sorted({_int(r.get("batch"), 0) for r in runs}):
            values = [
                v
                for r in runs
                if _int(r.get("batch"), 0) == batch
                and (v := _float(r.get("overhead_per_swap_s"))) is not None
            ]
            missing = sum(1 for r in runs if _int(r.get("batch"), 0) == batch) - len(values)
            label = f"{workers} workers, batch {batch}: overhead per swap < 20 ms"
            if not values:
                targets.append(
                    Target(suite, label, "— (restart unfinished?)", "< 20 ms", False, "—", stem)
                )
                continue
            med = statistics.median(values)
            rounds = (
                f" (median of {len(values)}: {', '.join(f'{v * 1000:.0f}' for v in values)})"
                if len(values) > 1
                else ""
            )
            if missing:
                rounds += f", {missing} round(s) without a figure"
            targets.append(
                Target(
                    suite,
                    label,
                    f"{med * 1000:.1f} ms{rounds}",
                    "< 20 ms",
                    # The figures come from millisecond timestamps: compare at that precision.
                    round(med, 6) < OVERHEAD_LIMIT_S and not missing,
                    f"{(OVERHEAD_LIMIT_S - med) * 1000:+.1f} ms"
                    if abs(OVERHEAD_LIMIT_S - med) >= 0.00005
                    else "0.0 ms (at the limit)",
                    stem,
                )
            )
    return targets


def soak_targets(data: Json | None) -> list[Target]:
    """Soak: only expected failures, RSS growth < 10 %, fds stable."""
    suite = "soak"
    s = _get(data, "summary") or {}
    targets = []
    unexpected = s.get("unexpected_failures")
    expected = s.get("expected_failures")
    reasons = s.get("unexpected_by_reason") or {}
    why = "; ".join(f"{k} x{v}" for k, v in reasons.items()) if isinstance(reasons, dict) else ""
    targets.append(
        Target(
            suite,
            "only expected failures (in flight at a SIGKILL)",
            f"{fmt(unexpected)} unexpected"
            + (f" ({why})" if why else "")
            + f"; {fmt(expected)} expected; {fmt(s.get('requests'))} requests",
            "0 unexpected",
            unexpected == 0 if isinstance(unexpected, int) else None,
            "—",
            "soak",
        )
    )
    growth = _float(s.get("rss_growth_pct"))
    start, end = _float(s.get("rss_start_bytes")), _float(s.get("rss_end_bytes"))
    targets.append(
        Target(
            suite,
            "daemon RSS growth (idle, end vs start) < 10 %",
            f"{growth:+.1f} %"
            + (f" ({start / MIB:.1f} → {end / MIB:.1f} MiB)" if start and end else "")
            if growth is not None
            else "—",
            "< 10 %",
            growth < 10 if growth is not None else None,
            f"{10 - growth:+.1f} points" if growth is not None else "—",
            "soak",
        )
    )
    delta = s.get("fds_delta")
    kinds = s.get("fd_kinds_change") or {}
    change = ", ".join(f"{k} {v:+d}" for k, v in kinds.items()) if isinstance(kinds, dict) else ""
    targets.append(
        Target(
            suite,
            "daemon fds stable (idle, end vs start, ± 5)",
            f"{fmt(s.get('fds_start'))} → {fmt(s.get('fds_end'))} (Δ {fmt(delta)}"
            + (f": {change}" if change else "")
            + ")",
            "|Δ| ≤ 5",
            abs(delta) <= 5 if isinstance(delta, int) else None,
            f"{5 - abs(delta):+d} fds" if isinstance(delta, int) else "—",
            "soak",
        )
    )
    return targets


def all_targets(results: dict[str, Json]) -> list[Target]:
    """Every target of the benchmark issue, in the issue's order."""
    return [
        *router_targets(results.get("router_compare")),
        *deploy_targets(results.get("deploy_compare")),
        *broken_targets(results.get("deploy_compare")),
        *scale_targets(results.get("scale")),
        *overhead_targets(results),
        *soak_targets(results.get("soak")),
    ]


# --------------------------------------------------------------------------- the report


def run_date(run: RunLog | None, now: dt.datetime) -> str:
    """When ``benchmarks/run`` started (else now)."""
    start = run.started_epoch if run else None
    if start is None:
        return now.strftime("%Y-%m-%d %H:%M UTC")
    return dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def header(results: dict[str, Json], run: RunLog | None, now: dt.datetime) -> list[str]:
    """Title, date, machine, versions, load."""
    m = machine(results)
    v = versions(results, run)
    lines = [
        "# flypool benchmark results",
        "",
        "Written by `benchmarks/report.py` from `benchmarks/out/*.json` (raw figures merged in "
        "`benchmarks/out/all.json`, gitignored). Regenerate everything with "
        "`bash benchmarks/run`; only the notes at the end are hand-written.",
        "",
        f"- **Date:** {run_date(run, now)} (report written {now.strftime('%Y-%m-%d %H:%M UTC')})",
        f"- **Machine:** {m['cpu_model']}, {m['cores']} cores ({m['cpus_usable']} usable), "
        + (f"{m['ram_gib']:.1f} GiB RAM" if m["ram_gib"] else "RAM unknown")
        + f", Linux {m['kernel']}",
        "- **Versions:** "
        + ", ".join(
            f"{key} {short_version(key, v[key]) if key in v else '— (not in any JSON)'}"
            for key in VERSION_KEYS
        ),
    ]
    if run is not None:
        meta = run.meta
        total = _float(meta.get("benchmarks_elapsed_s"))
        start = run.started_epoch
        ends = [s.started_epoch + s.elapsed_s for s in run.steps]
        whole = max(ends) - start if start and ends else None
        lines.append(
            f"- **Run:** `{meta.get('command', 'bash benchmarks/run')}`"
            + (f"; benchmarks {total / 60:.1f} min" if total else "")
            + (f", {whole / 60:.1f} min with installs and waits" if whole else "")
        )
        waited = _float(meta.get("waited_s"))
        lines.append(
            "- **Load average (1, 5, 15 min):** "
            f"before the benchmarks {meta.get('load_before', '—')}, "
            f"after {meta.get('load_after', '—')}"
            + (
                f" (waited {waited:.0f} s for the 1-minute load < {meta.get('wait_load_below')} "
                f"first; it was {meta.get('load_at_start', '—')} when the run started)"
                if waited is not None
                else ""
            )
        )
        if meta.get("quick") == "1":
            lines.append(
                "- **⚠ `--quick` run:** 1 round, short load phases, 30 s soak: a smoke test, "
                "not figures to quote."
            )
    if m["json_machines_differ"]:
        lines.append("- ⚠ The JSONs do not all come from the same kind of machine.")
    return lines


def targets_section(targets: list[Target]) -> list[str]:
    """The Targets table."""
    passed = sum(1 for t in targets if t.passed)
    failed = sum(1 for t in targets if t.passed is False)
    missing = sum(1 for t in targets if t.passed is None)
    return [
        "## Targets",
        "",
        f"{passed} PASS, {failed} FAIL" + (f", {missing} without data" if missing else "") + ".",
        "",
        table(
            ["suite", "target", "measured", "limit", "result", "margin", "source"],
            (
                (t.suite, t.target, t.measured, t.limit, t.verdict, t.margin, f"`{t.source}`")
                for t in targets
            ),
        ).replace("\\*\\*FAIL\\*\\*", "**FAIL**"),
        "",
        "Margin: headroom to the limit (positive: passed by that much; negative: missed by "
        "that much), relative to the limit for ratios and sizes, absolute for times. Router "
        "ratios are medians of per-round ratios (figures in parentheses are medians of the "
        "rounds); flypool reaches its worker over a Unix socket, so the `/unix` rows are the "
        "like-for-like ones. Deploy targets apply to flypool with the readiness probe "
        "(`flypool-b1`, `flypool-b2`); `flypool-b1-noprobe` is shown in its suite only.",
    ]


def steps_section(run: RunLog | None, results: dict[str, Json]) -> list[str]:
    """The exact commands: ``benchmarks/run``'s steps and each script's own command line."""
    lines = ["## Commands", ""]
    command = run.meta.get("command", "bash benchmarks/run") if run else "bash benchmarks/run"
    lines += ["```sh", command, "```", ""]
    if run is not None and run.steps:
        lines += [
            "Its steps (output of each in `benchmarks/out/<step>.log`):",
            "",
            table(
                ["step", "command", "exit", "time s", "load before → after"],
                (
                    (
                        s.name,
                        f"`{s.command}`",
                        s.exit_status if s.exit_status == 0 else f"**{s.exit_status}**",
                        f"{s.elapsed_s:.1f}",
                        f"{s.load_before} → {s.load_after}",
                    )
                    for s in run.steps
                ),
                "llrrl",
            ).replace("\\*\\*", "**"),
            "",
        ]
    commands = [
        (stem, d.get("command") or " ".join(map(str, d.get("argv") or [])))
        for stem, d in results.items()
    ]
    if commands:
        lines += ["Each script's own command line, from its JSON:", "", "```sh"]
        lines += [f"{c}    # -> {stem}.json" for stem, c in commands if c]
        lines += ["```"]
    return lines


FAILURE_LINE = re.compile(r"FAIL|❌|\*\*NO\*\*|Traceback|Error|error:|exited|goal")
"""Lines of a failed step's log worth quoting."""


def failures_section(run: RunLog | None, problems: list[str], out_dir: Path) -> list[str]:
    """Steps that exited non-zero (with the end of their log) and unreadable inputs."""
    failed = [s for s in (run.steps if run else []) if s.exit_status != 0]
    if not failed and not problems:
        return []
    lines = ["## Failed steps", ""]
    for s in failed:
        lines += [f"- **{s.name}** exited {s.exit_status} after {s.elapsed_s:.0f} s: `{s.command}`"]
        log = out_dir / f"{s.name}.log"
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace").splitlines()
            tail = [line for line in text if FAILURE_LINE.search(line)][-6:] or [
                line for line in text if line.strip() and not line.startswith("|")
            ][-6:]
            if tail:
                lines += ["", "  ```", *(f"  {line[:200]}" for line in tail), "  ```", ""]
    lines += [f"- {p}" for p in problems]
    return lines


def checks_table(data: Json) -> list[str]:
    """The benchmark's own PASS/FAIL checks, when it has a ``checks`` list."""
    checks = [c for c in data.get("checks") or [] if isinstance(c, dict)]
    if not checks:
        return []
    rows = []
    for c in checks:
        value = c.get("value")
        rows.append(
            (
                c.get("name"),
                f"{value:.3f}" if isinstance(value, float) else value,
                c.get("limit"),
                "PASS" if c.get("passed") else "FAIL",
            )
        )
    return [
        "",
        "Checks, as the script reports them:",
        "",
        table(["check", "value", "limit", ""], rows),
    ]


def benchmark_body(stem: str, data: Json, run: RunLog | None, level: int) -> list[str]:
    """One JSON's part of its section: provenance, tables, checks; its own Markdown's
    headings start at ``level``."""
    lines: list[str] = []
    when = data.get("finished_at", "—")
    load0 = _get(data, "machine", "loadavg_at_start")
    load1 = _get(data, "machine", "loadavg_at_end")
    lines.append(
        f"`{stem}.json`, finished {when}; load at start {load_text(load0)}"
        + (f", at end {load_text(load1)}" if load1 else "")
        + (f"; took {data['elapsed_s']:.0f} s" if isinstance(data.get("elapsed_s"), float) else "")
        + "."
    )
    if is_stale(data, run):
        lines.append(
            "\n**⚠ Stale: from an earlier run** (it finished before this `benchmarks/run` "
            "started: the run does not include it, or its step failed before writing it)."
        )
    if data.get("command"):
        lines += ["", f"Command: `{data['command']}`"]
    lines.append("")
    markdown = data.get("markdown")
    if isinstance(markdown, str) and markdown.strip():
        lines.append(shift_headings(markdown, level))
    elif "summary" in data:
        lines.append(summary_table(data["summary"]))
    else:
        lines.append("(no `markdown` or `summary` in this JSON)")
    lines += checks_table(data)
    profile = _get(data, "profile", "text")
    if isinstance(profile, str) and profile.strip():
        lines += [
            "",
            "<details><summary>Profile of the flypool daemon</summary>",
            "",
            shift_headings(profile, level + 1),
            "",
            "</details>",
        ]
    return lines


def suites_section(results: dict[str, Json], run: RunLog | None) -> list[str]:
    """One section per suite, known ones in order, then any other JSON."""
    lines: list[str] = []
    done: set[str] = set()
    for name, title, description in SECTIONS:
        stems = [s for s, d in results.items() if d.get("benchmark", s) == name]
        lines += ["", f"## {title}", ""]
        if description:
            lines += [description, ""]
        if not stems:
            lines.append(f"No `{name}.json`: not run, or it failed before writing one.")
        for stem in sorted(stems, key=lambda s: (len(s), s)):
            if len(stems) > 1:
                workers = _get(results[stem], "settings", "workers")
                lines += ["", f"### `{stem}`" + (f" ({workers} workers)" if workers else ""), ""]
            lines += benchmark_body(stem, results[stem], run, 4 if len(stems) > 1 else 3)
            done.add(stem)
    for stem in sorted(set(results) - done):
        lines += ["", f"## Other: `{stem}`", "", *benchmark_body(stem, results[stem], run, 3)]
    return lines


def read_notes(path: Path) -> str:
    """The hand-written part of an existing report: everything after the notes marker."""
    with contextlib.suppress(OSError):
        text = path.read_text()
        match = re.search(rf"^{re.escape(NOTES_MARKER)}[ \t]*(\n|\Z)", text, re.MULTILINE)
        if match:
            return text[match.end() :]
    return DEFAULT_NOTES


def render(
    results: dict[str, Json],
    run: RunLog | None,
    targets: list[Target],
    problems: list[str],
    notes: str,
    out_dir: Path,
    now: dt.datetime,
) -> str:
    """The whole RESULTS.md."""
    parts: list[list[str]] = [
        header(results, run, now),
        targets_section(targets),
        failures_section(run, problems, out_dir),
        steps_section(run, results),
        suites_section(results, run),
    ]
    body = "\n\n".join("\n".join(p).strip() for p in parts if p)
    body = re.sub(r"\n{3,}", "\n\n", body)
    return f"{body}\n\n{NOTES_MARKER}\n{notes}"


def merged(
    results: dict[str, Json], run: RunLog | None, targets: list[Target], now: dt.datetime
) -> Json:
    """Everything for ``all.json``."""
    return {
        "generated_at": now.isoformat(timespec="seconds"),
        "run": {"meta": run.meta, "steps": [asdict(s) for s in run.steps]} if run else None,
        "machine": machine(results),
        "versions": versions(results, run),
        "targets": [asdict(t) | {"verdict": t.verdict.strip("*")} for t in targets],
        "stale": sorted(stem for stem, d in results.items() if is_stale(d, run)),
        "results": results,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--out-dir", type=Path, default=OUT_DIR, help=f"benchmark JSONs (default {OUT_DIR})"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"report to write (default {RESULTS})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the report and the merged JSON; print the Targets table."""
    args = parse_args(argv)
    problems: list[str] = []
    results = load_results(args.out_dir, problems)
    run = read_run_log(args.out_dir / RUN_LOG)
    now = dt.datetime.now(dt.UTC)
    targets = all_targets(results)
    notes = read_notes(args.results)
    text = render(results, run, targets, problems, notes, args.out_dir, now)
    args.results.write_text(text)
    (args.out_dir / ALL_JSON).write_text(
        json.dumps(merged(results, run, targets, now), indent=1, default=str) + "\n"
    )
    print("\n".join(targets_section(targets)))
    print(
        f"\nreport.py: wrote {args.results} and {args.out_dir / ALL_JSON} "
        f"from {len(results)} JSON file(s)",
        file=sys.stderr,
    )
    for problem in problems:
        print(f"report.py: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

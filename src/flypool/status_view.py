"""Render the daemon's status JSON in the layout of `passenger-status` (SPEC §8).

Pure formatting: no IO, and the clock is a parameter, so the output is testable
byte for byte. Every field is read defensively (`.get` with a default) because
the CLI may talk to a daemon of another version: a missing key must degrade to
a blank, never to a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

__all__ = ["format_duration", "format_size", "render_status"]

_SECTION_GENERAL = "----------- General information -----------"
_SECTION_APPS = "----------- Application groups -----------"


def format_duration(seconds: float | None) -> str:
    """A duration the way passenger-status prints it: `5s`, `1m 0s`, `1h 2m 3s`, `3d 0h 0m 1s`.

    Leading zero units are dropped; once a unit is shown, every smaller one follows.
    """
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts: list[str] = []
    for value, unit in ((days, "d"), (hours, "h"), (minutes, "m")):
        if value or parts:
            parts.append(f"{value}{unit}")
    parts.append(f"{secs}s")
    return " ".join(parts)


def format_size(num_bytes: int | float | None) -> str:
    """A memory size the way passenger-status prints it: whole mebibytes, `12M`.

    Sizes of a gibibyte and more get one decimal in `G` (`1.5G`) so columns stay narrow.
    """
    if num_bytes is None:
        return "-"
    mib = max(0.0, float(num_bytes)) / (1024 * 1024)
    if mib >= 1024:
        return f"{mib / 1024:.1f}G"
    return f"{round(mib)}M"


def _format_percent(value: float | None) -> str:
    return "-" if value is None else f"{round(value)}%"


def _int(value: Any) -> int:
    """An int from a JSON value, 0 when absent or of the wrong type."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return int(value)
    return 0


def _opt_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _str(value: Any, default: str = "-") -> str:
    return default if value is None or value == "" else str(value)


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def _render_header(status: Mapping[str, Any], now: datetime) -> list[str]:
    instance = _str(status.get("instance"))
    details = []
    if status.get("pid") is not None:
        details.append(f"pid {status['pid']}")
    uptime = _opt_float(status.get("uptime_s"))
    if uptime is not None:
        details.append(f"up {format_duration(uptime)}")
    if details:
        # passenger-status puts the server identity in parentheses after the instance id.
        instance += f" ({', '.join(details)})"
    # The daemon stamps its snapshot; that beats the client's clock when present.
    date = status.get("date")
    if not isinstance(date, str) or not date:
        date = now.strftime("%Y-%m-%d %H:%M:%S %z").rstrip()
    version = _str(status.get("version"))
    if status.get("hot_path"):
        version += f", hot path {status['hot_path']}"
    return [
        f"Version : {version}",
        f"Date    : {date}",
        f"Instance: {instance}",
    ]


def _render_general(apps: Sequence[Mapping[str, Any]], max_pool_size: object = None) -> list[str]:
    # The daemon's max_pool_size when it reports one; from an older daemon,
    # the sum of every app's target (apps without it count their workers).
    max_pool = (
        max_pool_size
        if isinstance(max_pool_size, int) and max_pool_size > 0
        else sum(
            _int(app["workers_target"])
            if app.get("workers_target") is not None
            else len(_list(app.get("workers")))
            for app in apps
        )
    )
    processes = sum(len(_list(app.get("workers"))) for app in apps)
    return [
        _SECTION_GENERAL,
        f"Max pool size : {max_pool}",
        f"App groups    : {len(apps)}",
        f"Processes     : {processes}",
        # Requests queue per app in flypool; there is no top-level queue, so this
        # is always 0. The line stays for tools that parse passenger-status.
        "Requests in top-level queue : 0",
    ]


def _render_canary(c: Mapping[str, Any]) -> str:
    pids = c.get("workers")
    who = ", ".join(str(p) for p in pids) if isinstance(pids, list) else "?"

    def p99(v: object) -> str:
        return f"{v:.1f}ms" if isinstance(v, int | float) else "-"

    return (
        f"  Canary: PID {who}, waiting for {_str(c.get('waiting_for'), '?')}; "
        f"{_int(c.get('errors'))} of {_int(c.get('requests'))} failed, p99 {p99(c.get('p99_ms'))}"
        f" (old generation: {_int(c.get('old_errors'))} of {_int(c.get('old_requests'))}, "
        f"p99 {p99(c.get('old_p99_ms'))})"
    )


def _render_last_restart(last: Mapping[str, Any]) -> str:
    mode = _str(last.get("mode"), "restart")
    outcome = _str(last.get("outcome"), "finished")
    line = f"  Last restart: {mode} {outcome}"
    duration = _opt_float(last.get("duration_s"))
    if duration is not None:
        line += f" in {duration:.1f}s"
    if last.get("finished_at"):
        line += f" at {last['finished_at']}"
    if outcome != "completed" and last.get("reason"):
        line += f": {last['reason']}"
    return line


def _render_error(title: str, error: Mapping[str, Any]) -> list[str]:
    """A deployment or spawn error and the last output lines of the failed worker."""
    line = (
        f"  {title}: {_str(error.get('reason'), 'unknown')} "
        f"(release {_str(error.get('release'))}) at {_str(error.get('at'))}"
    )
    # Spawn errors (a crash loop outside a restart) carry their backoff state.
    failures = error.get("failures")
    if isinstance(failures, int) and not isinstance(failures, bool):
        line += f"; {failures} failure(s) in a row"
    retry = _opt_float(error.get("retry_in_s"))
    if retry is not None:
        line += f", next attempt in {retry:g}s"
    return [line, *(f"    {out}" for out in _list(error.get("output")))]


def _render_worker(worker: Mapping[str, Any], replacing_pid: Any) -> list[str]:
    pid = _str(worker.get("pid"))
    sessions = _str(worker.get("sessions"), "0")
    processed = _str(worker.get("processed"), "0")
    uptime = format_duration(_opt_float(worker.get("uptime_s")))
    cpu = _format_percent(_opt_float(worker.get("cpu_percent")))
    memory = format_size(_opt_float(worker.get("rss_bytes")))
    last_used_s = _opt_float(worker.get("last_used_s"))
    last_used = "never" if last_used_s is None else f"{format_duration(last_used_s)} ago"
    # The column widths are passenger-status's (%-5s plus three spaces), so tools
    # written against its output keep working.
    lines = [
        f"  * PID: {pid:<5}   Sessions: {sessions:<5}   Processed: {processed:<5}   "
        f"Uptime: {uptime}",
        f"    CPU: {cpu:<5}   Memory  : {memory:<5}   Last used: {last_used}",
        f"    Release: {_str(worker.get('release'))}   State: {_str(worker.get('state'))}"
        + (f"   Spawn: {worker['spawn']}" if worker.get("spawn") else ""),
    ]
    if replacing_pid is not None and worker.get("pid") == replacing_pid:
        lines.append("    Rolling restarting...")
    return lines


def _render_app(app: Mapping[str, Any]) -> list[str]:
    lines = [
        f"{_str(app.get('name'))} ({_str(app.get('state'), 'unknown')}):",
        f"  App root: {_str(app.get('root'))}",
        f"  Release: {_str(app.get('release'))}",
    ]
    listen = [str(item) for item in _list(app.get("listen"))]
    if listen:
        lines.append(f"  Listen: {', '.join(listen)}")
    workers = [w for w in _list(app.get("workers")) if isinstance(w, Mapping)]
    if app.get("workers_target") is not None:
        lines.append(f"  Workers: {len(workers)} (target {_int(app['workers_target'])})")
    if app.get("drained"):
        lines.append("  Drained: yes (health check answers 503)")
    lines.append(f"  Requests in queue: {_int(app.get('queue'))}")

    restart = _mapping(app.get("restart"))
    replacing_pid = None
    if restart is not None:
        mode = _str(restart.get("mode"), "restart")
        line = f"  Restart: {mode} {_int(restart.get('done'))}/{_int(restart.get('total'))}"
        batch = restart.get("batch")
        if isinstance(batch, int) and batch > 1:
            line += f" (batch {batch})"
        lines.append(line)
        canary = _mapping(restart.get("canary"))
        if restart.get("phase") == "canary" and canary is not None:
            lines.append(_render_canary(canary))
        replacing_pid = restart.get("replacing_pid")
    else:
        last = _mapping(app.get("last_restart"))
        if last is not None:
            lines.append(_render_last_restart(last))

    error = _mapping(app.get("deployment_error"))
    if error is not None:
        lines.extend(_render_error("Deployment error", error))
    spawn_error = _mapping(app.get("spawn_error"))
    if spawn_error is not None:
        lines.extend(_render_error("Spawn error", spawn_error))

    lines.extend(
        _render_preloader(p) for p in _list(app.get("preloaders")) if isinstance(p, Mapping)
    )
    for worker in workers:
        lines.extend(_render_worker(worker, replacing_pid))
    return lines


def _render_preloader(p: Mapping[str, Any]) -> str:
    took = _opt_float(p.get("import_s"))
    imported = f", imported in {took:.2f}s" if took is not None else ""
    return (
        f"  Preloader: PID {_str(p.get('pid'))} {_str(p.get('state'))}{imported}, "
        f"{_int(p.get('workers'))} workers forked now, release {_str(p.get('release'))}"
    )


def render_status(status: Mapping[str, Any], now: datetime | None = None) -> str:
    """Format a `GET /status` document as `passenger-status` text.

    `now` is the time printed on the `Date` line; it defaults to the current
    local time. The result ends with a newline.
    """
    if now is None:
        now = datetime.now().astimezone()
    apps = [app for app in _list(status.get("apps")) if isinstance(app, Mapping)]
    lines = _render_header(status, now)
    lines.append("")
    lines.extend(_render_general(apps, status.get("max_pool_size")))
    lines.append("")
    lines.append(_SECTION_APPS)
    for index, app in enumerate(apps):
        if index:
            lines.append("")
        lines.extend(_render_app(app))
    return "\n".join(lines) + "\n"

"""Memory figures for the memory-aware surge (SPEC §7, ``restart_batch = "auto"``).

Available memory is the cgroup's limit minus its usage when the daemon runs
in a memory-limited cgroup (v2 ``memory.max``/``memory.current``, or v1
``memory.limit_in_bytes``/``memory.usage_in_bytes``), never more than the
host's ``MemAvailable``; without a limit it is ``MemAvailable``. Reading
these is a few small file reads, done when a restart starts, at each
reconcile of an "auto" restart, and at a reconcile of any restart while an
old worker exits (may the next spawn overlap its exit?), never on the
request path.
"""

from __future__ import annotations

import os

import psutil

CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
_NO_LIMIT = 1 << 60


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_paths() -> tuple[str | None, str | None]:
    """The memory controller's directory: (v2 path, v1 path) of this process."""
    v2 = v1 = None
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = os.path.join(CGROUP_ROOT, path.lstrip("/"))
        elif "memory" in controllers.split(","):
            v1 = os.path.join(CGROUP_ROOT, "memory", path.lstrip("/"))
    return v2, v1


def cgroup_available() -> int | None:
    """Limit minus usage of this process's memory cgroup, or None when unlimited."""
    v2, v1 = _cgroup_paths()
    candidates = []
    if v2 is not None:
        candidates.append((os.path.join(v2, "memory.max"), os.path.join(v2, "memory.current")))
    if v1 is not None:
        candidates.append(
            (os.path.join(v1, "memory.limit_in_bytes"), os.path.join(v1, "memory.usage_in_bytes"))
        )
    # Inside a container the namespace root is the cgroup itself.
    candidates.append(
        (os.path.join(CGROUP_ROOT, "memory.max"), os.path.join(CGROUP_ROOT, "memory.current"))
    )
    for limit_path, usage_path in candidates:
        limit = _read_int(limit_path)
        usage = _read_int(usage_path)
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        return max(0, limit - usage)
    return None


def mem_available() -> int:
    """The host's MemAvailable in bytes."""
    return int(psutil.virtual_memory().available)


def available_memory() -> int:
    """Memory new workers may use: the cgroup's room, else MemAvailable."""
    host = mem_available()
    group = cgroup_available()
    return host if group is None else min(group, host)


def auto_batch(available: int, reserve: int, largest_rss: int, workers: int) -> int:
    """How many workers one step may replace at once: at least 1, at most ``workers``."""
    if largest_rss <= 0:
        return 1
    fits = (available - reserve) // largest_rss
    return max(1, min(workers, int(fits)))


_PAGE = os.sysconf("SC_PAGE_SIZE")


def own_rss(pid: int) -> int:
    """RSS of ``pid`` alone from ``/proc/PID/statm`` (one small read), or 0.

    For the moment a worker is ready (SPEC §8: status never shows 0): it is on
    the path of every restart step, where psutil's scan of every process
    for a master's children costs milliseconds. The sampler adds a master's
    children at its next tick.
    """
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0

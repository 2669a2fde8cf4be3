"""USR2: replace the daemon's own code without touching a worker or a client.

Theory of operation
-------------------
The daemon re-executes itself in place (``execv``), so it keeps its PID:
systemd and runit see no exit, and the workers stay its children, so it can
still reap them. What crosses the ``execv`` is a set of file descriptors
(their close-on-exec flag cleared) and a small JSON file describing them:

- the listening sockets (front and admin): connections that arrive during
  the switch wait in the kernel backlog;
- every worker: pid, socket, release, counters, and the read ends of its
  stdout/stderr pipes;
- idle keep-alive client connections. Before the switch each connection is
  *frozen* the moment it has no request in progress: reading is paused, so
  the next request stays in the kernel buffer for the new image to read.
  Connections still busy after ``drain_timeout`` are closed, and WebSocket
  tunnels are closed: their state cannot be passed on.

The new image finds ``FLYPOOL_HANDOVER`` in its environment, adopts all of
it (workers are watched through pidfds, see ``spawner.AdoptedProcess``) and
goes on serving. If anything fails before ``execv``, the old image simply
resumes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

STATE_ENV = "FLYPOOL_HANDOVER"


def _keep(fd: int) -> int:
    """A duplicate of ``fd`` that survives execv."""
    new = os.dup(fd)
    os.set_inheritable(new, True)
    return new


def keep_socket(sock: socket.socket) -> int:
    """An inheritable duplicate of a socket's descriptor."""
    return _keep(sock.fileno())


def keep_fd(fd: int) -> int:
    """An inheritable duplicate of a plain descriptor (worker output pipes)."""
    return _keep(fd)


def write_state(runtime_dir: str, state: dict[str, Any]) -> str:
    """Write the state file the next image reads; return its path."""
    path = os.path.join(runtime_dir, "handover.json")
    state["written_at"] = time.time()
    with open(path, "w") as f:
        json.dump(state, f)
    return path


def exec_self(state_path: str) -> None:
    """Become a fresh copy of flypool with the same command line (never returns)."""
    os.environ[STATE_ENV] = state_path
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def read_state() -> dict[str, Any] | None:
    """The hand-over state when this process was started by USR2, else None."""
    path = os.environ.pop(STATE_ENV, "")
    if not path:
        return None
    try:
        with open(path) as f:
            state: dict[str, Any] = json.load(f)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return state


def adopt_socket(fd: int) -> socket.socket:
    """Wrap an inherited descriptor, close-on-exec again so workers don't get it."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock

"""The daemon's lifeline: a pipe whose write end only the daemon holds.

Preloaded workers are children of their preloader, not of the daemon, so
``setpriv --pdeathsig`` cannot tie them to the daemon's life. Each worker
instead holds a read end of this pipe armed with ``O_ASYNC``/``F_SETSIG``
(see :mod:`flypool.preload.server`): when the daemon dies (SIGKILL, crash)
the kernel closes the write end and sends SIGTERM to every preloaded
worker's process group (SPEC §2: workers never outlive the daemon by accident).

Both ends are close-on-exec, so no worker, cold or preloaded, ever holds the
write end. A USR2 hand-over (``execv`` of the daemon) must carry the write
end across (``handover.keep_fd(lifeline.fds()[1])``) and the new image must
call :func:`adopt`; otherwise every preloaded worker gets SIGTERM at the
switch.
"""

from __future__ import annotations

import os

_fds: tuple[int, int] | None = None


def fds() -> tuple[int, int]:
    """The (read, write) ends, created on first use."""
    global _fds
    if _fds is None:
        _fds = os.pipe2(os.O_CLOEXEC)
    return _fds


def existing() -> tuple[int, int] | None:
    """The (read, write) ends if this process made or adopted them, else None."""
    return _fds


def adopt(read_fd: int, write_fd: int) -> None:
    """Use ends inherited across a hand-over (made close-on-exec again)."""
    global _fds
    for fd in (read_fd, write_fd):
        os.set_inheritable(fd, False)
    _fds = (read_fd, write_fd)

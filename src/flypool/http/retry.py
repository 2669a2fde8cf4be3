"""When a request whose worker failed is sent again: the one place that decides (SPEC §6).

What a failure was is read from the connection that carried the request,
never from the worker's main process (a gunicorn or puma master survives
the child that died of the request):

- ``CONNECT``: no connection could be made. Nothing was sent.
- ``NOT_SENT``: the connection was already closed when the request was
  written to it (EPIPE, or found closing). Nothing was delivered.
- ``UNREAD``: the worker's end closed with request bytes unread (ECONNRESET
  on a Unix socket; an RST on TCP). The worker never read the whole request.
- ``SILENT``: the worker's end closed cleanly, with nothing unread and no
  answer byte. The worker read the request and then died or hung up: the
  request may have killed it (a query of death).
- ``BROKEN``: the answer had begun (at least one byte arrived) and broke.

``CONNECT`` and ``NOT_SENT`` are sent again whatever the method (nginx's
``proxy_next_upstream error``): no worker saw them. ``UNREAD`` and ``SILENT``
are sent once more, to another worker, only when the request is
*replayable*: an idempotent method whose body was read in full and kept
(64 KiB at most) and ``retry_idempotent`` is on. Each such retry is counted;
the second counted failure is final (502, ``request killed two workers``),
so a query of death kills at most two workers and never reaches a third.

The canary rule lives here too: a replayable request that a canary worker
answers with a 5xx, before any byte of that answer went to the client, is
asked again of a non-canary worker (SPEC §6).

Pure functions over ints and bools, no IO.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

# Bodies up to this size are kept after sending, so that a retry can resend them.
REPLAY_LIMIT: Final = 65536
# Resends of requests no worker saw (connect failures, dead sockets): a bound,
# so that a pool whose every worker refuses connections ends in a 502.
MAX_RESENDS: Final = 8
# Counted retries (the worker may have seen the request): one.
MAX_RETRIES: Final = 1

# Methods a proxy may safely resend (RFC 9110 §9.2.2).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Failure(IntEnum):
    """How a worker failed a request, as its connection showed it."""

    CONNECT = 0
    NOT_SENT = 1
    UNREAD = 2
    SILENT = 3
    BROKEN = 4


class Verdict(IntEnum):
    """What to do with a request whose worker failed."""

    RESEND = 0  # no worker saw it: send it again (not counted)
    RETRY = 1  # send once more, to another worker (counted)
    FAIL = 2  # 502
    KILLED_TWO = 3  # 502, and log "request killed two workers"


def decide(failure: Failure, *, replayable: bool, resends: int, retries: int) -> Verdict:
    """The verdict for one failure; ``resends``/``retries`` count the earlier ones."""
    if failure == Failure.CONNECT or failure == Failure.NOT_SENT:
        return Verdict.RESEND if resends < MAX_RESENDS else Verdict.FAIL
    if failure == Failure.BROKEN or not replayable:
        return Verdict.FAIL
    if retries < MAX_RETRIES:
        return Verdict.RETRY
    return Verdict.KILLED_TWO


def replayable(method: bytes, *, enabled: bool, kept: bool, upgrade: bool) -> bool:
    """Whether a request may be sent again after a worker saw it.

    ``kept``: its body was read in full and every byte sent is still held
    (at most :data:`REPLAY_LIMIT`).
    """
    return enabled and kept and not upgrade and method in IDEMPOTENT


def reask_canary(status: int, *, canary: bool, replayable: bool, answered: bool) -> bool:
    """Whether a canary's answer is dropped and the request asked of an old worker.

    ``answered``: a byte of this answer already went to the client.
    """
    return canary and status >= 500 and replayable and not answered

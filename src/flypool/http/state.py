"""The proxy's connection states and their transitions, as data (no IO).

Theory of operation
-------------------
Every connection the proxy holds plays one of two roles, and each role has
one state machine:

- the **client side** (a connection from nginx, HAProxy or a browser):
  wait for the PROXY header, idle between requests, read a head, read a
  body, wait for the worker's answer, send the answer, relay a tunnel, close;
- the **worker side** (a connection to a worker): idle in the pool, send the
  request, wait for the answer, receive the answer, done, must close.

What happens to a connection is an *event*; where it goes is the table
below and nothing else (h11's ``_state.py`` is the model). A missing key is
an :class:`IllegalTransition`: code that tests flags can drift into a
combination nobody thought of, code that asks this table cannot. Rule: a
protocol object never assigns a state itself; it calls :func:`client_next` /
:func:`upstream_next` and carries out what the new state implies.

What a state implies is data too: :data:`CLIENT_TIMER` names the one timer
that runs in each client state (the peer's silence is timed, never the
daemon's own pauses), and :data:`CLIENT_READS` says whether bytes from the
client are parsed in that state (in the others they wait in a buffer).

Two overlaps are states of their own because they are where proxies lose
requests: ``EARLY`` (the worker answers while the request body is still
arriving: a 413 after the head) and ``DISCARD`` (that answer is complete;
the rest of the body is read and dropped, for a bounded time, so that the
connection can serve the next request and an RST cannot destroy the answer).
On the worker side the same overlap is ``EARLY`` too, and it ends in
``MUST_CLOSE``: a connection with unsent request bytes is never reused.

This module imports neither asyncio nor os, has no dynamic tricks and is
fully typed, so that it can be compiled (mypyc / Cython pure-Python mode).
The transition tables are built once, at import, into tuples indexed by the
state and event numbers: a transition is two tuple lookups.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class IllegalTransition(Exception):
    """An event the current state does not accept (a bug, never a peer's doing).

    An ``Exception``, not a ``RuntimeError``: mypyc compiles a subclass of
    ``Exception`` but not of other built-in exceptions."""


# -- client side ----------------------------------------------------------------------------


class ClientState(IntEnum):
    """The life of one client connection."""

    PROXY = 0  # waiting for the PROXY protocol header (proxy_protocol TCP listeners)
    IDLE = 1  # between requests (keep-alive)
    HEAD = 2  # reading a request head
    BODY = 3  # reading a request body; no answer yet
    WAITING = 4  # the request is read; waiting for the worker's answer
    SENDING = 5  # sending the answer; the request is read
    EARLY = 6  # sending the answer while the request body still arrives
    DISCARD = 7  # answered before the body ended: reading and dropping the rest
    TUNNEL = 8  # after 101: raw bytes both ways
    CLOSING = 9  # no more requests: flush, read and drop for a while (lingering close)
    FROZEN = 10  # idle and no longer read: handed over to the next image (USR2)
    CLOSED = 11


class ClientEvent(IntEnum):
    """What happens on a client connection."""

    PROXY_DONE = 0  # the PROXY header was read
    HEAD_START = 1  # the first byte of a request head
    HEAD_BODY = 2  # the head is complete and a body follows
    HEAD_END = 3  # the head is complete and no body follows: the request is read
    BODY_END = 4  # the last byte of the body
    RESPONSE = 5  # a final (non-1xx) answer head went out
    RESPONSE_END = 6  # the answer is complete and the connection stays open
    RESPONSE_CLOSE = 7  # the answer is complete and the connection must close
    UPGRADE = 8  # a 101 went out: tunnel
    ERROR = 9  # the daemon answers an error itself (nothing sent yet): close after it
    CUT = 10  # close now (timeout, broken answer, shutdown of an idle connection)
    EOF = 11  # the client shut its write side while we wait for its bytes
    LOST = 12  # the connection is gone
    FREEZE = 13  # USR2: an idle connection stops reading for good
    THAW = 14  # the hand-over failed: read again


_C = ClientState
_CE = ClientEvent

# Events every open state accepts the same way.
_GONE: Final = {_CE.CUT: _C.CLOSED, _CE.LOST: _C.CLOSED}

CLIENT_TRANSITIONS: Final[dict[ClientState, dict[ClientEvent, ClientState]]] = {
    _C.PROXY: {_CE.PROXY_DONE: _C.IDLE, _CE.EOF: _C.CLOSED, **_GONE},
    _C.IDLE: {_CE.HEAD_START: _C.HEAD, _CE.FREEZE: _C.FROZEN, _CE.EOF: _C.CLOSED, **_GONE},
    _C.HEAD: {
        _CE.HEAD_BODY: _C.BODY,
        _CE.HEAD_END: _C.WAITING,
        _CE.ERROR: _C.CLOSING,
        _CE.EOF: _C.CLOSED,
        **_GONE,
    },
    _C.BODY: {
        _CE.BODY_END: _C.WAITING,
        _CE.RESPONSE: _C.EARLY,
        _CE.UPGRADE: _C.TUNNEL,
        _CE.ERROR: _C.CLOSING,
        _CE.EOF: _C.CLOSED,
        **_GONE,
    },
    _C.WAITING: {
        _CE.RESPONSE: _C.SENDING,
        _CE.UPGRADE: _C.TUNNEL,
        _CE.ERROR: _C.CLOSING,
        **_GONE,
    },
    _C.SENDING: {_CE.RESPONSE_END: _C.IDLE, _CE.RESPONSE_CLOSE: _C.CLOSING, **_GONE},
    _C.EARLY: {
        _CE.BODY_END: _C.SENDING,
        _CE.RESPONSE_END: _C.DISCARD,
        _CE.RESPONSE_CLOSE: _C.CLOSING,
        # The body will never end; the answer still goes out, then we close.
        _CE.EOF: _C.SENDING,
        **_GONE,
    },
    _C.DISCARD: {_CE.BODY_END: _C.IDLE, _CE.EOF: _C.CLOSED, **_GONE},
    _C.TUNNEL: {_CE.EOF: _C.CLOSED, **_GONE},
    _C.CLOSING: {_CE.EOF: _C.CLOSED, **_GONE},
    _C.FROZEN: {_CE.THAW: _C.IDLE, **_GONE},
    _C.CLOSED: {},
}


class Timer(IntEnum):
    """The one client timer of a state; each times the client's own silence."""

    NONE = 0
    HEADER = 1  # header_timeout: the whole head (and the PROXY header)
    KEEPALIVE = 2  # keepalive_timeout: idle between requests
    BODY = 3  # body_timeout: between body bytes, only while the daemon is reading
    LINGER = 4  # lingering close / discarding a body nobody will read


CLIENT_TIMER: Final[tuple[Timer, ...]] = (
    Timer.HEADER,  # PROXY
    Timer.KEEPALIVE,  # IDLE
    Timer.HEADER,  # HEAD
    Timer.BODY,  # BODY
    Timer.NONE,  # WAITING: queue_timeout and max_request_time are the router's
    Timer.NONE,  # SENDING: send_timeout runs while the client's buffer is full
    Timer.BODY,  # EARLY
    Timer.LINGER,  # DISCARD
    Timer.NONE,  # TUNNEL
    Timer.LINGER,  # CLOSING
    Timer.NONE,  # FROZEN
    Timer.NONE,  # CLOSED
)

# Whether bytes from the client are parsed in a state; in the others they are
# kept (pipelined requests wait their turn) or, in CLOSED, dropped.
CLIENT_READS: Final[tuple[bool, ...]] = (
    True,  # PROXY
    True,  # IDLE
    True,  # HEAD
    True,  # BODY
    False,  # WAITING
    False,  # SENDING
    True,  # EARLY
    True,  # DISCARD
    True,  # TUNNEL (relayed, not parsed)
    True,  # CLOSING (dropped)
    False,  # FROZEN
    False,  # CLOSED
)

# States with an answer on its way to the client: another status line must
# never be written into it; an error there cuts the connection.
CLIENT_ANSWERING: Final[frozenset[ClientState]] = frozenset({_C.SENDING, _C.EARLY, _C.TUNNEL})


# -- worker side ------------------------------------------------------------------------------


class UpstreamState(IntEnum):
    """The life of one connection to a worker."""

    IDLE = 0  # connected, no request (in the worker's pool, or just connected)
    SENDING = 1  # request bytes going out; no answer byte yet
    WAITING = 2  # the request is sent; no answer byte yet
    RECEIVING = 3  # answer bytes arriving; the request is sent
    EARLY = 4  # answer bytes arriving while request bytes are still to be sent
    DONE = 5  # the answer ended and the request was sent in full: reusable
    TUNNEL = 6  # after 101
    MUST_CLOSE = 7  # not reusable (the worker closes, unsent request bytes, broken)
    CLOSED = 8


class UpstreamEvent(IntEnum):
    """What happens on a worker connection."""

    ATTACH = 0  # a request is given to it
    SENT = 1  # the last request byte was written
    ANSWER = 2  # the first answer byte arrived
    END = 3  # the answer is complete and the worker keeps the connection
    END_CLOSE = 4  # the answer is complete and the connection must not be reused
    PARK = 5  # back into the worker's pool
    UPGRADE = 6  # the worker switched protocols
    ABORT = 7  # the daemon gives up on it (client gone mid-request, timeouts)
    LOST = 8  # the connection is gone


_U = UpstreamState
_UE = UpstreamEvent

UPSTREAM_TRANSITIONS: Final[dict[UpstreamState, dict[UpstreamEvent, UpstreamState]]] = {
    # An idle connection may also be aborted (retired, swept) or closed by the worker.
    _U.IDLE: {_UE.ATTACH: _U.SENDING, _UE.ABORT: _U.MUST_CLOSE, _UE.LOST: _U.CLOSED},
    _U.SENDING: {
        _UE.SENT: _U.WAITING,
        _UE.ANSWER: _U.EARLY,
        _UE.ABORT: _U.MUST_CLOSE,
        _UE.LOST: _U.CLOSED,
    },
    _U.WAITING: {_UE.ANSWER: _U.RECEIVING, _UE.ABORT: _U.MUST_CLOSE, _UE.LOST: _U.CLOSED},
    _U.RECEIVING: {
        _UE.END: _U.DONE,
        _UE.END_CLOSE: _U.MUST_CLOSE,
        _UE.UPGRADE: _U.TUNNEL,
        _UE.ABORT: _U.MUST_CLOSE,
        _UE.LOST: _U.CLOSED,
    },
    _U.EARLY: {
        _UE.SENT: _U.RECEIVING,
        # Request bytes are still unsent: this connection is never reused.
        _UE.END: _U.MUST_CLOSE,
        _UE.END_CLOSE: _U.MUST_CLOSE,
        _UE.UPGRADE: _U.TUNNEL,
        _UE.ABORT: _U.MUST_CLOSE,
        _UE.LOST: _U.CLOSED,
    },
    _U.DONE: {_UE.PARK: _U.IDLE, _UE.ABORT: _U.MUST_CLOSE, _UE.LOST: _U.CLOSED},
    _U.TUNNEL: {_UE.ABORT: _U.MUST_CLOSE, _UE.LOST: _U.CLOSED},
    _U.MUST_CLOSE: {_UE.ABORT: _U.MUST_CLOSE, _UE.LOST: _U.CLOSED},
    _U.CLOSED: {},
}

# States in which the worker has sent nothing of an answer to the attached
# request: a failure there is one the retry policy may act on.
UPSTREAM_SILENT: Final[frozenset[UpstreamState]] = frozenset({_U.SENDING, _U.WAITING})


# -- the lookup ---------------------------------------------------------------------------------


def _client_table() -> tuple[tuple[ClientState | None, ...], ...]:
    rows = []
    for state in ClientState:
        allowed = CLIENT_TRANSITIONS[state]
        rows.append(tuple(allowed.get(event) for event in ClientEvent))
    return tuple(rows)


def _upstream_table() -> tuple[tuple[UpstreamState | None, ...], ...]:
    rows = []
    for state in UpstreamState:
        allowed = UPSTREAM_TRANSITIONS[state]
        rows.append(tuple(allowed.get(event) for event in UpstreamEvent))
    return tuple(rows)


# The tables as the protocols index them: CLIENT_TABLE[state][event] is the
# next state, or None where the transition is illegal.
CLIENT_TABLE: Final = _client_table()
UPSTREAM_TABLE: Final = _upstream_table()


def client_next(state: ClientState, event: ClientEvent) -> ClientState:
    """The client state after ``event``; :class:`IllegalTransition` if not allowed."""
    nxt = CLIENT_TABLE[state][event]
    if nxt is None:
        raise IllegalTransition(f"client: {event.name} in state {state.name}")
    return nxt


def upstream_next(state: UpstreamState, event: UpstreamEvent) -> UpstreamState:
    """The worker-connection state after ``event``; :class:`IllegalTransition` if not allowed."""
    nxt = UPSTREAM_TABLE[state][event]
    if nxt is None:
        raise IllegalTransition(f"upstream: {event.name} in state {state.name}")
    return nxt

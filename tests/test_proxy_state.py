"""The proxy's state tables and retry policy (pure: no sockets, no event loop).

Every (state, event) pair of both tables is tested: the allowed ones lead
where the table says, every other one raises IllegalTransition.
"""

from __future__ import annotations

import pytest

from flypool.http import retry
from flypool.http.retry import Failure, Verdict
from flypool.http.state import (
    CLIENT_READS,
    CLIENT_TIMER,
    CLIENT_TRANSITIONS,
    UPSTREAM_TRANSITIONS,
    ClientEvent,
    ClientState,
    IllegalTransition,
    Timer,
    UpstreamEvent,
    UpstreamState,
    client_next,
    upstream_next,
)

CLIENT_PAIRS = [(s, e) for s in ClientState for e in ClientEvent]
UPSTREAM_PAIRS = [(s, e) for s in UpstreamState for e in UpstreamEvent]


def _id(pair: tuple[object, object]) -> str:
    s, e = pair
    return f"{s.name}-{e.name}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("pair", CLIENT_PAIRS, ids=_id)
def test_client_transition(pair: tuple[ClientState, ClientEvent]) -> None:
    """Each client (state, event) goes where the table says, or is refused."""
    state, event = pair
    want = CLIENT_TRANSITIONS[state].get(event)
    if want is None:
        with pytest.raises(IllegalTransition):
            client_next(state, event)
    else:
        assert client_next(state, event) is want


@pytest.mark.parametrize("pair", UPSTREAM_PAIRS, ids=_id)
def test_upstream_transition(pair: tuple[UpstreamState, UpstreamEvent]) -> None:
    """Each worker-side (state, event) goes where the table says, or is refused."""
    state, event = pair
    want = UPSTREAM_TRANSITIONS[state].get(event)
    if want is None:
        with pytest.raises(IllegalTransition):
            upstream_next(state, event)
    else:
        assert upstream_next(state, event) is want


def test_tables_cover_every_state() -> None:
    """Every state has a row, and the per-state tables have one entry per state."""
    assert set(CLIENT_TRANSITIONS) == set(ClientState)
    assert set(UPSTREAM_TRANSITIONS) == set(UpstreamState)
    assert len(CLIENT_TIMER) == len(ClientState) == len(CLIENT_READS)


def test_closed_is_final_and_every_open_state_can_end() -> None:
    """Nothing leaves CLOSED; every other state can be lost (no connection outlives its socket)."""
    assert CLIENT_TRANSITIONS[ClientState.CLOSED] == {}
    assert UPSTREAM_TRANSITIONS[UpstreamState.CLOSED] == {}
    for s in ClientState:
        if s is not ClientState.CLOSED:
            assert CLIENT_TRANSITIONS[s][ClientEvent.LOST] is ClientState.CLOSED
    for u in UpstreamState:
        if u is not UpstreamState.CLOSED:
            assert UPSTREAM_TRANSITIONS[u][UpstreamEvent.LOST] is UpstreamState.CLOSED


def test_every_state_is_reachable() -> None:
    """From a new connection, every client and worker-side state can be reached."""
    for table, starts in (
        (CLIENT_TRANSITIONS, {ClientState.PROXY, ClientState.IDLE}),
        (UPSTREAM_TRANSITIONS, {UpstreamState.IDLE}),
    ):
        seen = set(starts)
        todo = list(starts)
        while todo:
            for nxt in table[todo.pop()].values():  # type: ignore[index]
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen == set(table)


def test_early_answer_never_leaves_a_reusable_worker_connection() -> None:
    """An answer that ends while request bytes are unsent makes the connection MUST_CLOSE."""
    s = upstream_next(UpstreamState.IDLE, UpstreamEvent.ATTACH)
    s = upstream_next(s, UpstreamEvent.ANSWER)
    assert s is UpstreamState.EARLY
    assert upstream_next(s, UpstreamEvent.END) is UpstreamState.MUST_CLOSE
    with pytest.raises(IllegalTransition):
        upstream_next(UpstreamState.MUST_CLOSE, UpstreamEvent.PARK)


def test_early_answer_then_discard_then_next_request() -> None:
    """Client side: answer before the body ends, drop the rest, then serve the next request."""
    s = ClientState.IDLE
    for event, want in (
        (ClientEvent.HEAD_START, ClientState.HEAD),
        (ClientEvent.HEAD_BODY, ClientState.BODY),
        (ClientEvent.RESPONSE, ClientState.EARLY),
        (ClientEvent.RESPONSE_END, ClientState.DISCARD),
        (ClientEvent.BODY_END, ClientState.IDLE),
        (ClientEvent.HEAD_START, ClientState.HEAD),
    ):
        s = client_next(s, event)
        assert s is want, event


def test_timers_time_only_the_peer() -> None:
    """No client timer runs while the daemon (worker, queue) owes the next move."""
    assert CLIENT_TIMER[ClientState.WAITING] is Timer.NONE
    assert CLIENT_TIMER[ClientState.SENDING] is Timer.NONE
    assert CLIENT_TIMER[ClientState.BODY] is Timer.BODY
    assert CLIENT_TIMER[ClientState.IDLE] is Timer.KEEPALIVE
    assert not CLIENT_READS[ClientState.WAITING]


# -- retry policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [Failure.CONNECT, Failure.NOT_SENT])
@pytest.mark.parametrize("replayable", [True, False])
def test_requests_no_worker_saw_are_resent(failure: Failure, replayable: bool) -> None:
    """Connect failures and writes into a closed socket are resent, any method, bounded."""
    assert retry.decide(failure, replayable=replayable, resends=0, retries=1) is Verdict.RESEND
    last = retry.MAX_RESENDS
    assert retry.decide(failure, replayable=replayable, resends=last, retries=0) is Verdict.FAIL


@pytest.mark.parametrize("failure", [Failure.UNREAD, Failure.SILENT])
def test_seen_requests_retry_once_then_killed_two(failure: Failure) -> None:
    """A replayable request is retried once; the second failure is 'killed two workers'."""
    assert retry.decide(failure, replayable=True, resends=0, retries=0) is Verdict.RETRY
    assert retry.decide(failure, replayable=True, resends=0, retries=1) is Verdict.KILLED_TWO
    assert retry.decide(failure, replayable=False, resends=0, retries=0) is Verdict.FAIL


def test_broken_answers_are_never_retried() -> None:
    """Once an answer byte arrived, the failure is final."""
    assert retry.decide(Failure.BROKEN, replayable=True, resends=0, retries=0) is Verdict.FAIL


@pytest.mark.parametrize(
    ("method", "enabled", "kept", "upgrade", "want"),
    [
        (b"GET", True, True, False, True),
        (b"PUT", True, True, False, True),
        (b"POST", True, True, False, False),
        (b"PATCH", True, True, False, False),
        (b"GET", False, True, False, False),
        (b"GET", True, False, False, False),
        (b"GET", True, True, True, False),
    ],
)
def test_replayable(method: bytes, enabled: bool, kept: bool, upgrade: bool, want: bool) -> None:
    """Only idempotent methods with their whole (kept) body, retry on, no upgrade."""
    assert retry.replayable(method, enabled=enabled, kept=kept, upgrade=upgrade) is want


def test_canary_5xx_reasked_only_before_the_client_saw_it() -> None:
    """A canary's 5xx is re-asked when replayable and unanswered; 4xx and old workers never."""
    assert retry.reask_canary(503, canary=True, replayable=True, answered=False)
    assert not retry.reask_canary(503, canary=True, replayable=True, answered=True)
    assert not retry.reask_canary(404, canary=True, replayable=True, answered=False)
    assert not retry.reask_canary(500, canary=False, replayable=True, answered=False)
    assert not retry.reask_canary(500, canary=True, replayable=False, answered=False)

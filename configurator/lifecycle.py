"""Device lifecycle on the configurator side.

Theory of operation: a device's first valid `register` is accepted at once (enrollment
`auto`), or held `pending` until the owner approves it or enters its pairing code; a pending
device can also be `rejected`, and stays so. An accepted device is `registered`.
Evaluation either yields a configuration (`configuring`: a config version was sent and no
result for it has arrived) or fails (`unplanned`: e.g. no free address; retried on the next
register/info). A `config.result` for the current version moves it to `configured` (every item
applied) or `failed` (anything else). A new config version always goes back to `configuring`.
Presence (online/offline) is tracked apart: it is not a configuration state.

All transitions are in TRANSITIONS; anything else is a bug and raises.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    NEW = "new"
    REGISTERED = "registered"
    CONFIGURING = "configuring"
    CONFIGURED = "configured"
    FAILED = "failed"
    UNPLANNED = "unplanned"
    PENDING = "pending"
    REJECTED = "rejected"


class Event(StrEnum):
    ACCEPT = "accept"
    CONFIG_SENT = "config_sent"
    PLAN_FAILED = "plan_failed"
    RESULT_OK = "result_ok"
    RESULT_FAILED = "result_failed"
    HOLD = "hold"
    APPROVE = "approve"
    REJECT = "reject"


class LifecycleError(Exception):
    """An event that is not allowed in the current state."""


PLANNABLE = (State.REGISTERED, State.CONFIGURING, State.CONFIGURED, State.FAILED, State.UNPLANNED)
"""Enrolled devices: the ones evaluation is for (a pending or rejected device gets no config)."""

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.NEW, Event.ACCEPT): State.REGISTERED,
    (State.NEW, Event.HOLD): State.PENDING,
    (State.PENDING, Event.HOLD): State.PENDING,
    (State.PENDING, Event.ACCEPT): State.REGISTERED,  # enrollment switched to auto meanwhile
    (State.PENDING, Event.APPROVE): State.REGISTERED,
    (State.PENDING, Event.REJECT): State.REJECTED,
    **{(s, Event.ACCEPT): s for s in PLANNABLE},
    **{(s, Event.CONFIG_SENT): State.CONFIGURING for s in PLANNABLE},
    **{(s, Event.PLAN_FAILED): State.UNPLANNED for s in PLANNABLE},
    (State.CONFIGURING, Event.RESULT_OK): State.CONFIGURED,
    (State.CONFIGURED, Event.RESULT_OK): State.CONFIGURED,
    (State.FAILED, Event.RESULT_OK): State.CONFIGURED,
    (State.CONFIGURING, Event.RESULT_FAILED): State.FAILED,
    (State.CONFIGURED, Event.RESULT_FAILED): State.FAILED,
    (State.FAILED, Event.RESULT_FAILED): State.FAILED,
    # A result for the last config can still arrive after a re-plan failed: it stays unplanned.
    (State.UNPLANNED, Event.RESULT_OK): State.UNPLANNED,
    (State.UNPLANNED, Event.RESULT_FAILED): State.UNPLANNED,
}


def advance(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LifecycleError(f"event {event.value} is not allowed in state {state.value}") from None

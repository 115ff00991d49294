"""The configurator's device lifecycle state machine (configurator/lifecycle.py)."""

from __future__ import annotations

import itertools

import pytest

from homenet.configurator.lifecycle import TRANSITIONS, Event, LifecycleError, State, advance


def run(*events: Event, start: State = State.NEW) -> State:
    state = start
    for event in events:
        state = advance(state, event)
    return state


PLANNABLE = [State.REGISTERED, State.CONFIGURING, State.CONFIGURED, State.FAILED, State.UNPLANNED]


def test_normal_path_is_new_registered_configuring_configured():
    state = State.NEW
    seen = [state]
    for event in (Event.ACCEPT, Event.CONFIG_SENT, Event.RESULT_OK):
        state = advance(state, event)
        seen.append(state)
    assert seen == [State.NEW, State.REGISTERED, State.CONFIGURING, State.CONFIGURED]


def test_failed_result_moves_to_failed():
    assert run(Event.ACCEPT, Event.CONFIG_SENT, Event.RESULT_FAILED) is State.FAILED


def test_failed_result_after_configured_moves_to_failed():
    assert advance(State.CONFIGURED, Event.RESULT_FAILED) is State.FAILED


def test_ok_result_after_failure_recovers_to_configured():
    assert advance(State.FAILED, Event.RESULT_OK) is State.CONFIGURED


def test_repeated_results_are_idempotent():
    assert advance(State.CONFIGURED, Event.RESULT_OK) is State.CONFIGURED
    assert advance(State.FAILED, Event.RESULT_FAILED) is State.FAILED


@pytest.mark.parametrize("state", PLANNABLE)
def test_new_config_version_always_goes_back_to_configuring(state):
    assert advance(state, Event.CONFIG_SENT) is State.CONFIGURING


@pytest.mark.parametrize("state", PLANNABLE)
def test_plan_failure_moves_to_unplanned(state):
    assert advance(state, Event.PLAN_FAILED) is State.UNPLANNED


def test_unplanned_device_is_retried_and_configured_later():
    assert run(Event.ACCEPT, Event.PLAN_FAILED, Event.ACCEPT, Event.CONFIG_SENT, Event.RESULT_OK) \
        is State.CONFIGURED


@pytest.mark.parametrize("event", [Event.RESULT_OK, Event.RESULT_FAILED])
def test_late_result_for_an_old_config_leaves_an_unplanned_device_unplanned(event):
    assert advance(State.UNPLANNED, event) is State.UNPLANNED


@pytest.mark.parametrize("state", PLANNABLE)
def test_re_registration_keeps_the_state(state):
    assert advance(state, Event.ACCEPT) is state


@pytest.mark.parametrize("event", [Event.CONFIG_SENT, Event.PLAN_FAILED, Event.RESULT_OK,
                                   Event.RESULT_FAILED])
def test_a_new_device_must_be_accepted_first(event):
    with pytest.raises(LifecycleError):
        advance(State.NEW, event)


@pytest.mark.parametrize("event", [Event.RESULT_OK, Event.RESULT_FAILED])
def test_a_result_before_any_config_is_illegal(event):
    with pytest.raises(LifecycleError):
        advance(State.REGISTERED, event)


ILLEGAL = [(s, e) for s, e in itertools.product(State, Event) if (s, e) not in TRANSITIONS]


def test_there_are_illegal_transitions_to_check():
    assert (State.NEW, Event.RESULT_OK) in ILLEGAL


@pytest.mark.parametrize("state, event", ILLEGAL)
def test_illegal_event_raises_lifecycle_error_naming_state_and_event(state, event):
    with pytest.raises(LifecycleError) as excinfo:
        advance(state, event)
    message = str(excinfo.value)
    assert state.value in message and event.value in message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_every_state_is_reachable_from_new():
    reached, frontier = {State.NEW}, [State.NEW]
    while frontier:
        state = frontier.pop()
        for event in Event:
            if (state, event) in TRANSITIONS:
                target = advance(state, event)
                if target not in reached:
                    reached.add(target)
                    frontier.append(target)
    assert reached == set(State)


def test_no_transition_leads_back_to_new():
    assert State.NEW not in TRANSITIONS.values()


def test_transition_table_only_names_known_states_and_events():
    for (state, event), target in TRANSITIONS.items():
        assert isinstance(state, State) and isinstance(event, Event) and isinstance(target, State)

"""The budget of new devices not yet confirmed (configurator/newcomers.py), pure."""

from __future__ import annotations

from homenet.configurator.newcomers import Newcomers


def test_past_the_limit_a_new_device_waits_until_one_confirms() -> None:
    budget = Newcomers(limit=2, expire=60)
    assert budget.admit("a", 0) and budget.admit("b", 1)
    assert not budget.admit("c", 2)
    assert budget.admit("a", 3), "a device that holds a place keeps it"
    budget.settled("a")
    assert budget.admit("c", 4)
    assert len(budget) == 2


def test_a_place_not_confirmed_in_time_is_given_up() -> None:
    budget = Newcomers(limit=1, expire=60)
    assert budget.admit("fake", 0)
    assert not budget.admit("real", 59)
    assert budget.admit("real", 61)

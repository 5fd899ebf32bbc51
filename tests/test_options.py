"""Declared settings: ranges and lists of choices say what is accepted."""
import dataclasses

import pytest

from nettailor_tf.settings.options import OneOf, Range, check_value, option


@pytest.mark.parametrize("check,value,problem", [
    (Range(0, 10, open_low=True), 0, "must be in (0, 10]"),
    (Range(0, 10, open_low=True), 10, None),
    (Range(0, 1, open_high=True), 1, "must be in [0, 1)"),
    (Range(1), 0, "must be >= 1"),
    (Range(0, open_low=True), 0, "must be > 0"),
    (Range(high=5), 6, "must be <= 5"),
    (Range(1), None, None),
    (OneOf(("a", "b"), "letter"), ["a", "c"], "unknown letter 'c'; accepted: a, b"),
    (OneOf(("a", "b"), "letter"), ["b", "a"], None),
])
def test_checks_name_what_is_accepted(check, value, problem):
    assert check(value) == problem


def test_choices_and_checks_apply_to_a_declared_field():
    @dataclasses.dataclass
    class Settings:
        mode: str = option("x", "A mode.", choices=("x", "y"))
        rate: float = option(0.1, "A rate.", check=Range(0, 1))

    mode, rate = dataclasses.fields(Settings)
    assert check_value(mode, "z") == "is not one of x, y"
    assert check_value(mode, "y") is None
    assert check_value(rate, 2.0) == "must be in [0, 1]"
    assert mode.metadata["help"] == "A mode." and Settings().rate == 0.1

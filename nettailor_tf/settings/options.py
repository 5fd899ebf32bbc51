"""How a setting is declared: its default, help text and accepted values, once.

`nettailor_tf.settings.config` declares every setting of a run with `option(...)`;
the command-line flags, their absl validators and `Config.validate` are all
generated from those declarations, so a default or a range is written in one
place.  Pure Python: the command line answers `--help` without TensorFlow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

# A check takes a value and returns what is wrong with it, or None.
Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class Range:
    """A number in [low, high]; `open_low` / `open_high` exclude that end."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __call__(self, value) -> str | None:
        if value is None:
            return None
        too_low = self.low is not None and (value <= self.low if self.open_low
                                            else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.open_high
                                              else value > self.high)
        if not (too_low or too_high):
            return None
        if self.high is None:
            return f"must be {'>' if self.open_low else '>='} {_number(self.low)}"
        if self.low is None:
            return f"must be {'<' if self.open_high else '<='} {_number(self.high)}"
        return (f"must be in {'(' if self.open_low else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.open_high else ']'}")


def _number(value: float) -> str:
    """2147483647 as it is, 0.5 as 0.5."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclasses.dataclass(frozen=True)
class OneOf:
    """Every item of a list is one of `choices`; `what` names an item."""
    choices: tuple[str, ...]
    what: str

    def __call__(self, values) -> str | None:
        for value in values:
            if value not in self.choices:
                return f"unknown {self.what} {value!r}; accepted: {', '.join(self.choices)}"
        return None


def option(default=dataclasses.MISSING, help: str = "", *, check: Check | None = None,
           choices: tuple[str, ...] | None = None, flag: str | None = "auto",
           parse: Callable[[str], Any] | None = None, shared: bool = False,
           stages: "tuple[str, ...] | Callable[[Any], tuple[str, ...]] | None" = None) -> Any:
    """A dataclass field that is also a command-line flag.

    `check`: extra condition on the value (a `Range`, a `OneOf`, or any
    function returning a problem or None).  `choices`: the accepted values
    of a string (an absl enum flag).  `flag`: None for a setting with no flag.
    `parse`: how the flag's text becomes the value (the flag is then a
    string flag).  `shared`: in a nested settings group (a stage's schedule),
    one flag without the group's prefix sets it in every group.
    `stages`: the stages whose results the setting changes (or a function of
    the whole configuration that says so, for a setting that only counts
    under another); () declares that it changes no result (where files go,
    how often to log).  A stage's record holds the values of the settings
    that name it, so a changed one redoes the stage (`stage_settings`).
    """
    metadata = {"help": help, "check": check, "choices": choices, "flag": flag,
                "parse": parse, "shared": shared, "stages": stages}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_value(field: dataclasses.Field, value) -> str | None:
    """What is wrong with `value` for `field`, or None."""
    choices = field.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        return f"is not one of {', '.join(choices)}"
    check = field.metadata.get("check")
    return check(value) if check is not None else None


def declared_stages(field: dataclasses.Field, config) -> tuple[str, ...]:
    """The stages whose results `field` changes, under `config`."""
    stages = field.metadata.get("stages")
    if stages is None:
        raise ValueError(f"setting {field.name!r} does not declare the stages it changes")
    return tuple(stages(config)) if callable(stages) else tuple(stages)


# --- values of particular settings -------------------------------------------

def parse_max_skip(text: str) -> int | None:
    """'dense' (None) or a positive number of earlier nodes."""
    if text == "dense":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a positive integer or 'dense'") from None


def max_skip_check(value) -> str | None:
    return None if value is None or value >= 1 else "must be >= 1 or 'dense'"


# --prune_search_steps: each candidate runs the whole fine-tuning stage.
WHOLE_FINETUNE = "finetune"


def parse_search_steps(text: str) -> int | str:
    """'finetune' (the fine-tuning stage's own length, per task) or a number of steps."""
    if text == WHOLE_FINETUNE:
        return WHOLE_FINETUNE
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be an integer >= 0 or '{WHOLE_FINETUNE}'") from None


def search_steps_check(value) -> str | None:
    return (None if value == WHOLE_FINETUNE or value >= 0
            else f"must be >= 0 or '{WHOLE_FINETUNE}'")

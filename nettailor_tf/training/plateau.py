"""The plateau rule: when a stage lowers its learning rate and when it stops.

Keras' `ReduceLROnPlateau` and `EarlyStopping` on one monitored value (the
validation loss), with their parameters and their arithmetic:

* an evaluation improves when its loss is below the lowest so far minus
  `min_delta` or, with the monitor 'loss_or_accuracy', when its accuracy is
  above the highest so far;
* after `patience` evaluations in a row without an improvement the rate is
  multiplied by `factor` (not below `min_lr`); the count then starts again,
  after `cooldown` evaluations in which it is held at 0;
* after `stop_patience` evaluations without an improvement (counted since
  the best, through any lowering of the rate) the stage stops.

With stop_patience > patience (`Schedule.plateau_problem`) a lower rate is
always tried before the stage stops.

Pure Python: the training loop keeps the state in a checkpointed variable
(`to_vector` / `from_vector`) so that a resumed stage decides as if it had
never stopped.
"""
from __future__ import annotations

import dataclasses
import math

from nettailor_tf.settings.schedules import Schedule

# What the rule decides after an evaluation.
KEEP, IMPROVED, REDUCE, STOP = "keep", "improved", "reduce", "stop"


@dataclasses.dataclass
class PlateauState:
    """Where the rule stands after the evaluations so far."""
    best: float = math.inf     # the lowest monitored loss
    best_step: int = 0         # the step of the last improvement
    wait: int = 0              # evaluations without improvement towards lowering the rate
    stop_wait: int = 0         # ... towards stopping (not reset by a lowering)
    cooldown: int = 0          # evaluations left in which `wait` stays 0
    reductions: int = 0        # times the rate was lowered
    evaluations: int = 0
    stopped: bool = False      # the rule stopped the stage
    last: float = math.nan     # the last monitored loss
    best_accuracy: float = -1.0  # the highest accuracy

    _FIELDS = ("best", "best_step", "wait", "stop_wait", "cooldown", "reductions",
               "evaluations", "stopped", "last", "best_accuracy")

    def to_vector(self) -> list[float]:
        return [float(getattr(self, name)) for name in self._FIELDS]

    @classmethod
    def from_vector(cls, values) -> "PlateauState":
        values = [float(v) for v in values]
        state = cls()
        for name, value in zip(cls._FIELDS, values):
            default = getattr(state, name)
            setattr(state, name, type(default)(value) if not isinstance(default, float)
                    else value)
        return state


def decide(schedule: Schedule, state: PlateauState, value: float, step: int,
           learning_rate: float, accuracy: float = math.nan) -> tuple[str, float]:
    """Takes one evaluation (loss `value` and `accuracy` at `step`, training
    at `learning_rate`), updates `state` in place; returns (decision, the
    rate to train on).

    A non-finite loss never improves (a diverging loss is the checkpoints'
    business, `checkpoints.LossHealth`)."""
    state.evaluations += 1
    state.last = value
    if state.cooldown > 0:
        # Keras: an evaluation in the cooldown counts it down and keeps the
        # wait at 0, improved or not; the last one already counts again.
        state.cooldown -= 1
        state.wait = 0
    lower = math.isfinite(value) and value < state.best - schedule.plateau_min_delta
    higher = (schedule.plateau_monitor == "loss_or_accuracy"
              and accuracy > state.best_accuracy)
    if lower:  # as Keras: the best moves only by an improvement of min_delta
        state.best = value
    if higher:
        state.best_accuracy = accuracy
    if lower or higher:
        state.best_step = step
        state.wait = state.stop_wait = 0
        return IMPROVED, learning_rate
    state.stop_wait += 1
    if state.stop_wait >= schedule.stop_patience:
        state.stopped = True
        return STOP, learning_rate
    if state.cooldown > 0:
        return KEEP, learning_rate
    state.wait += 1
    if state.wait >= schedule.plateau_patience:
        state.wait = 0
        lowered = max(learning_rate * schedule.plateau_factor, schedule.plateau_min_lr)
        if lowered < learning_rate:
            state.reductions += 1
            state.cooldown = schedule.plateau_cooldown
            return REDUCE, lowered
    return KEEP, learning_rate

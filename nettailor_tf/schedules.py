"""How long and how fast each training stage runs, resolved against a task's size.

Pure Python (no TensorFlow): the command line reads its defaults from here.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long and how fast one stage trains.

    The learning rate drops tenfold at every `decay_every` fraction of the
    stage (the paper's 40%: at 8 and 16 of 20 epochs), or, when
    `decay_epochs` is set, every that many epochs (the published flagfiles'
    absolute form).  A stage whose epochs give fewer than `min_steps`
    optimiser steps (a small data set) is lengthened to whole epochs that
    reach them: a schedule counted in epochs alone leaves a 1,400-image task
    with a fifth of the updates of a 7,000-image one.
    """
    epochs: int
    batch_size: int          # global batch, over all replicas
    learning_rate: float
    decay_epochs: int | None = None  # None: decay at fractions of the stage
    weight_decay: float = 5e-4
    momentum: float = 0.9
    decay_every: float = 0.4
    min_steps: int = 0

    def plan(self, steps_per_epoch: int) -> "StagePlan":
        """The stage's length and learning-rate boundaries for `steps_per_epoch`."""
        epochs = self.epochs
        if epochs * steps_per_epoch < self.min_steps:
            epochs = -(-self.min_steps // steps_per_epoch)
        total = epochs * steps_per_epoch
        if self.decay_epochs:
            every = self.decay_epochs * steps_per_epoch
        else:
            every = max(1, int(round(self.decay_every * total)))
        boundaries = list(range(every, total, every))
        return StagePlan(epochs, steps_per_epoch, total, boundaries)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A schedule resolved against one task's data."""
    epochs: int
    steps_per_epoch: int
    total_steps: int
    decay_steps: list          # steps at which the rate drops tenfold

    def describe(self, schedule: Schedule) -> str:
        """One log line: what was derived and why."""
        text = f"{self.epochs} epochs of {self.steps_per_epoch} steps = {self.total_steps} steps"
        if self.epochs != schedule.epochs:
            text += (f" ({schedule.epochs} requested epochs give "
                     f"{schedule.epochs * self.steps_per_epoch} steps, under the minimum of "
                     f"{schedule.min_steps})")
        text += f", lr {schedule.learning_rate:g}"
        if self.decay_steps:
            text += " x0.1 at step " + ", ".join(str(s) for s in self.decay_steps)
        else:
            text += " without decay"
        return text


# The defaults of every stage, the one place they are written.  Minimum
# steps: the quickstart's 1,293-image digits gives 40 steps an epoch, and its
# student needed about 500 steps to converge (at 200 it read 45-69%
# depending on the seed); the teacher and the fine-tune about 200.
DEFAULT_SCHEDULES = {
    "teacher": Schedule(epochs=2, batch_size=32, learning_rate=0.01, min_steps=200),
    "student": Schedule(epochs=3, batch_size=32, learning_rate=0.01, min_steps=500),
    "finetune": Schedule(epochs=2, batch_size=32, learning_rate=0.01, min_steps=200),
}

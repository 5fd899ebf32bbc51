"""How long and how fast each training stage runs, resolved against a task's size.

Pure Python (no TensorFlow): the command line reads its defaults from here.
"""
from __future__ import annotations

import dataclasses

from nettailor_tf.settings.options import Range, option


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
    # The flag of each field is --<stage>_<name> (its help names the stage
    # where it says {what}); a `shared` field has one flag for every stage.
    epochs: int = option(help="Epochs of {what}.", check=Range(1))
    batch_size: int = option(help="Global batch size of {what}.", check=Range(1))
    learning_rate: float = option(help="Learning rate of {what}.",
                                  check=Range(0, 10, open_low=True), flag="lr")
    decay_epochs: int | None = option(
        None, "If set: learning rate x0.1 every this many epochs of {what} instead of "
        "--{stage}_decay_every.", check=Range(1))
    weight_decay: float = option(5e-4, "Coupled (PyTorch-style) weight decay.",
                                 check=Range(0, 1, open_high=True), shared=True)
    momentum: float = option(0.9, flag=None)
    decay_every: float = option(0.4, "Learning rate x0.1 at every this fraction of {what} "
                                "(the paper: 0.4; 1: no decay).",
                                check=Range(0, 1, open_low=True))
    min_steps: int = option(0, "Fewest optimiser steps of {what}: a small data set gets more "
                            "epochs (whole epochs, derived and logged). With "
                            "--{stage}_plateau, of its cap.", check=Range(0))
    # The plateau rule (`nettailor_tf.training.plateau`): Keras' ReduceLROnPlateau and
    # EarlyStopping on the validation loss, with their parameter names.
    plateau: bool = option(
        False, "Train {what} until its validation loss stops improving instead of for a "
        "fixed length: the rate is multiplied by --{stage}_plateau_factor after "
        "--{stage}_plateau_patience evaluations without an improvement, and the stage stops "
        "after --{stage}_stop_patience; --{stage}_epochs and --{stage}_min_steps are then its "
        "cap (reaching it still improving is reported as a finding), and "
        "--{stage}_decay_every is not used.")
    eval_steps: int = option(40, "With --{stage}_plateau: steps between the validation "
                             "evaluations of {what}, whatever the epoch's length.",
                             check=Range(1))
    plateau_monitor: str = option(
        "loss_or_accuracy", "With --{stage}_plateau: what counts as an improvement of {what}: "
        "'loss', a validation loss --{stage}_plateau_min_delta below its best (Keras' "
        "val_loss), or 'loss_or_accuracy', that or a validation accuracy above its best (a "
        "network can gain accuracy while its loss rises, growing confident where it is "
        "wrong).", choices=("loss", "loss_or_accuracy"))
    plateau_patience: int = option(2, "With --{stage}_plateau: evaluations without an "
                                   "improvement of the validation loss before the rate of "
                                   "{what} is lowered (ReduceLROnPlateau's patience).",
                                   check=Range(1))
    plateau_factor: float = option(0.1, "With --{stage}_plateau: what the rate of {what} is "
                                   "multiplied by on a plateau.",
                                   check=Range(0, 1, open_low=True, open_high=True))
    plateau_min_delta: float = option(
        0.005, "With --{stage}_plateau: the least drop of the validation loss (mean "
        "cross-entropy, nats) that counts as an improvement.", check=Range(0))
    plateau_cooldown: int = option(0, "With --{stage}_plateau: evaluations after a lowered "
                                   "rate before the patience counts again.", check=Range(0))
    plateau_min_lr: float = option(0.0, "With --{stage}_plateau: the rate of {what} is never "
                                   "lowered below this.", check=Range(0))
    stop_patience: int = option(4, "With --{stage}_plateau: evaluations without an "
                                "improvement after which {what} stops (EarlyStopping's "
                                "patience; more than --{stage}_plateau_patience, so that a "
                                "lower rate is tried first).", check=Range(1))
    restore_best: bool = option(False, "With --{stage}_plateau: end {what} with the weights "
                                "of its last improvement (EarlyStopping's "
                                "restore_best_weights) rather than its last ones.")

    def plateau_problem(self) -> str | None:
        """What is inconsistent between the plateau settings, or None."""
        if self.plateau and self.stop_patience <= self.plateau_patience:
            return (f"must be more than the plateau patience ({self.plateau_patience}): the "
                    f"stage would stop before trying a lower rate")
        return None

    def plan(self, steps_per_epoch: int) -> "StagePlan":
        """The stage's length and learning-rate boundaries for `steps_per_epoch`."""
        epochs = self.epochs
        if epochs * steps_per_epoch < self.min_steps:
            epochs = -(-self.min_steps // steps_per_epoch)
        total = epochs * steps_per_epoch
        if self.plateau:  # the plateau rule lowers the rate, not the step count
            return StagePlan(epochs, steps_per_epoch, total, [])
        if self.decay_epochs:
            every = self.decay_epochs * steps_per_epoch
        else:
            every = max(1, int(round(self.decay_every * total)))
        boundaries = list(range(every, total, every))
        return StagePlan(epochs, steps_per_epoch, total, boundaries)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A schedule resolved against one task's data (with the plateau rule:
    `total_steps` is the cap)."""
    epochs: int
    steps_per_epoch: int
    total_steps: int
    decay_steps: list          # steps at which the rate drops tenfold

    def eval_interval(self, schedule: Schedule) -> int:
        """Steps between the plateau rule's evaluations: counted in steps, not
        epochs, so that its patience is the same amount of training on a
        small task as on a large one (a 450-image folder's epoch is 14 steps,
        mnist5k's 112)."""
        return schedule.eval_steps

    def describe(self, schedule: Schedule) -> str:
        """One log line: what was derived and why."""
        text = f"{self.epochs} epochs of {self.steps_per_epoch} steps = {self.total_steps} steps"
        if self.epochs != schedule.epochs:
            text += (f" ({schedule.epochs} requested epochs give "
                     f"{schedule.epochs * self.steps_per_epoch} steps, under the minimum of "
                     f"{schedule.min_steps})")
        text += f", lr {schedule.learning_rate:g}"
        if schedule.plateau:
            text += (f" x{schedule.plateau_factor:g} after {schedule.plateau_patience} "
                     f"evaluations (every {self.eval_interval(schedule)} steps) without a "
                     f"validation loss {schedule.plateau_min_delta:g} below its best; stops "
                     f"after {schedule.stop_patience}, or at the cap of {self.total_steps} steps")
        elif self.decay_steps:
            text += " x0.1 at step " + ", ".join(str(s) for s in self.decay_steps)
        else:
            text += " without decay"
        return text

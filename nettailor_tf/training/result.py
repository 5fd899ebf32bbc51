"""What a training stage returns: `TrainResult` (how far it got, how it
ended, what it reached)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainResult:
    steps: int
    test_accuracy: float        # nan until the stage is complete
    train_images_per_second: float
    resumed_from_step: int
    # nan for a task without a validation split, and for a stage stopped
    # early anywhere but at an epoch's end (evaluated there).
    val_accuracy: float = float("nan")
    total_steps: int = 0       # the schedule's length; with the plateau rule its cap
    epochs: int = 0
    # Why the stage ended: 'schedule' (its fixed length), 'plateau' (the
    # plateau rule), 'cap' (the rule's cap, still improving); '' while it is
    # not done.
    stopped: str = ""
    val_loss: float = float("nan")     # the monitored loss of the weights kept (plateau rule)
    best_step: int = 0                 # the step of the rule's last improvement
    reductions: int = 0                # times the rule lowered the rate
    learning_rate: float = float("nan")  # the rate at the end

    @property
    def complete(self) -> bool:
        return bool(self.stopped) or self.steps >= self.total_steps

    @property
    def converged(self) -> bool | None:
        """Whether the plateau rule judged the stage converged (None: a fixed
        schedule, which cannot tell)."""
        return None if self.stopped in ("", "schedule") else self.stopped == "plateau"

"""What a training stage says about its steps: a progress bar or a few log lines."""
from __future__ import annotations

import sys
import time

import keras
from absl import logging


# Log lines a stage writes about its steps when stderr is not a terminal
# (TensorBoard gets every --log_every steps regardless).
STEP_LINES_PER_STAGE = 2


class ProgressReporter:
    """A Keras progress bar on a terminal; otherwise a few log lines per
    stage with the time it still needs at the rate measured so far.

    Called every step with the step's figures, or with None where `shows`
    says the step prints none: the loop reads its figures from the device
    only for the steps that show them."""

    def __init__(self, total_steps: int, log_every: int, first_step: int = 0):
        self.total_steps, self.log_every, self.first_step = total_steps, log_every, first_step
        self.started = time.monotonic()
        self.bar = (keras.utils.Progbar(total_steps,
                                        stateful_metrics=["loss", "acc", "img/s", "lr"])
                    if sys.stderr.isatty() else None)
        self.every = max(log_every, -(-(total_steps - first_step) // STEP_LINES_PER_STAGE))

    def shows(self, step: int) -> bool:
        """Whether `step` prints figures (a bar shows them every log_every steps)."""
        if self.bar is not None:
            return step % self.log_every == 0 or step == self.total_steps
        return (step - self.first_step) % self.every == 0 or step == self.total_steps

    def __call__(self, step: int, values: dict | None) -> None:
        if self.bar is not None:
            self.bar.update(step, list(values.items()) if values else None)
        elif values is not None and self.shows(step):
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            done = step - self.first_step
            left = (time.monotonic() - self.started) / max(done, 1) * (self.total_steps - step)
            logging.info("step %d/%d %s eta %s", step, self.total_steps, text,
                         format_duration(left))


def format_duration(seconds: float) -> str:
    """'42 s', '3.4 min' or '1.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

"""What a training stage says about its steps: a progress bar or a few log lines."""
from __future__ import annotations

import sys
import time

import keras
from absl import logging


# Log lines a stage writes about its steps when stderr is not a terminal
# (TensorBoard gets every --log_every steps regardless).
STEP_LINES_PER_STAGE = 2


def progress_reporter(total_steps, log_every, first_step=0):
    """A Keras progress bar on a terminal; otherwise a few log lines per
    stage with the time it still needs at the rate measured so far."""
    if sys.stderr.isatty():
        bar = keras.utils.Progbar(total_steps, stateful_metrics=["loss", "acc", "img/s", "lr"])
        return lambda step, values: bar.update(step, list(values.items()))
    started = time.monotonic()
    every = max(log_every, -(-(total_steps - first_step) // STEP_LINES_PER_STAGE))

    def log(step, values):
        if (step - first_step) % every == 0 or step == total_steps:
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            done = step - first_step
            left = (time.monotonic() - started) / max(done, 1) * (total_steps - step)
            logging.info("step %d/%d %s eta %s", step, total_steps, text, format_duration(left))
    return log


def format_duration(seconds: float) -> str:
    """'42 s', '3.4 min' or '1.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

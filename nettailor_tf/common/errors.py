"""The one error type a user can cause.

Every condition a user can cause and fix (a bad flag, a missing or broken
file, data that does not fit, a workdir made with other settings) raises a
subclass of `NetTailorError`.  The command line prints it as one line naming
what it is about and exits with code 2; any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations


class NetTailorError(Exception):
    """A user-fixable problem.  `flag` or `path` name what it is about, when
    one flag or file is (the message names it too)."""

    def __init__(self, message: str, *, flag: str | None = None, path: str | None = None):
        super().__init__(message)
        self.flag = flag
        self.path = path


class TrainingError(NetTailorError, RuntimeError):
    """A training run that cannot go on (a diverged loss, no readable
    checkpoint); the message says what the next run will do."""


# The predict command's name, as its error and warning lines start.
PREDICT_COMMAND = "nettailor_tf.predict"


class PredictError(NetTailorError):
    """A model, image or task that the predict command cannot use."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type where it has none):
    what a one-line error quotes of a library's own message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

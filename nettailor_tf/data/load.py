"""`load_task`: reads a task spec (see `TASK_SPEC_HELP`) and hands it to the
loader of its source.

It sits above every loader (in_memory, tfds_tasks, folders), which all build on
tasks.py, so it is a module of its own rather than part of tasks.py.
"""

from __future__ import annotations

from nettailor_tf.data.folders import load_folder
from nettailor_tf.data.in_memory import load_digits, load_mnist5k
from nettailor_tf.data.tasks import DataError, TASK_SPEC_HELP, TaskData, task_error
from nettailor_tf.data.tfds_tasks import load_tfds


def load_task(spec: str, data_dir: str | None = None, download: bool = False,
              holdout_fraction: float = 0.2, split_seed: int = 0) -> TaskData:
    """Loads the task named by `spec` (see `TASK_SPEC_HELP`).

    Args:
      spec: task spec string.
      data_dir: TFDS data directory for ``tfds:`` specs (None: TFDS default /
        ``TFDS_DATA_DIR``); ignored otherwise.
      download: allow TFDS to download and prepare a missing dataset.
      holdout_fraction: test fraction held out per class for a ``folder:`` task
        without train/test sub-folders.
      split_seed: seed of the stratified splits (mnist5k, digits, folders).

    Raises:
      DataError: with a one-line message naming the spec and the problem.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty task spec; {TASK_SPEC_HELP}")
    if spec == "mnist5k":
        return load_mnist5k(spec, split_seed)
    if spec == "digits":
        return load_digits(spec, split_seed)
    if spec.startswith("tfds:"):
        return load_tfds(spec, spec[len("tfds:"):], data_dir, download)
    if spec.startswith("folder:"):
        return load_folder(spec, spec[len("folder:"):], holdout_fraction, split_seed)
    raise task_error(spec, f"unknown task spec; {TASK_SPEC_HELP}")

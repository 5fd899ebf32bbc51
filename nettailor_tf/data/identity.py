"""What a task's data is, cheaply: enough to tell another data set under the
same task name from the one a workdir was trained on."""
from __future__ import annotations

import hashlib

import numpy as np

from nettailor_tf.data.tasks import TaskData

# Examples of each split that go into the fingerprint: reading them costs a
# second even for a large tfds set, and another data set (other images, other
# labels, another order) almost surely differs in its first images.
FINGERPRINT_EXAMPLES = 64


def identity(task: TaskData, examples: int = FINGERPRINT_EXAMPLES) -> dict:
    """The task's spec, class count, split sizes and a content fingerprint
    (the split sizes and the first `examples` images and labels of every
    split, in the order the splits give them)."""
    digest = hashlib.sha256()
    splits = {"train": task.train, "test": task.test}
    if task.val is not None:
        splits["val"] = task.val
    for name, split in splits.items():
        digest.update(name.encode())
        for image, label in split.take(examples).as_numpy_iterator():
            image = np.ascontiguousarray(image)
            digest.update(str(image.shape).encode())
            digest.update(image.tobytes())
            digest.update(int(label).to_bytes(8, "little", signed=True))
    return {"spec": task.spec, "num_classes": task.num_classes, "num_train": task.num_train,
            "num_val": task.num_val, "num_test": task.num_test,
            "fingerprint": digest.hexdigest()}

"""The frozen teacher's mimic targets, computed once per stage instead of every step.

The student, prune-search and fine-tune stages compare each block of the
student with the fine-tuned teacher's, which never changes.  When a task's
training images are not augmented (the same pixels every epoch), the
teacher's logits and block outputs for each training image are fixed too:
one inference pass over the training split gives them all, and every
training step looks its batch up by position instead of running the teacher
forward again.  On CPU that forward pass is about a sixth of a student step.

Tasks with random crops or flips see other pixels each epoch, and tasks
whose targets would not fit `max_bytes` are left to the teacher itself.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging

from nettailor_tf import data as data_lib

# The quickstart's mnist5k needs about 0.7 GB (3,600 images x 46k values at
# 64 px); a 224-px task would need 12x that per image.
DEFAULT_MAX_BYTES = 2 << 30


class TeacherTargets:
    """Logits and block outputs of a frozen teacher for every training image,
    held in non-trainable variables and looked up by position."""

    def __init__(self, logits: tf.Variable, endpoints: list[tf.Variable]):
        self.logits = logits
        self.endpoints = endpoints

    def lookup(self, indices) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """(logits, block outputs) of the images at `indices` of the training split."""
        return (tf.gather(self.logits, indices),
                [tf.gather(e, indices) for e in self.endpoints])

    @property
    def bytes(self) -> int:
        return sum(int(np.prod(v.shape)) * 4 for v in [self.logits, *self.endpoints])


def target_bytes(teacher, task: data_lib.TaskData, image_size: int) -> int:
    """Bytes the targets of `task` would take (float32)."""
    logits, endpoints = teacher(tf.zeros((1, image_size, image_size, 3)), training=False)
    per_image = sum(int(np.prod(t.shape[1:])) for t in [logits, *endpoints])
    return per_image * 4 * task.num_train


def build(teacher, task: data_lib.TaskData, image_size: int, batch_size: int, strategy,
          max_bytes: int = DEFAULT_MAX_BYTES) -> TeacherTargets | None:
    """The teacher's targets for every training image of `task`, in the order of
    its training split; None when the task augments its images or the
    targets would take more than `max_bytes`."""
    if task.augment != "none":
        return None
    size = target_bytes(teacher, task, image_size)
    if size > max_bytes:
        logging.info("%s: the teacher's targets would take %.1f GB (over %.1f GB); the teacher "
                     "runs at every step instead", task.name, size / 1e9, max_bytes / 1e9)
        return None
    forward = tf.function(lambda images: teacher(images, training=False), reduce_retracing=True)
    logits, endpoints = [], None
    for images, _ in data_lib.eval_pipeline(task, image_size, batch_size, split="train"):
        batch_logits, batch_endpoints = forward(images)
        logits.append(np.asarray(batch_logits, np.float32))
        if endpoints is None:
            endpoints = [[] for _ in batch_endpoints]
        for store, value in zip(endpoints, batch_endpoints):
            store.append(np.asarray(value, np.float32))
    with strategy.scope():
        targets = TeacherTargets(
            tf.Variable(np.concatenate(logits), trainable=False, name="teacher_logits"),
            [tf.Variable(np.concatenate(e), trainable=False, name=f"teacher_node{l + 1}")
             for l, e in enumerate(endpoints)])
    if targets.logits.shape[0] != task.num_train:
        raise ValueError(f"{task.name}: {targets.logits.shape[0]} teacher targets for "
                         f"{task.num_train} training images")
    logging.debug("%s: the teacher's targets for %d training images computed once (%.0f MB)",
                 task.name, task.num_train, targets.bytes / 1e6)
    return targets

"""Stratified, seeded splits: the test hold-out of a task without one, and
`with_validation_split`, which moves part of the training data to a
validation split."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from nettailor_tf.data.tasks import (TaskData, UndecodedSplit, build_source, source_of,
                                     task_error, undecoded_split, with_source)


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded hold-out; returns sorted (train_idx, test_idx).

    Each class contributes round(n_c * fraction) test items, clamped so that a
    class with >= 2 items keeps at least one on each side (tiny folders would
    otherwise lose a class from one split).
    """
    # Not sklearn.model_selection.train_test_split(..., stratify=labels): it
    # cannot keep these promises.  It holds out ceil(fraction * N) items in all
    # and shares them out by largest remainder, so per-class counts are not
    # round(n_c * fraction) (digits: 360 test images, not 359), and a small
    # class next to a big one can get no test item at all (2 and 100 items at
    # 0.2: 0 and 21); and it raises on any class with a single item, which a
    # folder task may have (that item simply stays in training here).
    rng = np.random.default_rng(seed)
    test_parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        n_test = int(np.floor(n * test_fraction + 0.5))
        n_test = min(max(n_test, 1 if n >= 2 else 0), n - 1)
        test_parts.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    train_mask = np.ones(len(labels), bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def selection_split(task: TaskData, selection: str) -> str:
    """The split choices are made on, as the pipelines name it: 'val' under
    --selection_split=validation, 'test' under the paper's protocol and for
    a task without a validation split (one held out of nothing)."""
    return "val" if selection == "validation" and task.num_val else "test"


def with_validation_split(task: TaskData, fraction: float, seed: int) -> TaskData:
    """`task` with a stratified, seeded `fraction` of its training data moved
    to a validation split (the rest stays the training split).

    Random-access items (mnist5k, digits, folders) are split by index; a
    sequential tfds split is read once for its labels (images stay encoded)
    and filtered by position.  Returns `task` unchanged for `fraction` 0.
    """
    if fraction == 0:
        return task
    if not 0 < fraction < 1:
        raise task_error(task.spec, f"validation fraction must be in [0, 1), got {fraction}")
    if task.num_val:
        raise task_error(task.spec, "the task already has a validation split")
    split, decode, same_size = undecoded_split(task, "train")
    if split is not None and split.items is not None:
        labels = split.labels
    else:
        stream = split.stream if split is not None else task.train
        labels = np.fromiter(stream.map(lambda item, label: label).as_numpy_iterator(),
                             np.int64, count=-1)
    train_idx, val_idx = stratified_split(labels, fraction, seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise task_error(task.spec, f"{len(labels)} training images are too few to hold out a "
                                    f"validation split of {fraction:g}; add images or run with "
                                    f"--selection_split=test")
    if split is not None and split.items is not None:
        train = UndecodedSplit(items=split.items[train_idx], labels=split.labels[train_idx])
        val = UndecodedSplit(items=split.items[val_idx], labels=split.labels[val_idx])
    else:
        train = UndecodedSplit(stream=_positions(stream, train_idx, len(labels)))
        val = UndecodedSplit(stream=_positions(stream, val_idx, len(labels)))
        if split is None:  # hand-built task: its elements are already decoded
            decode, same_size = None, False
    src = source_of(task)
    test = src.test if src is not None else UndecodedSplit(stream=task.test)
    source = build_source(train, test, decode, same_size, val=val)
    return with_source(task, dataclasses.replace(source, public_test=task.test),
                       train=source.public_train, val=source.public_val, test=task.test,
                       num_train=len(train_idx), num_val=len(val_idx))


def _positions(stream: tf.data.Dataset, keep: np.ndarray, size: int) -> tf.data.Dataset:
    """The elements of `stream` at the positions `keep`, in stream order."""
    mask = np.zeros(size, bool)
    mask[keep] = True
    mask = tf.constant(mask)
    return (stream.enumerate().filter(lambda i, pair: tf.gather(mask, i))
            .map(lambda i, pair: pair))

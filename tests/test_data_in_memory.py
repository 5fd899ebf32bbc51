"""Tests for nettailor_tf/data/in_memory.py: the in-memory tasks mnist5k and digits."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from data_helpers import assert_same_batches, check_batch, numpy_batches

from nettailor_tf import data
from nettailor_tf.data import TaskData


@pytest.fixture(scope="module")
def mnist() -> TaskData:
    return data.load_task("mnist5k")


def test_mnist5k_split_and_batches(mnist):
    assert (mnist.name, mnist.num_classes, mnist.augment) == ("mnist5k", 10, "none")
    assert mnist.class_names == ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
    assert (mnist.num_train, mnist.num_test) == (4000, 1000)
    test_labels = np.array([int(y) for _, y in mnist.test])
    assert np.bincount(test_labels, minlength=10).tolist() == [100] * 10
    train_labels = np.array([int(y) for _, y in mnist.train])
    assert np.bincount(train_labels, minlength=10).tolist() == [400] * 10

    image, label = next(iter(mnist.train))
    assert image.dtype == tf.uint8 and image.shape == (28, 28, 3) and label.dtype == tf.int32

    x, y = next(iter(data.train_pipeline(mnist, 32, 64, epoch=0, seed=0)))
    check_batch(x.numpy(), y.numpy(), 32, 10)
    assert x.shape[0] == 64 and x.numpy().max() > 200  # real ink, not a 0..1 scale
    # Gray -> RGB repeats the channel.
    np.testing.assert_array_equal(x.numpy()[..., 0], x.numpy()[..., 2])
    x, y = next(iter(data.eval_pipeline(mnist, 32, 64)))
    check_batch(x.numpy(), y.numpy(), 32, 10)


def test_mnist5k_split_is_reproducible(mnist):
    again = data.load_task("mnist5k")
    a = next(iter(mnist.test.batch(1000)))
    b = next(iter(again.test.batch(1000)))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    other = next(iter(data.load_task("mnist5k", split_seed=1).test.batch(1000)))
    assert not np.array_equal(a[0].numpy(), other[0].numpy())


def test_digits_split_and_batches():
    from sklearn.datasets import load_digits

    task = data.load_task("digits")
    counts = np.bincount(load_digits().target)
    # Per-class round(0.2 * n) held out.
    expected_test = np.floor(counts * 0.2 + 0.5).astype(int)
    assert (task.num_train, task.num_test) == (1438, 359) == (
        counts.sum() - expected_test.sum(), expected_test.sum())
    test_labels = np.array([int(y) for _, y in task.test])
    assert np.bincount(test_labels, minlength=10).tolist() == expected_test.tolist()
    assert (task.num_classes, task.augment) == (10, "none")
    assert task.class_names == tuple("0123456789")

    batches = numpy_batches(data.eval_pipeline(task, 32, 100))
    assert sum(len(y) for _, y in batches) == 359 and len(batches[-1][1]) == 59
    for x, y in batches:
        check_batch(x, y, 32, 10)
    assert max(x.max() for x, _ in batches) > 250  # 0..16 scaled to 0..255

    again = data.load_task("digits")
    assert_same_batches(batches, numpy_batches(data.eval_pipeline(again, 32, 100)))

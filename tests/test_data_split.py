"""Tests for nettailor_tf/data/split.py: the stratified seeded splits and
`with_validation_split`."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import all_labels, assert_same_batches, hand_made_task, numpy_batches

from nettailor_tf import data
from nettailor_tf.data import DataError, TaskData
from nettailor_tf.data.split import stratified_split


@pytest.fixture(scope="module")
def mnist() -> TaskData:
    return data.load_task("mnist5k")


def test_validation_split_is_stratified_disjoint_and_seeded(mnist):
    split = data.with_validation_split(mnist, 0.1, seed=3)
    assert (split.num_train, split.num_val, split.num_test) == (3600, 400, 1000)
    val_labels = all_labels(data.eval_pipeline(split, 8, 100, "val"))
    assert np.bincount(val_labels, minlength=10).tolist() == [40] * 10
    train_images = np.concatenate([x for x, _ in numpy_batches(data.eval_pipeline(split, 28, 400,
                                                                                  "train"))])
    val_images = np.concatenate([x for x, _ in numpy_batches(data.eval_pipeline(split, 28, 400,
                                                                                "val"))])
    # No validation image is also a training image (MNIST has no duplicates).
    train_keys = {img.tobytes() for img in train_images.astype(np.uint8)}
    assert not any(img.tobytes() in train_keys for img in val_images.astype(np.uint8))
    # The test split is untouched; the same seed gives the same split, another seed another.
    assert_same_batches(numpy_batches(data.eval_pipeline(mnist, 8, 250)),
                        numpy_batches(data.eval_pipeline(split, 8, 250)))
    again = data.with_validation_split(mnist, 0.1, seed=3)
    assert_same_batches(numpy_batches(data.eval_pipeline(split, 8, 100, "val")),
                        numpy_batches(data.eval_pipeline(again, 8, 100, "val")))
    other = data.with_validation_split(mnist, 0.1, seed=4)
    assert not np.array_equal(numpy_batches(data.eval_pipeline(split, 8, 400, "val"))[0][0],
                              numpy_batches(data.eval_pipeline(other, 8, 400, "val"))[0][0])
    # Training batches come from the 3600 images only.
    assert data.steps_per_epoch(split, 32) == 3600 // 32
    assert data.with_validation_split(mnist, 0.0, seed=0) is mnist
    with pytest.raises(DataError, match="no validation split"):
        data.eval_pipeline(mnist, 8, 10, "val")


def test_validation_split_of_sequential_and_hand_made_tasks():
    task = hand_made_task([i % 3 for i in range(30)], 3)
    split = data.with_validation_split(task, 0.2, seed=0)
    assert (split.num_train, split.num_val) == (24, 6)
    assert sorted(all_labels(data.eval_pipeline(split, 8, 4, "val")).tolist()) == [0, 0, 1, 1, 2, 2]
    assert len(numpy_batches(data.train_pipeline(split, 8, 4, 0, 0))) == 6
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        svhn = data.load_task("tfds:svhn_cropped")
        split = data.with_validation_split(svhn, 0.25, seed=0)
        assert split.num_train + split.num_val == 40
        assert len(all_labels(data.eval_pipeline(split, 16, 8, "val"))) == split.num_val
        # The sequential path still shuffles, skips and resumes the same way.
        full = numpy_batches(data.train_pipeline(split, 16, 5, 0, 0))
        assert len(full) == split.num_train // 5
        assert_same_batches(full[1:], numpy_batches(data.train_pipeline(split, 16, 5, 0, 0,
                                                                        skip_batches=1)))
    tiny = hand_made_task([0, 1], 2)
    with pytest.raises(DataError, match="too few"):
        data.with_validation_split(tiny, 0.2, seed=0)


# --------------------------------------------------------------------------- #
# stratified_split itself.  It stays hand-written rather than
# sklearn.model_selection.train_test_split(stratify=...): these tests pin the
# promises sklearn's split does not keep (see the comment in split.py).
# --------------------------------------------------------------------------- #


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[test_idx]).tolist() == [10, 6, 4]
    assert np.bincount(labels[train_idx]).tolist() == [40, 24, 16]
    # Sorted, disjoint, and together every index once.
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])),
                                  np.arange(len(labels)))


def test_stratified_split_rounds_per_class_and_keeps_each_class_on_both_sides():
    # round(n_c * fraction) per class (digits: 359 of 1797 at 0.2, where
    # sklearn holds out ceil(0.2 * 1797) = 360).
    from sklearn.datasets import load_digits

    digits = load_digits().target
    train_idx, test_idx = stratified_split(digits, 0.2, seed=0)
    counts = np.bincount(digits)
    assert np.bincount(digits[test_idx]).tolist() == np.floor(counts * 0.2 + 0.5).astype(
        int).tolist()
    assert (len(train_idx), len(test_idx)) == (1438, 359)
    # A 2-item class beside a 100-item one still gives one item to each side
    # (sklearn gives it none), and a 1-item class stays in training (sklearn
    # raises).
    labels = np.repeat(np.arange(3), [2, 100, 1])
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[test_idx], minlength=3).tolist() == [1, 20, 0]
    assert np.bincount(labels[train_idx], minlength=3).tolist() == [1, 80, 1]
    # Clamped at n - 1: a class never leaves training entirely.
    train_idx, test_idx = stratified_split(np.array([0, 0, 1, 1, 1]), 0.9, seed=0)
    assert len(train_idx) == 2 and len(test_idx) == 3


def test_stratified_split_is_seeded():
    labels = np.repeat(np.arange(10), 50)
    first = stratified_split(labels, 0.2, seed=7)
    again = stratified_split(labels, 0.2, seed=7)
    other = stratified_split(labels, 0.2, seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])
    assert np.bincount(labels[other[1]]).tolist() == [10] * 10

"""Tests for nettailor_tf/data/pipeline.py: train/eval batches, their
transforms, determinism, resuming by skipping batches, label checks."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from data_helpers import assert_same_batches, hand_made_task, numpy_batches

from nettailor_tf import data
from nettailor_tf.data import DataError, TaskData


@pytest.fixture(scope="module")
def mnist() -> TaskData:
    return data.load_task("mnist5k")


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_train_pipeline_determinism_and_skip(mnist, augment):
    def run(epoch, skip=0):
        return numpy_batches(data.train_pipeline(mnist, 16, 250, epoch=epoch, seed=3,
                                                 skip_batches=skip, augment=augment))

    full = run(1)
    assert len(full) == 16
    assert_same_batches(full, run(1))
    other_epoch = run(2)
    assert not np.array_equal(np.concatenate([y for _, y in full]),
                              np.concatenate([y for _, y in other_epoch]))
    assert_same_batches(full[5:], run(1, skip=5))
    assert run(1, skip=16) == []


def test_augmentation_varies_per_element_and_eval_is_central_crop():
    # One asymmetric image repeated: any difference between outputs is augmentation.
    image = np.zeros((28, 28, 3), np.uint8)
    image[2:10, 3:20] = 255
    ds = tf.data.Dataset.from_tensor_slices((np.stack([image] * 32), np.zeros(32, np.int32)))
    task = TaskData(name="same", spec="custom:same", num_classes=1, train=ds, test=ds,
                    num_train=32, num_test=32, augment="crop_flip")
    (x, _), = numpy_batches(data.train_pipeline(task, 24, 32, epoch=0, seed=0))
    distinct = {img.tobytes() for img in x}
    assert len(distinct) > 4  # several crop offsets and both flips
    assert any(np.array_equal(a, b[:, ::-1]) for a in x[:8] for b in x) or len(distinct) > 8

    (e, _), = numpy_batches(data.eval_pipeline(task, 24, 32))
    big = round(24 * 8 / 7)
    off = (big - 24) // 2
    expected = tf.image.resize(image, [big, big], antialias=True).numpy()[off:off + 24, off:off + 24]
    assert {img.tobytes() for img in e} == {expected.tobytes()}
    (n, _), = numpy_batches(data.eval_pipeline(task, 24, 32).take(1))
    np.testing.assert_allclose(n[0], expected)


def test_drop_remainder_and_steps(mnist):
    batches = numpy_batches(data.train_pipeline(mnist, 8, 300, epoch=0, seed=0))
    assert len(batches) == data.steps_per_epoch(mnist, 300) == 4000 // 300 == 13
    assert all(len(y) == 300 for _, y in batches)
    with pytest.raises(DataError, match="smaller than one batch"):
        data.steps_per_epoch(mnist, 4001)
    with pytest.raises(DataError, match="augmentation policy"):
        data.train_pipeline(mnist, 8, 32, 0, 0, augment="mixup")


def test_hand_made_task_generic_path():
    task = hand_made_task([i % 3 for i in range(30)], 3)
    full = numpy_batches(data.train_pipeline(task, 8, 4, epoch=0, seed=1))
    assert len(full) == 7
    assert_same_batches(full, numpy_batches(data.train_pipeline(task, 8, 4, epoch=0, seed=1)))
    assert_same_batches(full[3:], numpy_batches(data.train_pipeline(task, 8, 4, 0, 1,
                                                                    skip_batches=3)))
    evals = numpy_batches(data.eval_pipeline(task, 8, 7))
    assert [len(y) for _, y in evals] == [7, 7, 7, 7, 2]


def test_label_out_of_range_names_task():
    task = hand_made_task([0, 1, 2, 5, 1, 0, 2, 1], num_classes=3, name="badlabels")
    for ds in (data.train_pipeline(task, 8, 2, 0, 0), data.eval_pipeline(task, 8, 2)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"custom:badlabels.*\[0, 3\)"):
            numpy_batches(ds)


def test_keyed_eval_pipeline_transforms_as_eval_pipeline():
    """Unlabelled images (a challenge's test split) see exactly the
    evaluation transform of the labelled ones."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (10 + 3 * i, 25 - 2 * i, 3), dtype=np.uint8) for i in range(5)]
    labelled = data.TaskData(
        name="t", spec="t", num_classes=2,
        train=tf.data.Dataset.from_generator(lambda: ((im, 0) for im in images), output_signature=(
            tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int64))),
        test=tf.data.Dataset.from_generator(lambda: ((im, 0) for im in images), output_signature=(
            tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int64))),
        num_train=5, num_test=5, augment="crop")
    keyed = tf.data.Dataset.from_generator(
        lambda: ((f"img{i}", im) for i, im in enumerate(images)),
        output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([None, None, 3], tf.uint8)))
    expected = np.concatenate([x.numpy() for x, _ in data.eval_pipeline(labelled, 16, 2)])
    got = list(data.keyed_eval_pipeline(keyed, "crop", 16, 2))
    assert [len(k) for _, k in got] == [2, 2, 1]
    assert [k.decode() for _, keys in got for k in keys.numpy()] == [f"img{i}" for i in range(5)]
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in got]), expected)
    with pytest.raises(data.DataError, match="not a Visual Decathlon task"):
        data.decathlon_test_split("tfds:svhn_cropped")

"""Tests for nettailor_tf/data/tfds_tasks.py: TensorFlow Datasets tasks (mocked
or prepared offline), the Visual Decathlon, Pascal VOC object crops."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from data_helpers import assert_same_batches, check_batch, numpy_batches

from nettailor_tf import data
from nettailor_tf.data import DataError


def test_tfds_svhn_mock():
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        task = data.load_task("tfds:svhn_cropped")
        assert (task.name, task.num_classes, task.augment) == ("svhn_cropped", 10, "crop")
        assert (task.num_train, task.num_test) == (24, 24)
        full = numpy_batches(data.train_pipeline(task, 24, 8, epoch=0, seed=0))
        assert len(full) == 3
        for x, y in full:
            check_batch(x, y, 24, 10)
        # Sequential (tfds) shuffle path: reproducible and skippable too.
        assert_same_batches(full, numpy_batches(data.train_pipeline(task, 24, 8, 0, 0)))
        assert_same_batches(full[1:], numpy_batches(data.train_pipeline(task, 24, 8, 0, 0,
                                                                        skip_batches=1)))
        x, y = next(iter(data.eval_pipeline(task, 24, 5)))
        check_batch(x.numpy(), y.numpy(), 24, 10)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_tfds_decathlon_uses_validation_as_test():
    requested = []

    def fake_as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
        # Encoded images, as the loader asks for SkipDecoding.
        requested.append(str(split))
        rng = np.random.default_rng(0)
        images = [png_bytes(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
                  for i in range(6)]
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, "label": np.arange(6, dtype=np.int64) * 7,
             "name": [f"img{i}" for i in range(6)]})

    with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        task = data.load_task("tfds:visual_domain_decathlon/dtd")
        assert (task.name, task.num_classes, task.augment) == (
            "visual_domain_decathlon/dtd", 47, "crop_flip")
        assert "validation" in requested and "test" not in requested
        x, y = next(iter(data.train_pipeline(task, 32, 3, 0, 0)))
        check_batch(x.numpy(), y.numpy(), 32, 47)
        batches = numpy_batches(data.eval_pipeline(task, 32, 4))
        assert [len(y) for _, y in batches] == [4, 2]
        assert data.load_task("tfds:visual_domain_decathlon/svhn").augment == "crop"


class NettailorTinyTestSet(tfds.core.GeneratorBasedBuilder):
    """A real (registered, preparable offline) tfds set: gray images, unlabelled test split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples(9, labelled=True),
                "validation": self._generate_examples(4, labelled=True),
                "test": self._generate_examples(5, labelled=False)}

    def _generate_examples(self, n, labelled):
        rng = np.random.default_rng(n)
        for i in range(n):
            image = rng.integers(0, 256, (12 + i, 20, 1), dtype=np.uint8)
            yield i, {"image": image, "label": i % 3 if labelled else -1}


def test_tfds_real_prepared_dataset(tmp_path):
    # download=True prepares it (this builder needs no network), then a plain
    # load reads the prepared files; the unlabelled test split is replaced by
    # validation, found by peeking at its labels.
    task = data.load_task("tfds:nettailor_tiny_test_set", data_dir=str(tmp_path), download=True)
    again = data.load_task("tfds:nettailor_tiny_test_set", data_dir=str(tmp_path))
    for t in (task, again):
        assert (t.name, t.num_classes, t.num_train, t.num_test, t.augment) == (
            "nettailor_tiny_test_set", 3, 9, 4, "crop_flip")
    image, label = next(iter(again.train))
    assert image.dtype == tf.uint8 and image.shape[-1] == 3 and label.dtype == tf.int32
    assert sorted(int(y) for _, y in again.test) == [0, 0, 1, 2]
    full = numpy_batches(data.train_pipeline(again, 16, 2, epoch=0, seed=0))
    assert len(full) == 4
    for x, y in full:
        check_batch(x, y, 16, 3)
    assert_same_batches(full[2:], numpy_batches(data.train_pipeline(again, 16, 2, 0, 0,
                                                                    skip_batches=2)))
    assert sum(len(y) for _, y in numpy_batches(data.eval_pipeline(again, 16, 3))) == 4


def test_tfds_unprepared_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match="not prepared") as info:
        data.load_task("tfds:cifar10", data_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "--data_dir" in message and "--download" in message and "tfds:cifar10" in message
    assert "\n" not in message
    # Nothing was downloaded or generated.
    assert not any(".tfrecord" in f for _, _, files in os.walk(tmp_path) for f in files)


def test_tfds_unknown_name_and_bad_specs():
    with pytest.raises(DataError, match="unknown TFDS dataset") as info:
        data.load_task("tfds:no_such_dataset_xyz")
    assert len(str(info.value)) < 400  # no catalogue dump
    with pytest.raises(DataError, match="cifar100"):
        data.load_task("tfds:cifar1000")  # close-match suggestion
    with pytest.raises(DataError, match="not an image-classification"):
        with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
            data.load_task("tfds:imdb_reviews")
    with pytest.raises(DataError, match=r"no config 'nope'; configs: .*dtd"):
        data.load_task("tfds:visual_domain_decathlon/nope")
    with pytest.raises(DataError, match="namespace"):
        data.load_task("tfds:huggingface:mnist")
    with pytest.raises(DataError, match="accepted task specs") as info:
        data.load_task("foo")
    assert "folder:PATH" in str(info.value) and "mnist5k" in str(info.value)


def voc_examples(split):
    """Two 40x60 images per split; each pixel row holds its row index, so a
    crop shows where it was cut.  Objects: (bbox, label, is_difficult)."""
    import io

    from PIL import Image

    rows = np.repeat(np.arange(40, dtype=np.uint8)[:, None, None] * 5, 60, axis=1)
    pixels = np.repeat(rows, 3, axis=2)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    encoded = buffer.getvalue()
    objects = [
        [([0.0, 0.0, 0.5, 0.5], 3, False), ([0.5, 0.5, 1.0, 1.0], 7, False),
         ([0.1, 0.1, 0.2, 0.2], 1, True)],                    # difficult: left out
        [([0.25, 0.0, 0.75, 1.0], 19 if split == "train" else 0, False)],
    ]
    for boxes in objects:
        yield {"image": encoded,
               "objects": {"bbox": np.array([b for b, _, _ in boxes], np.float32),
                           "label": np.array([l for _, l, _ in boxes], np.int64),
                           "is_difficult": np.array([d for _, _, d in boxes], bool)}}


def test_voc_objects_are_cropped_by_their_boxes():
    import tensorflow_datasets as tfds

    def as_dataset(self, split, decoders=None, **kwargs):
        signature = {"image": tf.TensorSpec([], tf.string),
                     "objects": {"bbox": tf.TensorSpec([None, 4], tf.float32),
                                 "label": tf.TensorSpec([None], tf.int64),
                                 "is_difficult": tf.TensorSpec([None], tf.bool)}}
        return tf.data.Dataset.from_generator(lambda: voc_examples(str(split)),
                                              output_signature=signature)

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        task = data.load_task("tfds:voc/2007")
        assert (task.name, task.num_classes, task.num_train, task.num_test) == (
            "voc/2007", 20, 3, 3)
        crops = [(image.numpy(), int(label)) for image, label in task.train]
        images, labels = next(iter(data.train_pipeline(task, 16, 2, epoch=0, seed=0)))
        assert images.shape == (2, 16, 16, 3) and set(labels.numpy()) <= {3, 7, 19}
        test_labels = np.concatenate([l.numpy() for _, l in data.eval_pipeline(task, 16, 2)])
        assert sorted(test_labels) == [0, 3, 7]
    assert [label for _, label in crops] == [3, 7, 19]
    top_left, bottom_right, band = (c for c, _ in crops)
    assert top_left.shape == (20, 30, 3) and bottom_right.shape == (20, 30, 3)
    assert band.shape == (20, 60, 3)
    # Row r of the image holds 5 * r: each crop starts at its box's top row.
    assert top_left[0, 0, 0] == 0 and bottom_right[0, 0, 0] == 5 * 20 and band[0, 0, 0] == 5 * 10

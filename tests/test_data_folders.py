"""Tests for nettailor_tf/data/folders.py: image-folder tasks, both layouts,
and the errors that name the bad folder or file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from data_helpers import assert_same_batches, check_batch, numpy_batches

from nettailor_tf import data
from nettailor_tf.data import DataError


def write_images(folder, n: int, seed: int, gray_first: bool = False) -> None:
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
        write_images(root / cls, 10, seed=c, gray_first=(c == 0))
    (root / "a_daisy" / "notes.txt").write_text("not an image")

    task = data.load_task(f"folder:{root}", holdout_fraction=0.2, split_seed=0)
    assert (task.name, task.num_classes, task.augment) == ("flowers", 3, "crop_flip")
    assert (task.num_train, task.num_test) == (24, 6)
    labels = sorted(int(y) for _, y in task.test)
    assert labels == [0, 0, 1, 1, 2, 2]
    # Every decoded image is uint8 RGB, the grayscale PNG included.
    shapes = {tuple(x.shape[2:]) for x, _ in task.train}
    assert shapes == {(3,)} and all(x.dtype == tf.uint8 for x, _ in task.train.take(1))

    full = numpy_batches(data.train_pipeline(task, 20, 4, epoch=2, seed=5))
    assert len(full) == 6
    for x, y in full:
        check_batch(x, y, 20, 3)
    assert_same_batches(full, numpy_batches(data.train_pipeline(task, 20, 4, epoch=2, seed=5)))
    assert_same_batches(full[4:], numpy_batches(data.train_pipeline(task, 20, 4, 2, 5,
                                                                    skip_batches=4)))
    assert not np.array_equal(np.concatenate([y for _, y in full]), np.concatenate(
        [y for _, y in numpy_batches(data.train_pipeline(task, 20, 4, epoch=3, seed=5))]))
    evals = numpy_batches(data.eval_pipeline(task, 20, 4))
    assert [len(y) for _, y in evals] == [4, 2]
    assert_same_batches(evals, numpy_batches(data.eval_pipeline(task, 20, 4)))
    # Same seed, same split; another seed, another split.
    again = data.load_task(f"folder:{root}", split_seed=0)
    assert [x.numpy().tobytes() for x, _ in again.test] == [x.numpy().tobytes() for x, _ in task.test]


def test_folder_train_test_layout(tmp_path):
    root = tmp_path / "pets"
    for c, cls in enumerate(["cat", "dog"]):
        write_images(root / "train" / cls, 5, seed=c)
        write_images(root / "test" / cls, 3, seed=10 + c, gray_first=True)
    task = data.load_task(f"folder:{root}/")
    assert (task.name, task.num_classes, task.num_train, task.num_test) == ("pets", 2, 10, 6)
    x, y = next(iter(data.eval_pipeline(task, 16, 6)))
    check_batch(x.numpy(), y.numpy(), 16, 2)
    assert sorted(y.numpy().tolist()) == [0, 0, 0, 1, 1, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_task(f"folder:{tmp_path / 'missing'}")

    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        data.load_task(f"folder:{empty}")

    root = tmp_path / "empty_class"
    write_images(root / "a", 3, seed=0)
    (root / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty_class[/\\]b holds no images"):
        data.load_task(f"folder:{root}")

    root = tmp_path / "corrupt"
    write_images(root / "a", 3, seed=0)
    write_images(root / "b", 3, seed=1)
    (root / "b" / "broken.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(DataError, match=r"corrupt image .*broken\.jpg") as info:
        data.load_task(f"folder:{root}")
    assert "\n" not in str(info.value)

    root = tmp_path / "single"
    write_images(root / "only", 4, seed=0)
    with pytest.raises(DataError, match="at least 2"):
        data.load_task(f"folder:{root}")

    root = tmp_path / "mismatch"
    write_images(root / "train" / "a", 2, seed=0)
    write_images(root / "train" / "b", 2, seed=1)
    write_images(root / "test" / "a", 2, seed=2)
    write_images(root / "test" / "c", 2, seed=3)
    with pytest.raises(DataError, match=r"differ .*only in train: \['b'\].*only in test: \['c'\]"):
        data.load_task(f"folder:{root}")

    root = tmp_path / "train_only"
    write_images(root / "train" / "a", 2, seed=0)
    with pytest.raises(DataError, match="no test/"):
        data.load_task(f"folder:{root}")

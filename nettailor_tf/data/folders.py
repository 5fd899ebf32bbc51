"""Image-folder tasks: ``folder:PATH`` with class sub-folders of image files,
either PATH/<class>/<images> (a stratified hold-out becomes the test split) or
PATH/train/<class>/... + PATH/test/<class>/...  Every file is checked when the
task loads, so a bad one is named before training starts.

TensorFlow decodes JPEG, PNG, GIF and WEBP as a viewer shows them (palettes,
1-bit, 16-bit and CMYK included), but its BMP decoder reads an 8-bit palette
image's indices as grey levels, ignores compression and refuses 1-, 4- and
16-bit files: BMPs are decoded by PIL instead, so what trains is what a person
sees."""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import tensorflow as tf

from nettailor_tf.data.split import stratified_split
from nettailor_tf.data.tasks import (TASK_SPEC_HELP, TaskData, UndecodedSplit, build_source,
                                     make_task, task_error)

# Extensions tf.io.decode_image can read (it sniffs the content, the extension
# only selects which files count as images).
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# PIL format names of those decoders; MPO is the multi-picture JPEG some cameras
# write, which starts with an ordinary JPEG stream.
_TF_DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP"})


def _shown(path: str) -> str:
    """`path` printable on one line, whatever bytes its name holds."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _entries(spec: str, folder: str, keep) -> list[os.DirEntry]:
    """The entries of `folder` that `keep(entry)`; an entry that cannot be
    looked at (a symbolic link loop, no permission) is a DataError naming it."""
    path = folder
    try:
        kept = []
        with os.scandir(folder) as entries:
            for entry in entries:
                path = entry.path
                if not entry.name.startswith(".") and keep(entry):
                    kept.append(entry)
        return kept
    except OSError as err:
        problem = ("is a symbolic link that loops" if err.errno == errno.ELOOP
                   else f"cannot be read ({err.strerror or err})")
        raise task_error(spec, f"{_shown(path)} {problem}; remove or fix it") from None


def _list_dirs(spec: str, path: str) -> list[str]:
    return sorted(e.name for e in _entries(spec, path, lambda e: e.is_dir()))


def _is_image(spec: str, entry: os.DirEntry) -> bool:
    if os.path.splitext(entry.name)[1].lower() not in _IMAGE_EXTENSIONS or not entry.is_file():
        return False
    try:
        entry.path.encode("utf-8")
    except UnicodeEncodeError:  # Linux names are bytes; TensorFlow opens UTF-8 paths only
        raise task_error(spec, f"image {_shown(entry.path)}: its path is not valid UTF-8, which "
                               "TensorFlow cannot open; rename it") from None
    return True


def _class_images(spec: str, root: str) -> dict[str, list[str]]:
    """{class name: sorted image paths} for root/<class>/*, validated."""
    classes = _list_dirs(spec, root)
    if not classes:
        raise task_error(spec, f"no class sub-folders in {root}; "
                               f"expected {root}/<class>/<image files>")
    out: dict[str, list[str]] = {}
    for cls in classes:
        cls_dir = os.path.join(root, cls)
        files = sorted(e.path for e in _entries(spec, cls_dir, lambda e: _is_image(spec, e)))
        if not files:
            raise task_error(spec, f"class folder {cls_dir} holds no images "
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
            if fmt == "BMP":  # decoded by PIL in training too: decode it whole now
                _pil_rgb(path)
        except Exception as err:  # PIL raises many types for bad files
            raise task_error(spec, f"unreadable or corrupt image {path} ({type(err).__name__}: "
                                   f"{err}); remove or replace it") from None
        if fmt not in _TF_DECODABLE_FORMATS:
            raise task_error(spec, f"image {path} is {fmt}, which TensorFlow cannot decode; "
                                   f"accepted formats: JPEG, PNG, BMP, GIF, WEBP")


def _pil_rgb(file) -> np.ndarray:
    """uint8 [H, W, 3] of an image file (a path or a file object), as PIL shows it."""
    from PIL import Image

    with Image.open(file) as im:
        return np.asarray(im.convert("RGB"))


def _pil_decode(contents: np.ndarray) -> np.ndarray:
    """`_pil_rgb` of a file's bytes as uint8 (a string would come as np.bytes_, which drops
    trailing zero bytes)."""
    return _pil_rgb(io.BytesIO(contents.tobytes()))


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    contents = tf.io.read_file(path)
    image = tf.cond(
        tf.equal(tf.strings.substr(contents, 0, 2), b"BM"),  # a BMP, whatever its extension
        lambda: tf.numpy_function(_pil_decode, [tf.io.decode_raw(contents, tf.uint8)], tf.uint8,
                                  stateful=False),
        lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def load_folder(spec: str, path: str, holdout_fraction: float, split_seed: int) -> TaskData:
    """The task of ``folder:<path>``: classes are the sorted sub-folder names;
    without train/ and test/ a seeded `holdout_fraction` per class is the test
    split.  Every image is header-checked here (`DataError` names a bad one)."""
    if not path:
        raise task_error(spec, f"empty folder path; {TASK_SPEC_HELP}")
    root = os.path.normpath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise task_error(spec, f"folder {root} does not exist or is not a directory")
    name = os.path.basename(root) or root

    top = _list_dirs(spec, root)
    if "train" in top or "test" in top:
        if not ("train" in top and "test" in top):
            have, missing = ("train", "test") if "train" in top else ("test", "train")
            raise task_error(spec, f"{root} has {have}/ but no {missing}/; use both "
                                   f"{root}/train/<class>/ and {root}/test/<class>/, or class "
                                   f"folders directly in {root}")
        train_map = _class_images(spec, os.path.join(root, "train"))
        test_map = _class_images(spec, os.path.join(root, "test"))
        if set(train_map) != set(test_map):
            only_train = sorted(set(train_map) - set(test_map))[:5]
            only_test = sorted(set(test_map) - set(train_map))[:5]
            raise task_error(spec, f"class folders of {root}/train and {root}/test differ "
                                   f"(only in train: {only_train or '-'}; only in test: "
                                   f"{only_test or '-'}); both must hold the same classes")
        classes = sorted(train_map)
    else:
        train_map = _class_images(spec, root)
        test_map = None
        classes = sorted(train_map)
    if len(classes) < 2:
        raise task_error(spec, f"{root} has only {len(classes)} class folder ({classes[0]}); "
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
            raise task_error(spec, f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        all_paths, all_labels = flatten(train_map)
        train_idx, test_idx = stratified_split(all_labels, holdout_fraction, split_seed)
        train_paths, train_labels = all_paths[train_idx], all_labels[train_idx]
        test_paths, test_labels = all_paths[test_idx], all_labels[test_idx]
        if len(test_idx) == 0:
            raise task_error(spec, f"{root} is too small to hold out a test split; add images or "
                                   "use train/ and test/ sub-folders")

    _validate_images(spec, list(train_paths) + list(test_paths))
    source = build_source(UndecodedSplit(items=train_paths, labels=train_labels),
                          UndecodedSplit(items=test_paths, labels=test_labels),
                          decode=_decode_file, same_size=False)
    return make_task(name, spec, len(classes), source, len(train_paths), len(test_paths),
                     "crop_flip", class_names=tuple(classes))

"""SavedModels that a device or server can feed raw camera images.

Every serving signature takes `images`: uint8 RGB `[N, H, W, 3]` of any size,
and returns `logits` and `probabilities` (float32 `[N, classes]`).  Resizing
(and the centre crop of tasks trained with crops) happens inside the graph,
with ops that TFLite has as builtins, so the same graph converts unchanged.
`static=True` writes the same graph with the fixed input `[1, S, S, 3]`
(the model's own size) that the .tflite files are converted from: GPU and
NPU delegates want static shapes, and an app then resizes its picture to
S x S (`fit_to_input` does it the evaluation pipeline's way) and never
reallocates.  Outputs come in the order of their names, `logits` then
`probabilities` (`OUTPUT_NAMES`): index 0 and 1 of a .tflite signature.

A task's class names go beside its files, one per line in label order
(`write_labels`): `labels.txt` for a task's export, `labels_<signature>.txt`
per signature of a bundle.

A bundle holds several tasks, one signature each, over ONE set of universal
variables (the layers of `static_graph.UniversalLayers` are shared objects, and
`keras.export.ExportArchive` stores a variable once however many endpoints
use it).  A plain `tf.Module` around Keras 3 models tracks no variables at
all, so everything goes through ExportArchive.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re

import keras
import numpy as np
import tensorflow as tf

INPUT_NAME = "images"
# Output names, in the order a .tflite signature lists them (sorted names).
OUTPUT_NAMES = ("logits", "probabilities")
SERVING_KEY = "serving_default"
LABELS_FILE = "labels.txt"


@dataclasses.dataclass
class Endpoint:
    """One signature: `model` maps float32 images in 0..255 at
    `image_size` to logits; `crop` says whether the task's evaluation
    resizes to image_size * 8/7 and centre-crops (the convention of
    nettailor_tf/data/pipeline.py)."""
    model: keras.Model
    image_size: int
    crop: bool


def signature_key(task_name: str) -> str:
    """A task name as a signature key (letters, digits and underscores)."""
    key = re.sub(r"[^0-9A-Za-z_]", "_", task_name)
    return key if key[:1].isalpha() else f"task_{key}"


def bundle_labels_file(key: str) -> str:
    """The labels file of signature `key` of a bundle."""
    return f"labels_{key}.txt"


def write_labels(path: str, names) -> None:
    """One class name per line, in label order (UTF-8, "\\n" line ends)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(f"{name}\n" for name in names))


def read_labels(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def fit_to_input(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 images [N, H, W, 3] resized to [N, height, width, 3] as the
    evaluation pipeline resizes (bilinear, antialiased when shrinking), for
    a file with a static input.  Images already at that size pass as they are."""
    images = np.asarray(images)
    if images.shape[1:3] == (height, width):
        return images.astype(np.uint8, copy=False)
    shrink = images.shape[1] > height or images.shape[2] > width
    resized = tf.image.resize(tf.cast(images, tf.float32), [height, width], antialias=shrink)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def preprocess(images: tf.Tensor, image_size: int, crop: bool) -> tf.Tensor:
    """uint8 [N, H, W, 3] of any size -> float32 [N, S, S, 3] in 0..255.

    Bilinear resize with half-pixel centres, without antialiasing (which
    has no TFLite builtin).  For upscaled inputs, and inputs already at the
    model's size, this equals the training pipeline's evaluation transform
    exactly; larger inputs differ slightly from its antialiased shrink, which
    the parity check measures.
    """
    x = tf.cast(images, tf.float32)
    if not crop:
        return tf.image.resize(x, [image_size, image_size], antialias=False)
    big = int(round(image_size * 8 / 7))
    offset = (big - image_size) // 2
    x = tf.image.resize(x, [big, big], antialias=False)
    return x[:, offset:offset + image_size, offset:offset + image_size, :]


def serving_function(endpoint: Endpoint, static: bool = False):
    """The endpoint's serving computation as a tf.function of uint8 images
    (of any size, or `static`: [1, S, S, 3] at the endpoint's size)."""
    model, size, crop = endpoint.model, endpoint.image_size, endpoint.crop
    signature = input_signature(size if static else None)

    @tf.function(input_signature=signature)
    def serve(images):
        logits = model(preprocess(images, size, crop), training=False)
        logits = tf.cast(logits, tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    return serve


def input_signature(size: int | None = None) -> list[tf.TensorSpec]:
    """Any [N, H, W, 3], or one image [1, size, size, 3]."""
    shape = [None, None, None, 3] if size is None else [1, size, size, 3]
    return [tf.TensorSpec(shape, tf.uint8, name=INPUT_NAME)]


def write_savedmodel(path: str, endpoints: dict[str, Endpoint], static: bool = False) -> dict:
    """Writes a SavedModel with one signature per entry of `endpoints`
    (`static`: each takes one image at its endpoint's size), and returns
    {key: its `serving_function`}: traced here already, so that a caller
    that runs the Keras model the same way does not trace it again.

    Keras's ExportArchive also makes the first endpoint visible as
    `serving_default` (TF Serving needs a default), so a bundle's SavedModel
    has its tasks' signatures plus that alias of the first task's."""
    if not endpoints:
        raise ValueError("write_savedmodel needs at least one endpoint")
    # No archive.track(model): it lists the Keras variables, while the
    # endpoints capture the tf.Variables behind them, and the SavedModel then
    # stores every weight twice.  Variables used by an endpoint are tracked
    # (once) without it.
    archive = keras.export.ExportArchive()
    functions = {}
    for key, endpoint in endpoints.items():
        function = functions[key] = serving_function(endpoint, static)
        archive.add_endpoint(name=key, fn=function,
                             input_signature=list(function.input_signature))
    with _quiet_tensorflow():
        archive.write_out(path, verbose=False)
    return functions


@contextlib.contextmanager
def _quiet_tensorflow():
    """Silences TensorFlow's INFO lines while saving (one lists every captured
    variable as an 'unsupported input name', thousands of characters), and
    restores absl's logger, whose level `tf.saved_model.save` leaves at
    WARNING (which would hide this program's progress lines)."""
    loggers = [logging.getLogger("tensorflow"), logging.getLogger("absl")]
    levels = [logger.level for logger in loggers]
    loggers[0].setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def stored_variables(path: str) -> dict[str, tuple]:
    """The variables a SavedModel stores on disk: checkpoint key -> shape.
    Object-graph checkpoints save each variable once, under one key, however
    many objects reference it."""
    reader = tf.train.load_checkpoint(f"{path}/variables/variables")
    shapes = reader.get_variable_to_shape_map()
    return {k: tuple(v) for k, v in shapes.items()
            if not k.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}

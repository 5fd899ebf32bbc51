"""SavedModels that a device or server can feed raw camera images.

Every serving signature takes `images`: uint8 RGB `[N, H, W, 3]` of any size,
and returns `logits` and `probabilities` (float32 `[N, classes]`).  Resizing
(and the centre crop of tasks trained with crops) happens inside the graph,
with ops that TFLite has as builtins, so the same graph converts unchanged.

A bundle holds several tasks, one signature each, over ONE set of universal
variables (the layers of `prune.UniversalLayers` are shared objects, and
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
import tensorflow as tf

INPUT_NAME = "images"
SERVING_KEY = "serving_default"


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


def serving_function(endpoint: Endpoint):
    """The endpoint's serving computation as a tf.function of uint8 images."""
    model, size, crop = endpoint.model, endpoint.image_size, endpoint.crop

    @tf.function(input_signature=input_signature())
    def serve(images):
        logits = model(preprocess(images, size, crop), training=False)
        logits = tf.cast(logits, tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    return serve


def input_signature() -> list[tf.TensorSpec]:
    return [tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)]


def write_savedmodel(path: str, endpoints: dict[str, Endpoint]) -> None:
    """Writes a SavedModel with one signature per entry of `endpoints`."""
    if not endpoints:
        raise ValueError("write_savedmodel needs at least one endpoint")
    # No archive.track(model): it lists the Keras variables, while the
    # endpoints capture the tf.Variables behind them, and the SavedModel then
    # stores every weight twice.  Variables used by an endpoint are tracked
    # (once) without it.
    archive = keras.export.ExportArchive()
    for key, endpoint in endpoints.items():
        archive.add_endpoint(name=key, fn=serving_function(endpoint),
                             input_signature=input_signature())
    with _quiet_tensorflow():
        archive.write_out(path, verbose=False)


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

"""Does an exported file compute what the Keras model computes?

Every artefact is run on the task's test split, fed the uint8 images a
device would feed it, next to the Keras model with the same in-graph
preprocessing: a SavedModel takes the raw images (any size; the graph
resizes), a .tflite file with a static input takes them resized to its size
on the host (`savedmodel.fit_to_input`, what an app does), and its Keras
reference is fed the same resized images (`resized`).  Top-1 agreement
measures the export (conversion, quantisation); accuracy measures what a
user gets.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from exporters import savedmodel as savedmodel_lib
from nettailor_tf.common.errors import NetTailorError

Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 images -> logits


class ParityError(NetTailorError, RuntimeError):
    """An artefact disagrees with its Keras model beyond the allowed rate."""


def raw_test_batches(test: tf.data.Dataset, batch_size: int = 64,
                     max_images: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images [B, H, W, 3], int labels [B]) of a split as stored.

    Images of one fixed size are batched; images whose sizes vary go one at
    a time (an interpreter resizes its input per call)."""
    if max_images:
        test = test.take(max_images)
    image_spec = test.element_spec[0]
    same_size = image_spec.shape.is_fully_defined()
    for images, labels in test.batch(batch_size if same_size else 1).as_numpy_iterator():
        yield images.astype(np.uint8), labels


def keras_predictor(endpoint: savedmodel_lib.Endpoint, serve=None) -> Predictor:
    """The Keras model's logits through its serving computation: `serve`,
    the endpoint's `serving_function` where one was traced already (what
    `savedmodel.write_savedmodel` returns: the same graph, a trace of the
    network fewer), or a new one."""
    serve = serve or savedmodel_lib.serving_function(endpoint)
    return lambda images: serve(tf.constant(images))["logits"].numpy()


def savedmodel_predictor(path: str, key: str = savedmodel_lib.SERVING_KEY) -> Predictor:
    signature = tf.saved_model.load(path).signatures[key]
    return lambda images: signature(**{savedmodel_lib.INPUT_NAME: tf.constant(images)})[
        "logits"].numpy()


def resized(predict: Predictor, size: int) -> Predictor:
    """`predict` fed the images resized to size x size on the host first."""
    return lambda images: predict(savedmodel_lib.fit_to_input(images, size, size))


def static_input_shape(runner) -> tuple[int, ...] | None:
    """The fixed input shape of a LiteRT signature runner ([1, S, S, 3]), or
    None where a dimension other than the batch is dynamic."""
    details = runner.get_input_details()[savedmodel_lib.INPUT_NAME]
    shape = tuple(int(d) for d in details["shape_signature"])
    return shape if all(d > 0 for d in shape[1:]) else None


def tflite_predictor(path: str, key: str = savedmodel_lib.SERVING_KEY,
                     num_threads: int | None = None) -> Predictor:
    """Logits of signature `key`; for a static input [B, H, W, 3] the images
    are resized to H x W on the host and fed B at a time."""
    from ai_edge_litert.interpreter import Interpreter  # deferred: optional at import time

    interpreter = Interpreter(model_path=path, num_threads=num_threads)
    runner = interpreter.get_signature_runner(key)

    def run(images):
        return runner(**{savedmodel_lib.INPUT_NAME: images})["logits"]

    shape = static_input_shape(runner)
    if shape is None:
        run.runs_alongside = True  # its own interpreter: `run_all` may call it from a thread
        return run
    batch = max(shape[0], 1)

    def run_static(images):
        images = savedmodel_lib.fit_to_input(images, shape[1], shape[2])
        return np.concatenate([run(images[i:i + batch]) for i in range(0, len(images), batch)])

    run_static.runs_alongside = True
    return run_static


@dataclasses.dataclass
class Outcome:
    """Top-1 answers of several predictors over the same images."""
    labels: np.ndarray
    top1: dict[str, np.ndarray]

    def accuracy(self, name: str) -> float:
        return float(np.mean(self.top1[name] == self.labels))

    def agreement(self, name: str, reference: str) -> float:
        return float(np.mean(self.top1[name] == self.top1[reference]))


def run_all(predictors: dict[str, Predictor],
            batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
            workers: int = 1) -> Outcome:
    """Runs every predictor over the same batches (read once, shared).

    With `workers` > 1 the LiteRT predictors of a batch (`tflite_predictor`:
    one interpreter each, whose invoke releases the GIL) run side by side in
    that many threads while the TensorFlow ones run here, one after the
    other: a batch-1 interpreter on one thread each keeps 2 cores busier
    than one interpreter spread over both (the quickstart's eight files per
    task: 4.4 s instead of 9.2).  The TensorFlow predictors stay on this
    thread because two of them share one Keras model, and calling it from
    two threads while it traces crashed the process and changed answers.
    """
    labels, top1 = [], {name: [] for name in predictors}
    alongside = {name for name, predict in predictors.items()
                 if workers > 1 and getattr(predict, "runs_alongside", False)}

    def answer(predict, images):
        return np.argmax(predict(images), axis=-1)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for images, batch_labels in batches():
            labels.append(batch_labels)
            started = {name: pool.submit(answer, predictors[name], images) for name in alongside}
            answers = {name: answer(predict, images) for name, predict in predictors.items()
                       if name not in alongside}
            for name in predictors:
                top1[name].append(started[name].result() if name in started else answers[name])
    if not labels:
        raise ParityError("parity: the test split is empty")
    return Outcome(np.concatenate(labels), {k: np.concatenate(v) for k, v in top1.items()})


def check_agreement(what: str, agreement: float, minimum: float) -> None:
    if agreement < minimum:
        raise ParityError(f"{what}: top-1 agreement with the Keras model is {agreement:.4f}, "
                          f"below the required {minimum:.4f}; the export was discarded")

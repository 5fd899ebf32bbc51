"""Running an exported file on an image, as an app would: a SavedModel folder
or a .tflite file (one task or a bundle), its tasks' names and class names,
and each task's top classes (the library behind `python -m
nettailor_tf.predict`)."""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from typing import Callable

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from exporters.savedmodel import fit_to_input
from nettailor_tf.common.errors import PREDICT_COMMAND, PredictError, first_line
from nettailor_tf.image_files import load_image
SERVING_KEY = "serving_default"
MANIFEST = "export.json"


@dataclasses.dataclass
class Signature:
    """One task of a model: how to run it and what its answers are called."""
    task: str                                  # the task's name, or the signature key
    key: str                                   # the signature key in the file
    classes: int
    input_size: tuple[int, int] | None         # (H, W) of a static input; None: any size
    run: Callable[[np.ndarray], np.ndarray]    # uint8 [1, H, W, 3] -> probabilities [C]
    labels: list[str] | None = None            # class names in label order (`select`)


@dataclasses.dataclass
class Model:
    path: str
    kind: str                                  # "tflite" or "savedmodel"
    signatures: dict[str, Signature]           # task name -> signature
    folders: list[str]                         # where its labels files and export.json are


# --- models -----------------------------------------------------------------------

def load_model(path: str, num_threads: int | None = None) -> Model:
    """A SavedModel folder or a .tflite file, with its tasks' names."""
    path = os.path.normpath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise PredictError(f"--model={path}: no such file or folder", path=path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        # Labels and export.json sit beside the SavedModel folder (or inside it).
        folders = [path, os.path.dirname(path)]
        kind, runners = "savedmodel", _savedmodel_runners(path)
    elif os.path.isfile(path) and path.endswith(".tflite"):
        folders = [os.path.dirname(path)]
        kind, runners = "tflite", _tflite_runners(path, num_threads)
    else:
        raise PredictError(f"--model={path}: not a SavedModel folder (with saved_model.pb) "
                           "or a .tflite file", path=path)
    names = _task_names(folders)
    signatures = {}
    for key, (input_size, classes, run) in runners.items():
        task = names.get(key, key)
        signatures[task] = Signature(task, key, classes, input_size, run)
    return Model(path, kind, signatures, folders)


def _tflite_runners(path: str, num_threads: int | None) -> dict:
    try:
        interpreter = Interpreter(model_path=path, num_threads=num_threads)
        keys = list(interpreter.get_signature_list())
    except (ValueError, RuntimeError) as err:
        raise PredictError(f"--model={path}: LiteRT cannot load it ({first_line(err)})",
                           path=path) from None
    if not keys:
        raise PredictError(f"--model={path}: the file has no signatures", path=path)
    runners = {}
    for key in keys:
        runner = interpreter.get_signature_runner(key)
        (input_name, details), = _only_input(path, key, runner.get_input_details())
        shape = [int(d) for d in details["shape_signature"]]
        static = tuple(shape[1:3]) if all(d > 0 for d in shape[1:3]) else None
        outputs = runner.get_output_details()
        output = "probabilities" if "probabilities" in outputs else "logits"
        classes = int(outputs[output]["shape"][-1])

        def run(images, runner=runner, input_name=input_name, output=output):
            return _as_probabilities(runner(**{input_name: images})[output], output)

        runners[key] = (static, classes, run)
    return runners


def _savedmodel_runners(path: str) -> dict:
    try:
        signatures = dict(tf.saved_model.load(path).signatures)
    except Exception as err:  # TensorFlow raises many types for a broken folder
        raise PredictError(f"--model={path}: TensorFlow cannot load the SavedModel "
                           f"({first_line(err)})", path=path) from None
    # A bundle's serving_default is an alias of its first task (ExportArchive adds it).
    keys = [k for k in signatures if k != SERVING_KEY] or list(signatures)
    if not keys:
        raise PredictError(f"--model={path}: the SavedModel has no signatures", path=path)
    runners = {}
    for key in keys:
        function = signatures[key]
        (input_name, spec), = _only_input(path, key, function.structured_input_signature[1])
        outputs = function.structured_outputs
        output = "probabilities" if "probabilities" in outputs else "logits"
        static = tuple(spec.shape[1:3]) if spec.shape[1:3].is_fully_defined() else None

        def run(images, function=function, input_name=input_name, output=output):
            result = function(**{input_name: tf.constant(images, tf.uint8)})
            return _as_probabilities(result[output].numpy(), output)

        runners[key] = (static, int(outputs[output].shape[-1]), run)
    return runners


def _only_input(path: str, key: str, inputs: dict) -> list:
    if len(inputs) != 1:
        raise PredictError(f"--model={path}: signature {key} takes {len(inputs)} inputs; "
                           "an image classifier of the export stage takes one", path=path)
    return list(inputs.items())


def _as_probabilities(values: np.ndarray, output: str) -> np.ndarray:
    values = np.asarray(values, np.float64)[0]
    if output == "probabilities":
        return values
    values = np.exp(values - values.max())
    return values / values.sum()


def _task_names(folders: list[str]) -> dict[str, str]:
    """Signature key -> task name, from the export.json beside the model."""
    for folder in folders:
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            return {}  # the names are a nicety; the signature keys do as well
        if "bundle" in manifest:
            return {key: task for task, key in manifest["bundle"].get("signatures", {}).items()}
        if "task" in manifest:
            return {SERVING_KEY: manifest["task"]}
    return {}


def labels(model: Model, signature: Signature) -> list[str]:
    """The class names of `signature` from the labels file next to the model
    (class_<i>, with a warning on stderr, where there is none)."""
    key, classes = signature.key, signature.classes
    names = [f"labels_{key}.txt"] + (["labels.txt"] if len(model.signatures) == 1 else [])
    for folder in model.folders:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    found = f.read().splitlines()
                if len(found) != classes:
                    raise PredictError(f"{path} has {len(found)} class names, the model "
                                       f"{classes} classes (signature {key})", path=path)
                return found
    print(f"{PREDICT_COMMAND}: warning: no {' or '.join(names)} next to the model; classes are "
          "shown as class_<i>", file=sys.stderr)
    return [f"class_{i}" for i in range(classes)]


def select(model: Model, task: str | None) -> list[Signature]:
    """Every task of `model`, or the one named (task name or signature key),
    with their labels."""
    chosen = [s for s in model.signatures.values() if task in (None, s.task, s.key)]
    if not chosen:
        raise PredictError(f"--task={task}: {model.path} has no such task; its tasks: "
                           + ", ".join(model.signatures))
    for signature in chosen:
        signature.labels = labels(model, signature)
    return chosen


def model_input(image: np.ndarray, signature: Signature) -> np.ndarray:
    """[1, H, W, 3] uint8 for `signature`: resized to a static input's size
    (bilinear, antialiased when shrinking, as the evaluation pipeline), or as
    it is for an input of any size (the graph resizes)."""
    if signature.input_size is None:
        return image[None]
    return fit_to_input(image[None], *signature.input_size)


# --- predictions ---------------------------------------------------------------------

def top(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": labels[i], "probability": round(float(probabilities[i]), 6)}
            for i in order]


def peak_memory_mb() -> float:
    """The process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def predict_image(image_path: str, signatures: list[Signature], top_k: int = 5) -> dict:
    """The JSON object of one image over `signatures`."""
    image = load_image(image_path)
    results, elapsed = {}, 0.0
    for signature in signatures:
        inputs = model_input(image, signature)
        start = time.perf_counter()
        probabilities = signature.run(inputs)
        elapsed += time.perf_counter() - start
        names = signature.labels or [f"class_{i}" for i in range(signature.classes)]
        results[signature.task] = {"top": top(probabilities, names, top_k)}
    return {"image": image_path, "tasks": results, "latency_ms": round(elapsed * 1e3, 3),
            "peak_memory_mb": round(peak_memory_mb(), 1)}

"""Which exported file to ship: `recommended`, the fastest variant whose
accuracy on the selection split is within `RECOMMENDATION_TOLERANCE` of the float32
file's, and `smallest`, the smallest such file; and the variant a
multi-task bundle is built in (the fastest one every task accepts).

Accuracy is read on the split the run makes its choices on
(`--selection_split`: validation, or test under the paper's protocol),
never on a test split the choice would then be judged on; latency is
measured in the export stage, at 1 thread and with every core, the variants
interleaved (`exporters.timing.measure_many`), on one real image.  The
fastest is ranked at 1 thread among the files no slower than float32 with
every core (give or take the timing's noise, `ALL_CORES_MARGIN`).
"""
from __future__ import annotations

import numpy as np
from absl import logging

from exporters import parity, savedmodel, timing
from nettailor_tf import data as data_lib
from nettailor_tf.common import quiet
from nettailor_tf.run import artifacts
from nettailor_tf.settings.config import BUNDLE_VARIANTS, Config
from nettailor_tf.settings.tuned import ALL_CORES_MARGIN, RECOMMENDATION_TOLERANCE



def selection_images(config: Config, task) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images at the model's size and labels of the split choices are
    made on (validation; test under the paper's protocol)."""
    split = task.val if data_lib.selection_split(task, config.selection_split) == "val" \
        else task.test
    images, labels = [], []
    for batch, batch_labels in parity.raw_test_batches(split):
        images.append(savedmodel.fit_to_input(batch, config.image_size, config.image_size))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def benchmark_image(config: Config, task) -> np.ndarray:
    """One real test image [1, S, S, 3], the static input of the .tflite files."""
    for images, _ in data_lib.eval_pipeline(task, config.image_size, 1):
        return np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)
    raise artifacts.StageError(f"{task.name}: the test split is empty")


def candidates(config: Config, task, files: dict[str, dict], image: np.ndarray) -> dict:
    """{variant: {bytes, selection_accuracy, selection_images, latency_ms,
    latency_ms_all_cores, busy}} of the task's NetTailor files ({variant:
    {path, bytes}}): each run on the selection split (one interpreter
    thread each, side by side) and timed, interleaved, at 1 thread and with
    every core."""
    split = task.val if data_lib.selection_split(task, config.selection_split) == "val" \
        else task.test
    predictors = {v: parity.tflite_predictor(f["path"], num_threads=1) for v, f in files.items()}
    cores = timing.all_cores()
    with quiet.native_stderr_filtered():
        outcome = parity.run_all(predictors, lambda: parity.raw_test_batches(split),
                                 workers=cores)
        timed = {threads: timing.measure_many(
            {v: (f["path"], savedmodel.SERVING_KEY) for v, f in files.items()}, image, threads,
            config.benchmark_warmup, config.benchmark_runs) for threads in sorted({1, cores})}
    return {v: {"bytes": f["bytes"], "selection_accuracy": outcome.accuracy(v),
                "selection_images": int(len(outcome.labels)),
                "latency_ms": timed[1][v].median_ms,
                "latency_ms_all_cores": timed[cores][v].median_ms,
                "busy": any(t[v].busy for t in timed.values())} for v, f in files.items()}


def tolerance(images: int) -> float:
    return max(RECOMMENDATION_TOLERANCE, 1.0 / max(images, 1))


def acceptable(found: dict) -> list[str]:
    """The variants within the tolerance of float32's selection accuracy."""
    floor = found["float32"]["selection_accuracy"] - tolerance(
        found["float32"]["selection_images"]) - 1e-12
    return [v for v, c in found.items() if c["selection_accuracy"] >= floor]


def recommend(config: Config, task, found: dict) -> dict:
    """The fastest and the smallest acceptable variant, with the figures
    they were chosen on.  The fastest is ranked at 1 thread among the files
    no slower than float32 with every core (within `ALL_CORES_MARGIN`): a
    dynamic-range file's hybrid kernels ran 5-9x slower than float32 on 2
    threads of the quickstart's machine while faster on one
    (docs/platform_notes.md, L6)."""
    ok = acceptable(found)
    parallel = found["float32"].get("latency_ms_all_cores")
    scales = [v for v in ok if parallel is None or found[v].get(
        "latency_ms_all_cores", parallel) <= ALL_CORES_MARGIN * parallel]
    fastest = min(scales, key=lambda v: (found[v]["latency_ms"], found[v]["bytes"]))
    smallest = min(ok, key=lambda v: (found[v]["bytes"], found[v]["latency_ms"]))
    split = {"val": "validation", "test": "test"}[data_lib.selection_split(
        task, config.selection_split)]
    logging.info("%s: recommended file: %s (%.3f ms, %s accuracy %.4f against float32's "
                 "%.4f); smallest within the tolerance: %s (%.2f MB)", task.name, fastest,
                 found[fastest]["latency_ms"], split, found[fastest]["selection_accuracy"],
                 found["float32"]["selection_accuracy"], smallest,
                 found[smallest]["bytes"] / 1e6)
    return {"recommended": fastest, "smallest": smallest, "selection_split": split,
            "tolerance": tolerance(found["float32"]["selection_images"]),
            "acceptable": ok, "no_slower_with_every_core": scales, "candidates": found}


def bundle_variant(choices: dict[str, dict | None]) -> str:
    """The variant a bundle of these tasks is built in ({task: `recommend`'s
    answer}): among the variants every task accepts that a bundle can hold,
    the fastest over all tasks (the sum of their latencies at 1 thread) of
    those no slower than float32 with every core; float32 when they share
    none but it, or a task has no answer."""
    if not choices or any(c is None for c in choices.values()):
        return "float32"
    shared = set(BUNDLE_VARIANTS)
    for choice in choices.values():
        shared &= set(choice.get("no_slower_with_every_core", choice["acceptable"]))
    shared.add("float32")
    return min(shared, key=lambda v: sum(
        c["candidates"][v]["latency_ms"] for c in choices.values()))

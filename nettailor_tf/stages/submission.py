"""The `submission` stage: the pruned network's predictions for the Visual
Decathlon's unlabelled test split, and the challenge's results file.

Per task it writes ``<workdir>/<task>/decathlon_test_predictions.json``
({image id: label}, with the domain and its category ids); once every task
has one, ``<workdir>/decathlon_results.json`` holds them all in the format
the challenge's server takes.  The paper's decathlon runs train one domain
per workdir; ``python -m nettailor_tf.decathlon_results`` merges the files of
several workdirs into one results file.

The predictions come from the same Keras network, and the same evaluation
transform, as the accuracy the finetune stage reports on the validation split.
"""
from __future__ import annotations

import os
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from nettailor_tf import decathlon
from nettailor_tf import data as data_lib
from nettailor_tf.run import artifacts
from nettailor_tf.run.report import Report
from nettailor_tf.run.workdir import Workdir
from nettailor_tf.settings.config import Config
from nettailor_tf.stages import deploy

def predictions_path(config: Config, task) -> str:
    return Workdir(config.workdir).decathlon_predictions(task.name)


def results_path(config: Config) -> str:
    return Workdir(config.workdir).decathlon_results


def _predict(config: Config, task, model, image_ids: dict[str, int]) -> dict[int, int]:
    """{image id: predicted label} over the whole test split."""
    split, size = data_lib.decathlon_test_split(task.spec, config.data_dir)
    batches = data_lib.keyed_eval_pipeline(split, task.augment, config.image_size,
                                           config.eval_batch_size)
    top1 = tf.function(lambda images: tf.argmax(model(images, training=False), axis=-1),
                       reduce_retracing=True)
    predictions: dict[int, int] = {}
    progress = keras.utils.Progbar(size, unit_name="image") if sys.stderr.isatty() else None
    for images, names in batches:
        for name, label in zip(names.numpy(), top1(images).numpy()):
            name = name.decode("utf-8")
            if name not in image_ids:
                raise artifacts.StageError(
                    f"{task.name}: test image {name!r} is not in the annotation file; the "
                    f"prepared TFDS data and --decathlon_annotations come from different "
                    f"devkit versions")
            predictions[image_ids[name]] = int(label)
        if progress is not None:
            progress.add(len(names))
    missing = len(image_ids) - len(predictions)
    if missing:
        raise artifacts.StageError(
            f"{task.name}: {missing} of the annotation file's {len(image_ids)} test images are "
            f"not in the TFDS test split ({len(predictions)} images); prepare the dataset from "
            f"the same devkit as --decathlon_annotations")
    return predictions


def run_submission(config: Config, strategy, task, report: Report) -> bool:
    """Writes <task>/decathlon_test_predictions.json from the pruned network."""
    del strategy  # one pass over the test split, on the default device
    domain = decathlon.task_domain(task.spec)
    annotation_file = decathlon.stripped_test_annotations(config.decathlon_annotations, domain)
    inputs = deploy.trained_files(config, task, teacher=False)
    # What the predictions depend on: the pruned network, the annotation file
    # and the settings that change the pixels the network sees.
    fingerprint = deploy.file_fingerprint(
        inputs + [annotation_file], {"image_size": config.image_size, "augment": task.augment,
                                     "backbone_weights": config.backbone_weights})
    path = predictions_path(config, task)
    if os.path.exists(path):
        try:
            earlier = decathlon.read_task_predictions(path)
        except ValueError:
            earlier = None  # unreadable: predict again
        if earlier is not None and earlier.fingerprint == fingerprint:
            _report(config, task, report, path, len(earlier.predictions))
            logging.info("%s: submission stage already done (%s); skipping", task.name, path)
            return True
    try:
        annotations = decathlon.load_annotations(annotation_file)
    except ValueError as err:
        raise artifacts.StageError(str(err)) from None
    logging.info("%s: submission stage: predicting the %d test images of %s", task.name,
                 len(annotations.image_ids), os.path.basename(annotation_file))
    model = deploy.nettailor_endpoint(config, task).model
    predictions = _predict(config, task, model, annotations.image_ids)
    try:
        decathlon.write_task_predictions(path, domain, predictions, annotations.category_ids,
                                         fingerprint)
    except ValueError as err:  # e.g. the annotation file's categories do not fit the domain
        raise artifacts.StageError(f"{task.name}: {err}") from None
    _report(config, task, report, path, len(predictions))
    counts = np.bincount(list(predictions.values()), minlength=task.num_classes)
    logging.info("%s: wrote %d test predictions to %s (%d of %d classes predicted)", task.name,
                 len(predictions), path, int(np.count_nonzero(counts)), task.num_classes)
    return True


def _report(config: Config, task, report: Report, path: str, num_images: int) -> None:
    entry = {"path": os.path.relpath(path, config.workdir), "images": num_images}
    if report.get(task.name, "decathlon_test") != entry:
        report.set(task.name, "decathlon_test", entry)


def write_results(config: Config, tasks, report: Report) -> None:
    """<workdir>/decathlon_results.json from every task's predictions file."""
    out = results_path(config)
    try:
        records = decathlon.merge_task_predictions([predictions_path(config, t) for t in tasks],
                                                   out)
    except ValueError as err:
        raise artifacts.StageError(str(err)) from None
    domains = [decathlon.task_domain(t.spec) for t in tasks]
    missing = [d for d in decathlon.DOMAINS if d not in domains]
    report.data["decathlon_submission"] = {"path": os.path.relpath(out, config.workdir),
                                           "domains": sorted(domains), "images": len(records)}
    report.save()
    logging.info("decathlon results for %s: %s (%d images)%s", ", ".join(sorted(domains)), out,
                 len(records), f"; the challenge scores all ten domains, {len(missing)} missing: "
                 f"merge several workdirs with python -m nettailor_tf.decathlon_results"
                 if missing else "")

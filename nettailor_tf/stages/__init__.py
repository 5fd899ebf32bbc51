"""The stages of a run, each resumable and skipped once it is done.

A stage is done for a task when its result is in report.json AND its final
weights file exists; the weights are renamed into place before the report
entry is written, so a run killed in between just redoes the (checkpointed,
hence instant) end of that stage.
"""
from __future__ import annotations

import dataclasses
import json
import os

import keras
from absl import logging

from nettailor_tf import artifacts, atomic, train
from nettailor_tf import data as data_lib
from nettailor_tf.artifacts import StageError
from nettailor_tf.config import Config
from nettailor_tf.report import Report
from nettailor_tf.stages import deploy, submission
from nettailor_tf.stages.finetune import run_finetune
from nettailor_tf.stages.prune import run_prune
from nettailor_tf.stages.student import run_student
from nettailor_tf.stages.teacher import run_teacher
from nettailor_tf.workdir import Workdir

__all__ = ["StageError", "TRAINING_STAGES", "run"]

# The stages that train; the others export, measure or predict.
TRAINING_STAGES = {"teacher": run_teacher, "student": run_student, "prune": run_prune,
                   "finetune": run_finetune}


def record_split(config: Config, task) -> None:
    """Writes how the task's data was split into <task>/validation_split.json,
    and refuses a workdir whose tasks were split otherwise: its teacher,
    student and choices were made on other data."""
    record = {"selection_split": config.selection_split,
              "validation_fraction": config.validation_fraction if task.num_val else 0.0,
              "seed": config.seed, "num_train": task.num_train, "num_val": task.num_val,
              "num_test": task.num_test}
    path = Workdir(config.workdir).split_record(task.name)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                earlier = json.load(f)
            except json.JSONDecodeError:
                earlier = None
        if earlier is not None and earlier != record:
            changed = ", ".join(f"{k} {earlier.get(k)} -> {v}" for k, v in record.items()
                                if earlier.get(k) != v)
            raise StageError(f"{task.name}: this workdir's data was split differently "
                             f"({changed}); its results were trained and chosen on that split. "
                             f"Use a new --workdir, or the same --seed, --validation_fraction "
                             f"and --selection_split", path=path)
        if earlier == record:
            return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")


def run(config: Config, strategy) -> Report:
    """Runs the configured stages for every task, in order, skipping finished ones."""
    is_chief, worker = train.worker_role(strategy)
    if not is_chief:
        # Same computation, private files; exports are the chief's alone.
        config = dataclasses.replace(
            config, workdir=os.path.join(config.workdir, "workers", worker),
            stages=tuple(s for s in config.stages if s in TRAINING_STAGES))
        logging.info("multi-worker: %s writes to %s", worker, config.workdir)
    Workdir(config.workdir).check_settings(artifacts.architecture_settings(config))
    tasks = [data_lib.load_task(spec, config.data_dir, config.download) for spec in config.tasks]
    if config.selection_split == "validation":
        tasks = [data_lib.with_validation_split(t, config.validation_fraction, config.seed)
                 for t in tasks]
    for task in tasks:
        record_split(config, task)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise data_lib.DataError(f"--tasks: two tasks share a name: {', '.join(names)}")
    report = Report(config.workdir, config.backbone, config.image_size)
    for task in tasks:
        report.task(task.name)["num_classes"] = task.num_classes
    report.save()
    functions = {**TRAINING_STAGES, "export": deploy.run_export,
                 "benchmark": deploy.run_benchmark, "submission": submission.run_submission}
    # What a stage does once every task has been through it.
    finishers = {**deploy.BUNDLE_FINISHERS, "submission": submission.write_results}
    try:
        for stage in config.stages:
            # Mixed precision is for training; exported graphs are float32
            # (the TFLite variants quantise from there).
            training = stage in TRAINING_STAGES and config.mixed_precision
            keras.mixed_precision.set_global_policy("mixed_float16" if training else "float32")
            finished = [functions[stage](config, strategy, task, report) for task in tasks]
            if all(finished) and stage in finishers:
                finishers[stage](config, tasks, report)
            if not all(finished):
                # Later stages build on this one: stop here, the next run resumes.
                logging.info("stopping after the %s stage (interrupted by --max_steps)", stage)
                break
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return report


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
import time

import keras
from absl import logging

from nettailor_tf import data as data_lib
from nettailor_tf.common import atomic
from nettailor_tf.run import artifacts
from nettailor_tf.run import workdir as workdir_lib
from nettailor_tf.run.artifacts import StageError
from nettailor_tf.run.report import Report, findings
from nettailor_tf.run.workdir import Workdir, task_folder_name
from nettailor_tf.settings.config import Config
from nettailor_tf.settings.tuned import STAGE_WEIGHTS
from nettailor_tf.stages import benchmark, deploy, provenance, prune_search, submission
from nettailor_tf.stages.finetune import run_finetune
from nettailor_tf.stages.nettailor import cost_identity
from nettailor_tf.stages.prune import run_prune
from nettailor_tf.stages.student import run_student
from nettailor_tf.stages.teacher import run_teacher
from nettailor_tf.training import distribution, train

__all__ = ["StageError", "TRAINING_STAGES", "run"]

# The stages that train; the others export, measure or predict.
TRAINING_STAGES = {"teacher": run_teacher, "student": run_student, "prune": run_prune,
                   "finetune": run_finetune}


def check_data(config: Config, task, restart: bool) -> dict:
    """Writes what the task's data is, and how it was split, into
    tasks/<task>/data.json, and refuses a workdir whose task had other data or
    another split: its teacher, student and choices were made on that data
    (`restart`: the run starts over, so the new data is recorded instead).
    Returns the record."""
    record = {"selection_split": config.selection_split,
              "validation_fraction": config.validation_fraction if task.num_val else 0.0,
              "seed": config.seed, **data_lib.identity(task)}
    path = Workdir(config.workdir).data_record(task.name)
    if os.path.exists(path) and not restart:
        with open(path, encoding="utf-8") as f:
            try:
                earlier = json.load(f)
            except json.JSONDecodeError:
                earlier = None
        if isinstance(earlier, dict) and earlier != record:
            changed = ", ".join(
                f"{k} {_short(earlier.get(k))} -> {_short(v)}" for k, v in record.items()
                if earlier.get(k) != v)
            raise StageError(f"{task.name}: this workdir's data differs ({changed}); its "
                             f"results were trained and chosen on the data it recorded. Use a "
                             f"new --workdir, the same --seed, --validation_fraction and "
                             f"--selection_split, or --restart_from=teacher to redo every "
                             f"stage on this data", path=path)
        if earlier == record:
            return record
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")
    return record


def _short(value):
    """A fingerprint cut to what a person compares; other values as they are."""
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


def check_task_folders(tasks) -> None:
    """Refuses two tasks that would share a folder (or a report entry)."""
    folders = {}
    for task in tasks:
        folder = task_folder_name(task.name)
        if folder in folders:
            raise data_lib.DataError(f"--tasks: {folders[folder]!r} and {task.spec!r} would "
                                     f"share the task folder tasks/{folder}; give one of them "
                                     f"another name")
        folders[folder] = task.spec


def _restart(paths: Workdir, report: Report, tasks, stage: str) -> None:
    """--restart_from: removes what `stage` and every later stage made."""
    if stage == "benchmark":
        _forget_latencies(report, tasks)
        logging.info("--restart_from=benchmark: the exported files will be timed again")
        return
    later = provenance.TRAINING_ORDER[provenance.TRAINING_ORDER.index(stage):] \
        if stage in provenance.TRAINING_ORDER else ()
    for task in tasks:
        for each in later:
            provenance.invalidate(paths, report, task.name, each)
        if stage in later or stage == "export":
            workdir_lib.remove([paths.export_dir(task.name)])
    workdir_lib.remove([paths.bundle_dir])
    # The benchmark's predictions were timed beside the files removed here:
    # left in the report, they kept the next benchmark from measuring a table.
    _forget_latencies(report, tasks)
    logging.info("--restart_from=%s: removed what %s and the later stages made", stage, stage)


# What the benchmark stage adds to an export entry and to the bundle.
_LATENCY_KEYS = ("latency", "latency_ms", "latency_ms_all_cores")
_BUNDLE_BENCHMARK_KEYS = ("latency", "latency_other_load_cores", "memory_mb")
_PREDICTION_KEYS = ("predicted_latency_ms", "predicted_latency_measured_ms",
                    "predicted_latency_error", "predicted_latency_error_benchmark")


def _forget_latencies(report: Report, tasks) -> None:
    for task in tasks:
        for part in ("tflite", "teacher_tflite"):
            for entry in (report.get(task.name, part) or {}).values():
                for key in _LATENCY_KEYS:
                    entry.pop(key, None)
        for part in ("pruned", "teacher"):  # predicted beside those timings
            for key in _PREDICTION_KEYS:
                (report.get(task.name, part) or {}).pop(key, None)
    for key in _BUNDLE_BENCHMARK_KEYS:
        (report.data.get("bundle") or {}).pop(key, None)
    report.save()


# Stages that took less than this were skipped (already done): no pace to read.
_MIN_PACE_SECONDS = 5.0


def run_time_left(elapsed: float, done: tuple, remaining: tuple) -> float | None:
    """About how long the `remaining` stages take, at the pace the `done`
    ones set; None before any stage has really run."""
    if elapsed < _MIN_PACE_SECONDS or not done:
        return None
    pace = elapsed / sum(STAGE_WEIGHTS[s] for s in done)
    return pace * sum(STAGE_WEIGHTS[s] for s in remaining)


def run(config: Config, strategy) -> Report:
    """Runs the configured stages for every task, in order, skipping finished
    ones and redoing stale ones, with the workdir locked for the run."""
    is_chief, worker = distribution.worker_role(strategy)
    if not is_chief:
        # Same computation, private files; exports are the chief's alone.
        config = dataclasses.replace(
            config, workdir=os.path.join(config.workdir, "workers", worker),
            stages=tuple(s for s in config.stages if s in TRAINING_STAGES))
        logging.info("multi-worker: %s writes to %s", worker, config.workdir)
    paths = Workdir(config.workdir)
    with paths.lock():
        return _run_locked(config, strategy, paths)


def _run_locked(config: Config, strategy, paths: Workdir) -> Report:
    paths.check_settings(artifacts.architecture_settings(config))
    tasks = [data_lib.load_task(spec, config.data_dir, config.download) for spec in config.tasks]
    if config.selection_split == "validation":
        tasks = [data_lib.with_validation_split(t, config.validation_fraction, config.seed)
                 for t in tasks]
    check_task_folders(tasks)
    restart = config.restart_from is not None
    identities = {task.name: {"data": check_data(config, task, restart)["fingerprint"]}
                  for task in tasks}
    report = Report(config.workdir, config.backbone, config.image_size)
    for task in tasks:
        report.task(task.name)["num_classes"] = task.num_classes
    report.save()
    if restart:
        _restart(paths, report, tasks, config.restart_from)
    functions = {**TRAINING_STAGES, "export": deploy.run_export,
                 "benchmark": benchmark.run_benchmark, "submission": submission.run_submission}
    # What a stage does once every task has been through it.
    finishers = {"export": deploy.export_bundle, "benchmark": benchmark.benchmark_bundle,
                 "submission": submission.write_results}
    started = time.monotonic()
    try:
        for number, stage in enumerate(config.stages, 1):
            elapsed = time.monotonic() - started
            left = run_time_left(elapsed, config.stages[:number - 1], config.stages[number - 1:])
            logging.info("stage %d of %d: %s for %d task%s (%s into the run%s)", number,
                         len(config.stages), stage, len(tasks), "" if len(tasks) == 1 else "s",
                         train.format_duration(elapsed),
                         "" if left is None else f", about {train.format_duration(left)} left")
            # Mixed precision is for training; exported graphs are float32
            # (the TFLite variants quantise from there).
            training = stage in TRAINING_STAGES and config.mixed_precision
            keras.mixed_precision.set_global_policy("mixed_float16" if training else "float32")
            finished = []
            for task in tasks:
                identity = identities[task.name]
                if stage in TRAINING_STAGES:
                    identity = {**identity, **provenance.settings_identity(config, stage)}
                if stage == "student":  # the one stage the cost model trains
                    identity = {**identity, **cost_identity(config)}
                if stage == "prune":
                    identity = {**identity, **prune_search.latency_budget_input(config)}
                if stage in TRAINING_STAGES:
                    provenance.refresh(paths, report, task.name, stage, identity)
                finished.append(functions[stage](config, strategy, task, report))
                if finished[-1] and stage in TRAINING_STAGES:
                    provenance.record(paths, task.name, stage, identity)
            if all(finished) and stage in finishers:
                finishers[stage](config, tasks, report)
            if not all(finished):
                # Later stages build on this one: stop here, the next run resumes.
                logging.info("stopping after the %s stage (interrupted by --max_steps)", stage)
                break
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for task in tasks:
        for note in findings(report.task(task.name)):
            logging.warning("%s: %s", task.name, note)
    logging.info("%d stage%s done in %s", len(config.stages),
                 "" if len(config.stages) == 1 else "s",
                 train.format_duration(time.monotonic() - started))
    return report

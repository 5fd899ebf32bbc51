"""The stages of a run, each resumable and skipped once it is done.

A stage is done for a task when its result is in report.json AND its final
weights file exists; the weights are renamed into place before the report
entry is written, so a run killed in between just redoes the (checkpointed,
hence instant) end of that stage.
"""
from __future__ import annotations

import os
import tempfile

import keras
import tensorflow as tf
from absl import logging

from nettailor_tf import backbones as backbones_lib
from nettailor_tf import complexity
from nettailor_tf import data as data_lib
from nettailor_tf.config import Config
from nettailor_tf.report import Report
from nettailor_tf.train import Trainer


def task_dir(config: Config, task: data_lib.TaskData) -> str:
    return os.path.join(config.workdir, task.name.replace("/", "_"))


def teacher_weights_path(config: Config, task: data_lib.TaskData) -> str:
    return os.path.join(task_dir(config, task), "teacher.weights.h5")


def save_weights_atomically(model: keras.Model, path: str) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".weights.h5")
    os.close(fd)
    try:
        model.save_weights(tmp, overwrite=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_teacher(config: Config, num_classes: int, pretrained: bool = True) -> tuple:
    """A whole backbone with a fresh `num_classes` classifier: (model, backbone)."""
    backbone = backbones_lib.build_backbone(config.backbone)
    if pretrained and config.backbone_weights != "random":
        backbones_lib.load_backbone_weights(backbone, config.backbone_weights)
    model = backbones_lib.classifier_model(backbone, num_classes, name="teacher")
    return model, backbone


def cross_entropy(logits, labels):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def run_teacher(config: Config, strategy, task: data_lib.TaskData, report: Report) -> None:
    """Fine-tunes the whole pretrained backbone with a new head: the accuracy
    reference and the source of the student's mimic targets."""
    weights_path = teacher_weights_path(config, task)
    if report.get(task.name, "teacher") and os.path.exists(weights_path):
        logging.info("%s: teacher stage already done (%s); skipping", task.name, weights_path)
        return
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model, backbone = build_teacher(config, task.num_classes)

    def loss_fn(images, labels, training):
        logits, _ = model(images, training=training)
        loss = cross_entropy(logits, labels)
        return loss, logits, {}

    trainer = Trainer(
        strategy, model, loss_fn, model.trainable_variables, model.trainable_variables,
        config.teacher, checkpoint_dir=os.path.join(task_dir(config, task), "teacher_ckpt"),
        summary_dir=os.path.join(config.workdir, "tensorboard", task.name, "teacher"),
        jit_compile=config.jit_compile, checkpoint_every=config.checkpoint_every,
        log_every=config.log_every)
    logging.info("%s: teacher stage: fine-tuning %s (%d train / %d test images, %d classes)",
                 task.name, config.backbone, task.num_train, task.num_test, task.num_classes)
    result = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                         max_steps=config.max_steps)
    total = data_lib.steps_per_epoch(task, config.teacher.batch_size) * config.teacher.epochs
    if result.steps < total:
        logging.info("%s: teacher stopped at step %d of %d (--max_steps); re-run to resume",
                     task.name, result.steps, total)
        return
    save_weights_atomically(model, weights_path)
    report.task(task.name)["num_classes"] = task.num_classes
    report.set(task.name, "teacher", {
        "accuracy": result.test_accuracy,
        "params": backbones_lib.count_params(model.layers),
        "flops": complexity.classifier_flops(backbone, config.image_size, task.num_classes),
        "epochs": config.teacher.epochs,
        "steps": result.steps,
        "train_images_per_second": result.train_images_per_second,
        "weights": os.path.relpath(weights_path, config.workdir),
    })
    logging.info("%s: teacher test accuracy %.4f", task.name, result.test_accuracy)


STAGE_FUNCTIONS = {"teacher": run_teacher}


def run(config: Config, strategy) -> Report:
    """Runs the configured stages for every task, in order, skipping finished ones."""
    os.makedirs(config.workdir, exist_ok=True)
    tasks = [data_lib.load_task(spec, config.data_dir, config.download) for spec in config.tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise data_lib.DataError(f"--tasks: two tasks share a name: {', '.join(names)}")
    report = Report(config.workdir, config.backbone, config.image_size)
    for task in tasks:
        report.task(task.name)["num_classes"] = task.num_classes
    report.save()
    for stage in config.stages:
        for task in tasks:
            STAGE_FUNCTIONS[stage](config, strategy, task, report)
    return report

"""The teacher stage: the whole pretrained network fine-tuned on the task."""
from __future__ import annotations

import os

import keras
from absl import logging

from nettailor_tf import data as data_lib
from nettailor_tf.common import atomic
from nettailor_tf.model import complexity
from nettailor_tf.model import backbones as backbones_lib
from nettailor_tf.model.losses import cross_entropy
from nettailor_tf.run import artifacts
from nettailor_tf.run.report import Report
from nettailor_tf.run.workdir import Workdir
from nettailor_tf.settings.config import Config
from nettailor_tf.stages.nettailor import or_none, training_outcome
from nettailor_tf.training.train import Trainer


def save_weights_atomically(model: keras.Model, path: str) -> None:
    """model.save_weights through a temporary file and a rename."""
    with atomic.replacing_file(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp, overwrite=True)


def run_teacher(config: Config, strategy, task: data_lib.TaskData, report: Report) -> bool:
    """Fine-tunes the whole pretrained backbone with a new head: the accuracy
    reference and the source of the student's mimic targets."""
    paths = Workdir(config.workdir)
    weights_path = paths.teacher_weights(task.name)
    if report.get(task.name, "teacher") and os.path.exists(weights_path):
        logging.info("%s: teacher stage already done (%s); skipping", task.name, weights_path)
        return True
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model, backbone = artifacts.build_teacher(config, task.num_classes)

    def loss_fn(images, labels, training):
        logits, _ = model(images, training=training)
        loss = cross_entropy(logits, labels)
        return loss, logits, {}

    trainer = Trainer(
        strategy, model, loss_fn, model.trainable_variables, model.trainable_variables,
        config.teacher, checkpoint_dir=paths.checkpoints(task.name, "teacher"),
        summary_dir=paths.tensorboard(task.name, "teacher"),
        jit_compile=config.jit_compile, checkpoint_every=config.checkpoint_every,
        log_every=config.log_every)
    logging.info("%s: teacher stage: fine-tuning %s (%d train / %d test images, %d classes)",
                 task.name, config.backbone, task.num_train, task.num_test, task.num_classes)
    result = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                         max_steps=config.max_steps)
    if not result.complete:
        logging.info("%s: teacher stopped at step %d of %d (--max_steps); re-run to resume",
                     task.name, result.steps, result.total_steps)
        return False
    save_weights_atomically(model, weights_path)
    report.task(task.name)["num_classes"] = task.num_classes
    report.set(task.name, "teacher", {
        "accuracy": result.test_accuracy, "val_accuracy": or_none(result.val_accuracy),
        "params": backbones_lib.count_params(model.layers),
        "flops": complexity.classifier_flops(backbone, config.image_size, task.num_classes),
        "epochs": result.epochs,
        "steps": result.steps,
        **training_outcome(result),
        "train_images_per_second": result.train_images_per_second,
        "weights": paths.relative(weights_path),
    })
    logging.info("%s: teacher test accuracy %.4f", task.name, result.test_accuracy)
    return True



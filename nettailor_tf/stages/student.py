"""The student stage: proxies, gates and classifier over the frozen universal blocks."""
from __future__ import annotations

import os

import keras
from absl import logging

from nettailor_tf.model import pruning
from nettailor_tf.model import gates as gates_lib
from nettailor_tf.run import artifacts
from nettailor_tf.run.report import Report
from nettailor_tf.run.workdir import Workdir
from nettailor_tf.settings.config import Config
from nettailor_tf.stages.nettailor import gate_values, or_none, train_nettailor, training_outcome


def run_student(config: Config, strategy, task, report: Report) -> bool:
    """Trains proxies, gates and classifier over the frozen universal blocks
    with CE + complexity + mimic of the teacher."""
    state_path = Workdir(config.workdir).student_state(task.name)
    if report.get(task.name, "student") and os.path.exists(state_path):
        logging.info("%s: student stage already done (%s); skipping", task.name, state_path)
        return True
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        teacher = artifacts.frozen_teacher(config, task)
        backbone = artifacts.universal_backbone(config)
        student = artifacts.full_student(config, task.num_classes, backbone)
    logging.info("%s: student stage: %d universal blocks, %d proxies (max_skip=%s)", task.name,
                 len(backbone.blocks), student.plan.counts()["proxies_kept"], config.max_skip)
    complexity_coeff = (backbone.complexity_coeff if config.complexity_coeff is None
                        else config.complexity_coeff)
    result = train_nettailor(config, strategy, task, student, teacher, config.student,
                             complexity_coeff, "student")
    if result is None:
        return False
    pruning.save_task_state(student, state_path)
    sharpness = gates_lib.sharpness(gate_values(student))
    report.set(task.name, "student", {
        "accuracy": result.test_accuracy, "val_accuracy": or_none(result.val_accuracy),
        "gates": gate_values(student), "gate_entropy": sharpness["mean_normalized_entropy"],
        "gate_entropy_per_block": sharpness["normalized_entropy"],
        "max_skip": config.max_skip, "universal_bn": config.universal_bn,
        "complexity_loss": "exact" if config.complexity_exact else "published",
        "complexity_coeff": complexity_coeff,
        "epochs": result.epochs, "steps": result.steps,
        **training_outcome(result),
        "train_images_per_second": result.train_images_per_second,
    })
    logging.info("%s: student test accuracy %.4f, gate entropy %.3f (0: decisive, 1: uniform)",
                 task.name, result.test_accuracy, sharpness["mean_normalized_entropy"])
    return True



"""The networks a run builds and hands from stage to stage.

The universal (pretrained) backbone, the fine-tuned teacher, the trained
student: each built from the configuration and the workdir's files, or a
`StageError` that names the stage that makes the missing file.  Stages,
exporters, the submission and the benchmarks all get them from here.
"""
from __future__ import annotations

import os

import keras
from absl import logging

from nettailor_tf.common import atomic
from nettailor_tf.common.errors import NetTailorError
from nettailor_tf.latency import measure
from nettailor_tf.latency import table as latency_table_lib
from nettailor_tf.model import pruning, student_network
from nettailor_tf.model import backbones as backbones_lib
from nettailor_tf.model import pretrained as weights_lib
from nettailor_tf.run.workdir import Workdir, fingerprint
from nettailor_tf.settings.config import Config, ConfigError


class StageError(NetTailorError, RuntimeError):
    """A stage cannot start (e.g. the stage it builds on has not run)."""


def check_backbone_settings(config: Config) -> None:
    """The checks of `Config.validate` that need the backbone itself."""
    if (config.backbone_weights == "imagenet" and config.backbone
            not in backbones_lib.PACKAGED_IMAGENET + backbones_lib.DOWNLOADED_IMAGENET):
        raise ConfigError(
            f"--backbone_weights=imagenet: no packaged ImageNet weights for {config.backbone} "
            f"(packaged: {', '.join(backbones_lib.PACKAGED_IMAGENET)}); pass a weights file or "
            f"'random'", flag="backbone_weights")
    backbone = backbones_lib.build_backbone(config.backbone)
    minimum = backbone.min_image_size
    if config.image_size < minimum:
        raise ConfigError(f"--image_size={config.image_size} is too small for {config.backbone}: "
                          f"its blocks reduce the image {minimum}x, so use >= {minimum}",
                          flag="image_size")
    num_blocks = len(backbone.blocks)
    if config.prune_universal is not None and config.prune_universal > num_blocks:
        raise ConfigError(f"--prune_universal={config.prune_universal} must be in "
                          f"[0, {num_blocks}] for {config.backbone}", flag="prune_universal")


def architecture_settings(config: Config) -> dict:
    """The settings every network in a workdir is built with, the universal
    weights' content included: a workdir holds the results of one set of
    them (`Workdir.check_settings`)."""
    weights = backbone_weights_file(config)
    if weights == "imagenet" and config.backbone in backbones_lib.PACKAGED_IMAGENET:
        weights = weights_lib.packaged_weights_path(config.backbone)
    return {"backbone": config.backbone, "backbone_weights": config.backbone_weights,
            "image_size": config.image_size,
            "max_skip": "dense" if config.max_skip is None else config.max_skip,
            "universal_bn": config.universal_bn,
            "universal_weights_sha256": fingerprint(weights) or weights}


def backbone_weights_file(config: Config) -> str:
    """The file the universal weights come from.

    With --backbone_weights=random the random initial weights are drawn once
    (from --seed) and kept in the workdir: every stage and every task must
    see the same universal blocks, or the student would be trained on one
    backbone and exported with another, and no two tasks could share one.
    """
    if config.backbone_weights != "random":
        return config.backbone_weights
    path = Workdir(config.workdir).random_backbone
    if not os.path.exists(path):
        keras.utils.set_random_seed(config.seed)
        backbone = backbones_lib.build_backbone(config.backbone)
        with atomic.replacing_file(path, suffix=".weights.h5") as tmp:
            backbones_lib.save_backbone_weights(backbone, tmp)
    return path


def universal_backbone(config: Config) -> backbones_lib.Backbone:
    """A fresh copy of the pretrained (universal) backbone."""
    backbone = backbones_lib.build_backbone(config.backbone)
    backbones_lib.load_backbone_weights(backbone, backbone_weights_file(config))
    return backbone


def _read_only_universal_backbone(config: Config) -> backbones_lib.Backbone:
    """The universal backbone for a network whose task weights are then
    loaded or copied (so the random draws of building it do not matter).

    With --universal_bn=frozen such a network only reads the backbone (its
    layers are folded into copies), so one loaded instance per weights file
    serves the process: the prune search builds a dozen candidates.  With
    --universal_bn=task the network trains its BN statistics: a fresh copy.
    """
    if config.universal_bn != "frozen":
        return universal_backbone(config)
    path = backbone_weights_file(config)
    key = (config.backbone, path, fingerprint(path) if os.path.isfile(path) else path)
    if key not in _LOADED_BACKBONES:
        _LOADED_BACKBONES.clear()  # one at a time: a run uses one backbone
        _LOADED_BACKBONES[key] = universal_backbone(config)
    return _LOADED_BACKBONES[key]


_LOADED_BACKBONES: dict = {}


def build_teacher(config: Config, num_classes: int, pretrained: bool = True) -> tuple:
    """A whole backbone with a fresh `num_classes` classifier: (model, backbone)."""
    backbone = backbones_lib.build_backbone(config.backbone)
    if pretrained:
        backbones_lib.load_backbone_weights(backbone, backbone_weights_file(config))
    model = backbones_lib.classifier_model(backbone, num_classes, name="teacher")
    return model, backbone


def fine_tuned_teacher(config: Config, task) -> tuple:
    """The teacher stage's network with its trained weights: (model, backbone)."""
    path = Workdir(config.workdir).teacher_weights(task.name)
    if not os.path.exists(path):
        raise StageError(f"{task.name}: no teacher at {path}; run --stages=teacher first "
                         f"(with the same --workdir)", path=path)
    model, backbone = build_teacher(config, task.num_classes, pretrained=False)
    model.load_weights(path)
    return model, backbone


def frozen_teacher(config: Config, task) -> keras.Model:
    """The fine-tuned teacher in inference form (BN folded): the mimic targets."""
    model, backbone = fine_tuned_teacher(config, task)
    return backbones_lib.folded_classifier(backbone, model)


def full_student(config: Config, num_classes: int, backbone=None) -> student_network.Student:
    """An untrained student: every universal block and every proxy of --max_skip."""
    backbone = backbone or universal_backbone(config)
    plan = student_network.Plan.full(len(backbone.blocks), config.max_skip)
    return student_network.build_student(backbone, num_classes, plan, config.universal_bn,
                                     config.image_size)


def trained_student(config: Config, task) -> tuple:
    """The student stage's network with its trained task weights: (student, backbone)."""
    path = Workdir(config.workdir).student_state(task.name)
    if not os.path.exists(path):
        raise StageError(f"{task.name}: no trained student at {path}; run the student stage "
                         f"first (--stages=student)", path=path)
    backbone = _read_only_universal_backbone(config)
    student = full_student(config, task.num_classes, backbone)
    pruning.load_task_state(student, path)
    return student, backbone


def pruned_network(config: Config, task, plan) -> student_network.Student:
    """The network of a pruning `plan` over the universal blocks, before its
    task weights are copied or loaded into it."""
    return student_network.build_student(_read_only_universal_backbone(config), task.num_classes,
                                     plan, config.universal_bn, config.image_size)


def fine_tuned_network(config: Config, task) -> tuple:
    """The finetune stage's pruned network with its weights: (network, plan, plan info)."""
    paths = Workdir(config.workdir)
    for path in (paths.plan(task.name), paths.pruned_state(task.name)):
        if not os.path.exists(path):
            raise StageError(f"{task.name}: no {os.path.basename(path)} in "
                             f"{os.path.dirname(path)}; run the teacher, student, prune and "
                             f"finetune stages first (same --workdir)", path=path)
    plan, info = pruning.load_plan(paths.plan(task.name))
    network = pruned_network(config, task, plan)
    pruning.load_task_state(network, paths.pruned_state(task.name))
    return network, plan, info


# The latency tables this process has read or measured, by what they fit.
_LATENCY_TABLES: dict = {}


def latency_table(config: Config, threads: int | None = None):
    """The latency table of the run's backbone, image size and max_skip:
    --latency_table where given (measured on the target device), else this
    machine's, measured once and cached (`threads`: default
    --latency_threads; the benchmark stage's prediction asks for 1)."""
    threads = threads or config.latency_threads
    key = (config.latency_table, config.backbone, config.image_size, config.max_skip,
           threads if config.latency_table is None else None, config.latency_cache_dir)
    if key in _LATENCY_TABLES:
        return _LATENCY_TABLES[key]
    if config.latency_table is not None:
        table = latency_table_lib.LatencyTable.load(config.latency_table)
        table.check_fits(config.backbone, config.image_size, config.max_skip)
        logging.info("latency table: %s (%s, %d thread%s, %d entries)", table.source,
                     table.device, table.threads, "" if table.threads == 1 else "s",
                     len(table.entries))
    else:
        logging.info("latency table: %s at %d px, %d thread%s, on this machine", config.backbone,
                     config.image_size, threads, "" if threads == 1 else "s")
        table, cached = measure.cached_table(
            config.backbone, config.image_size, threads, config.max_skip,
            config.latency_cache_dir)
        logging.info("latency table: %s %s (fingerprint %s)", "read from" if cached else
                     "measured and kept in", table.source, table.fingerprint()[:12])
    _LATENCY_TABLES[key] = table
    return table

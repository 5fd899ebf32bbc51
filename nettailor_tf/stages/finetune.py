"""The finetune stage: the pruned network trained again, complexity off."""
from __future__ import annotations

import os

import keras
from absl import logging

from nettailor_tf.common import atomic
from nettailor_tf.model import complexity, pruning
from nettailor_tf.model import backbones as backbones_lib
from nettailor_tf.model.student_network import Plan
from nettailor_tf.run import artifacts
from nettailor_tf.run.report import Report
from nettailor_tf.run.workdir import Workdir
from nettailor_tf.settings.config import Config
from nettailor_tf.stages.nettailor import (gate_values, or_none, prepared_pruned_with_passes,
                                           train_nettailor, training_outcome)
from nettailor_tf.stages.prune_search import CONFIDENCE
from nettailor_tf.training import selection


def run_finetune(config: Config, strategy, task, report: Report) -> bool:
    """Trains the pruned network again: complexity off, fresh optimizer,
    gates still trainable (the paper)."""
    paths = Workdir(config.workdir)
    state_path = paths.pruned_state(task.name)
    if report.get(task.name, "pruned") and os.path.exists(state_path):
        logging.info("%s: finetune stage already done (%s); skipping", task.name, state_path)
        return True
    if not os.path.exists(paths.plan(task.name)):
        raise artifacts.StageError(f"{task.name}: no pruning plan at {paths.plan(task.name)}; "
                                   f"run the prune stage first (--stages=prune)",
                                   path=paths.plan(task.name))
    plan, info = pruning.load_plan(paths.plan(task.name))
    search = info.get("prune_search") or None
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        teacher = artifacts.frozen_teacher(config, task)
        full, _ = artifacts.trained_student(config, task)
    splits = ["test"] + (["val"] if task.num_val else [])
    # The trainer evaluates and re-estimates with the passes traced here.
    pruned, before, passes = prepared_pruned_with_passes(config, strategy, task, full, plan,
                                                         splits, raw_test=True)
    _reuse_search_checkpoint(paths, task, search)
    logging.info("%s: finetune stage: training the pruned network (%d universal blocks, "
                 "%d proxies); before fine-tuning: test accuracy %.4f (%.4f with the student's "
                 "BN statistics)", task.name, plan.counts()["universal_blocks_kept"],
                 plan.counts()["proxies_kept"], before["test"], before["raw_test"])
    result = train_nettailor(config, strategy, task, pruned, teacher, config.finetune, 0.0,
                             "finetune", pruned=True, passes=passes)
    if result is None:
        return False
    pruning.save_task_state(pruned, state_path)
    backbone = backbones_lib.build_backbone(config.backbone)  # geometry only
    cost = complexity.pruned_cost(backbone, plan, config.image_size, task.num_classes, pruned)
    report.set(task.name, "pruned", {
        "accuracy": result.test_accuracy, "val_accuracy": or_none(result.val_accuracy),
        "accuracy_before_finetune": before["test"],
        "val_accuracy_before_finetune": before.get("val"),
        "accuracy_before_finetune_student_bn": before["raw_test"],
        **cost, "gates": gate_values(pruned),
        "prune_search": None if search is None else search_summary(search),
        "vs_teacher": vs_teacher(config, task, teacher, pruned),
        "plan": paths.relative(paths.plan(task.name)),
        "weights": paths.relative(state_path),
        "epochs": result.epochs, "steps": result.steps,
        **training_outcome(result),
        **({"latency_cost": latency_cost(config, plan)}
           if config.complexity_cost == "latency" else {}),
    })
    teacher_flops = (report.get(task.name, "teacher") or {}).get("flops")
    predicted = report.get(task.name, "pruned").get("latency_cost")
    logging.info("%s: NetTailor test accuracy %.4f, %d multiply-adds%s%s", task.name,
                 result.test_accuracy, cost["flops"],
                 f" ({cost['flops'] / teacher_flops:.2f} of the teacher's)" if teacher_flops else "",
                 f", {predicted['predicted_ms']:.3f} ms by the latency table "
                 f"({predicted['fraction_of_teacher']:.2f} of the teacher's)" if predicted else "")
    return True


def search_summary(search: dict) -> dict:
    """The prune search's decision for the report: its rule, what it was
    held to and the chosen candidate's evidence (plan.json has every one)."""
    chosen = search["candidates"].get(str(search["chosen"]), {})
    keys = ("chosen", "rule", "split", "met", "allowance", "flops_budget", "latency_budget_ms")
    return {**{k: search.get(k) for k in keys},
            **{k: chosen[k] for k in ("damage", "flops_fraction", "predicted_ms") if k in chosen}}


def vs_teacher(config: Config, task, teacher, pruned) -> dict:
    """The pruned network against its teacher on the same images, per split:
    paired, so that the difference comes with how much the images vouch for
    (`selection.Paired`)."""
    answers = {}
    for name, network in (("teacher", lambda x: teacher(x, training=False)[0]),
                          ("pruned", lambda x: pruned(x, training=False, mimic=False)[0])):
        step = selection.answer_function(network)
        for split in ("val", "test") if task.num_val else ("test",):
            predicted, labels = selection.answers(step, task, config.image_size,
                                                  config.eval_batch_size, [split])
            answers[name, split] = predicted == labels
    return {split: selection.paired(answers["pruned", split], answers["teacher", split])
            .as_dict(CONFIDENCE) for split in {s for _, s in answers}}


def latency_cost(config, plan) -> dict:
    """What the run's latency table (the cost model the student was trained
    with) says the pruned network and the teacher take."""
    table = artifacts.latency_table(config)
    teacher_plan = Plan.backbone_only(len(plan.blocks))
    predicted, teacher = table.predict_ms(plan), table.predict_ms(teacher_plan)
    return {"predicted_ms": round(predicted, 5), "teacher_predicted_ms": round(teacher, 5),
            "fraction_of_teacher": round(predicted / teacher, 4), "threads": table.threads,
            "device": table.device, "table_fingerprint": table.fingerprint()}


def _reuse_search_checkpoint(paths: Workdir, task, search) -> None:
    """Starts the fine-tune where the chosen candidate's brief fine-tune of
    the prune search stopped: it ran the first steps of this very stage (same
    schedule, data order and starting weights)."""
    if not search or not search.get("steps_per_candidate"):
        return
    target = paths.checkpoints(task.name, "finetune")
    source = paths.prune_search_checkpoints(task.name, search["chosen"])
    candidate = search["candidates"].get(str(search["chosen"]), {})
    if os.path.isdir(target) or not os.path.isdir(source) or candidate.get("abandoned"):
        return
    atomic.copy_directory(source, target)
    logging.info("%s: fine-tuning resumes from the prune search's brief fine-tune (%s)",
                 task.name, source)



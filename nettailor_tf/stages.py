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

from nettailor_tf.errors import NetTailorError
from nettailor_tf import atomic
from nettailor_tf import backbones as backbones_lib
from nettailor_tf import complexity
from nettailor_tf import data as data_lib
from nettailor_tf import prune as prune_lib
from nettailor_tf import student as student_lib
from nettailor_tf import gates as gates_lib
from nettailor_tf import teacher_cache
from nettailor_tf import train, visualize
from nettailor_tf.config import Config
from nettailor_tf.losses import cross_entropy, mimic_loss
from nettailor_tf.report import Report
from nettailor_tf.train import Trainer


def task_dir(config: Config, task: data_lib.TaskData) -> str:
    return os.path.join(config.workdir, task.name.replace("/", "_"))


def teacher_weights_path(config: Config, task: data_lib.TaskData) -> str:
    return os.path.join(task_dir(config, task), "teacher.weights.h5")


def save_weights_atomically(model: keras.Model, path: str) -> None:
    with atomic.replacing_file(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp, overwrite=True)


def backbone_weights_file(config: Config) -> str:
    """The file the universal weights come from.

    With --backbone_weights=random the random initial weights are drawn once
    (from --seed) and kept in the workdir: every stage and every task must
    see the same universal blocks, or the student would be trained on one
    backbone and exported with another, and no two tasks could share one.
    """
    if config.backbone_weights != "random":
        return config.backbone_weights
    path = os.path.join(config.workdir, "random_backbone.weights.h5")
    if not os.path.exists(path):
        keras.utils.set_random_seed(config.seed)
        backbone = backbones_lib.build_backbone(config.backbone)
        with atomic.replacing_file(path, suffix=".weights.h5") as tmp:
            backbones_lib.save_backbone_weights(backbone, tmp)
    return path


def build_teacher(config: Config, num_classes: int, pretrained: bool = True) -> tuple:
    """A whole backbone with a fresh `num_classes` classifier: (model, backbone)."""
    backbone = backbones_lib.build_backbone(config.backbone)
    if pretrained:
        backbones_lib.load_backbone_weights(backbone, backbone_weights_file(config))
    model = backbones_lib.classifier_model(backbone, num_classes, name="teacher")
    return model, backbone


def run_teacher(config: Config, strategy, task: data_lib.TaskData, report: Report) -> bool:
    """Fine-tunes the whole pretrained backbone with a new head: the accuracy
    reference and the source of the student's mimic targets."""
    weights_path = teacher_weights_path(config, task)
    if report.get(task.name, "teacher") and os.path.exists(weights_path):
        logging.info("%s: teacher stage already done (%s); skipping", task.name, weights_path)
        return True
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
    if not result.complete:
        logging.info("%s: teacher stopped at step %d of %d (--max_steps); re-run to resume",
                     task.name, result.steps, result.total_steps)
        return False
    save_weights_atomically(model, weights_path)
    report.task(task.name)["num_classes"] = task.num_classes
    report.set(task.name, "teacher", {
        "accuracy": result.test_accuracy, "val_accuracy": _or_none(result.val_accuracy),
        "params": backbones_lib.count_params(model.layers),
        "flops": complexity.classifier_flops(backbone, config.image_size, task.num_classes),
        "epochs": result.epochs,
        "steps": result.steps,
        "train_images_per_second": result.train_images_per_second,
        "weights": os.path.relpath(weights_path, config.workdir),
    })
    logging.info("%s: teacher test accuracy %.4f", task.name, result.test_accuracy)
    return True


# --- NetTailor: student, prune, finetune ----------------------------------------

class StageError(NetTailorError, RuntimeError):
    """A stage cannot start (e.g. the stage it builds on has not run)."""


def student_state_path(config, task):
    return os.path.join(task_dir(config, task), "student.npz")


def plan_path(config, task):
    return os.path.join(task_dir(config, task), "plan.json")


def pruned_state_path(config, task):
    return os.path.join(task_dir(config, task), "nettailor.npz")


def _universal_backbone(config: Config):
    """A fresh copy of the pretrained (universal) backbone."""
    backbone = backbones_lib.build_backbone(config.backbone)
    backbones_lib.load_backbone_weights(backbone, backbone_weights_file(config))
    return backbone


def _frozen_teacher(config: Config, task):
    """The fine-tuned teacher in inference form (BN folded): the mimic targets."""
    path = teacher_weights_path(config, task)
    if not os.path.exists(path):
        raise StageError(f"{task.name}: no teacher at {path}; run --stages=teacher first "
                         f"(with the same --workdir)")
    model, backbone = build_teacher(config, task.num_classes, pretrained=False)
    model.load_weights(path)
    return backbones_lib.folded_classifier(backbone, model)


def _or_none(value: float):
    """JSON has no NaN: an accuracy that was not measured is null."""
    return None if value != value else value


def selection_accuracy(config: Config, entry: dict) -> float:
    """The accuracy choices are made on: validation, or test (the paper's protocol)."""
    return entry["accuracy"] if config.selection_split == "test" else entry["val_accuracy"]


def nettailor_loss(student, teacher, costs, complexity_coeff, teacher_coeff, exact,
                   mimic_normalized=False, targets=None):
    """CE + complexity + mimic of `teacher`, whose outputs come from `targets`
    (a `teacher_cache.TeacherTargets`, looked up by the batch's positions in
    the training split) where given."""
    live = student.live_blocks
    # The mimic term averages over the blocks it compares: a pruned network
    # keeps the student's balance between mimic and CE.
    num_blocks = len(live)

    def loss_fn(images, labels, training, indices=None):
        if targets is not None:
            teacher_logits, teacher_endpoints = targets.lookup(indices)
        else:
            teacher_logits, teacher_endpoints = teacher(images, training=False)
        logits, _, routed = student(images, training=training)
        ce = cross_entropy(logits, labels)
        mimic = mimic_loss(logits, routed, teacher_logits, teacher_endpoints, live, num_blocks,
                           mimic_normalized)
        terms = {"ce": ce, "mimic": mimic}
        total = ce + teacher_coeff * mimic
        if complexity_coeff:
            cost = complexity.expected_complexity(student.alphas(), costs, student.plan, exact)
            terms["complexity"] = cost
            total += complexity_coeff * cost
        return total, logits, terms

    return loss_fn


def _teacher_targets(config, strategy, task, teacher):
    """The teacher's targets computed once for the stage, where the task allows."""
    if not config.cache_teacher_targets:
        return None
    return teacher_cache.build(teacher, task, config.image_size, config.eval_batch_size,
                               strategy)


def _student_trainer(config, strategy, task, student, teacher, schedule, complexity_coeff,
                     name, targets=None, pruned: bool = False) -> Trainer:
    """The trainer of a NetTailor network: the student, or (`pruned`) a pruned
    network, which also trains its gates' masses."""
    backbone = backbones_lib.build_backbone(config.backbone)  # geometry only
    norm = complexity.universal_network_flops(backbone, config.image_size)
    costs = [[c / norm for c in row] for row in
             complexity.branch_flops(backbone, student.plan, config.image_size)]
    mimic_normalized = (backbone.mimic_normalized if config.mimic_normalized is None
                        else config.mimic_normalized)
    loss_fn = nettailor_loss(student, teacher, costs, complexity_coeff, config.teacher_coeff,
                             config.complexity_exact, mimic_normalized, targets)
    trainable, decayed = student.task_variables()
    if pruned:
        trainable += student.mass_variables()
    gates = {id(v) for v in student.gate_variables()}
    multipliers = [config.gate_lr_multiplier if id(v) in gates else 1.0 for v in trainable]
    return Trainer(
        strategy, student, loss_fn, trainable, decayed, schedule, lr_multipliers=multipliers,
        held=[] if config.gate_lr_decay else student.gate_variables(), indexed=targets is not None,
        checkpoint_dir=os.path.join(task_dir(config, task), f"{name}_ckpt"),
        summary_dir=os.path.join(config.workdir, "tensorboard", task.name, name),
        jit_compile=config.jit_compile, checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        predict_fn=lambda images: student(images, training=False, mimic=False)[0])


def _train_student(config, strategy, task, student, teacher, schedule, complexity_coeff,
                   name, pruned: bool = False) -> "train.TrainResult | None":
    """Trains to the end of `schedule`; None when --max_steps stopped it first."""
    targets = _teacher_targets(config, strategy, task, teacher)
    trainer = _student_trainer(config, strategy, task, student, teacher, schedule,
                               complexity_coeff, name, targets, pruned)
    result = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                         max_steps=config.max_steps)
    if not result.complete:
        logging.info("%s: %s stopped at step %d of %d (--max_steps); re-run to resume",
                     task.name, name, result.steps, result.total_steps)
        return None
    return result


def _gates(student) -> list[list[float]]:
    return [[round(float(a), 6) for a in alphas.numpy()] for alphas in student.alphas()]


def run_student(config: Config, strategy, task, report: Report) -> bool:
    """Trains proxies, gates and classifier over the frozen universal blocks
    with CE + complexity + mimic of the teacher."""
    state_path = student_state_path(config, task)
    if report.get(task.name, "student") and os.path.exists(state_path):
        logging.info("%s: student stage already done (%s); skipping", task.name, state_path)
        return True
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        teacher = _frozen_teacher(config, task)
        backbone = _universal_backbone(config)
        plan = student_lib.Plan.full(len(backbone.blocks), config.max_skip)
        student = student_lib.build_student(backbone, task.num_classes, plan,
                                            config.universal_bn, config.image_size)
    logging.info("%s: student stage: %d universal blocks, %d proxies (max_skip=%s)", task.name,
                 len(backbone.blocks), plan.counts()["proxies_kept"], config.max_skip)
    complexity_coeff = (backbone.complexity_coeff if config.complexity_coeff is None
                        else config.complexity_coeff)
    result = _train_student(config, strategy, task, student, teacher, config.student,
                            complexity_coeff, "student")
    if result is None:
        return False
    prune_lib.save_task_state(student, state_path)
    sharpness = gates_lib.sharpness(_gates(student))
    report.set(task.name, "student", {
        "accuracy": result.test_accuracy, "val_accuracy": _or_none(result.val_accuracy),
        "gates": _gates(student), "gate_entropy": sharpness["mean_normalized_entropy"],
        "gate_entropy_per_block": sharpness["normalized_entropy"],
        "max_skip": config.max_skip, "universal_bn": config.universal_bn,
        "complexity_loss": "exact" if config.complexity_exact else "published",
        "complexity_coeff": complexity_coeff,
        "epochs": result.epochs, "steps": result.steps,
        "train_images_per_second": result.train_images_per_second,
    })
    logging.info("%s: student test accuracy %.4f, gate entropy %.3f (0: decisive, 1: uniform)",
                 task.name, result.test_accuracy, sharpness["mean_normalized_entropy"])
    return True


def _trained_student(config, task):
    path = student_state_path(config, task)
    if not os.path.exists(path):
        raise StageError(f"{task.name}: no trained student at {path}; run the student stage "
                         f"first (--stages=student)")
    backbone = _universal_backbone(config)
    plan = student_lib.Plan.full(len(backbone.blocks), config.max_skip)
    student = student_lib.build_student(backbone, task.num_classes, plan, config.universal_bn,
                                        config.image_size)
    prune_lib.load_task_state(student, path)
    return student, backbone


def _search_checkpoint_dir(config, task, n: int) -> str:
    return os.path.join(task_dir(config, task), "prune_search", f"n{n}_ckpt")


def _search_prune_universal(config, strategy, task, report, student, alphas) -> dict:
    """The paper's sweep, automated: the largest N (leanest network) whose
    accuracy on the selection split stays within --prune_tolerance (at least
    one image of that split) of the teacher's, or of the student's where the
    student is the weaker.

    Two phases, cheapest first.  Candidates are first scored as pruning
    leaves them (BN statistics re-estimated, seconds each); accuracy falls as
    N grows, so after N=0 the gates' own answer is tried and the boundary
    found by bisection (about log2(L) candidates).  Fine-tuning only adds
    accuracy, so that boundary is safe but conservative: with
    --prune_search_steps, the candidates beyond it are then tried one by one
    after that many steps of the fine-tuning stage itself, until one misses.
    A brief fine-tune is the start of the final one, which resumes from the
    chosen candidate's checkpoint instead of redoing it, and a candidate still
    far below the target halfway is abandoned.  Each result is saved as soon
    as it is known, so an interrupted search resumes without redoing any.
    Returns what the search found, for plan.json.
    """
    teacher_accuracy = selection_accuracy(config, report.get(task.name, "teacher"))
    student_accuracy = selection_accuracy(config, report.get(task.name, "student"))
    split = "val" if config.selection_split == "validation" else "test"
    # Pruning cannot be asked to beat the student it starts from, and a
    # tolerance finer than one image of the selection split asks for
    # perfection: 0.5 points of digits' 145 validation images is 0.7 of one.
    reference = min(teacher_accuracy, student_accuracy)
    images = task.num_val if split == "val" else task.num_test
    tolerance = max(config.prune_tolerance, 1.0 / max(images, 1))
    target = reference - tolerance
    results_path = os.path.join(task_dir(config, task), "prune_search.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            results = {int(k): v for k, v in json.load(f).items()}
    teacher = None

    def accuracy_of(n: int, steps: int = 0) -> float | None:
        nonlocal teacher
        # A candidate scored as pruned is scored again when a brief
        # fine-tune is asked of it; one already fine-tuned (or abandoned) is not.
        if n not in results or (steps and "steps" not in results[n]):
            try:
                plan = prune_lib.prune_plan(student.plan, alphas, n,
                                            config.prune_proxy_threshold,
                                            config.prune_universal_threshold)
            except prune_lib.PruneError:
                return None
            if steps and teacher is None:
                frozen = _frozen_teacher(config, task)
                teacher = (frozen, _teacher_targets(config, strategy, task, frozen))
            results[n] = _score_candidate(config, strategy, task, student, plan, teacher, n,
                                          split, target, steps)
            atomic.write_text(results_path, json.dumps(results, indent=1) + "\n")
            logging.info("%s: prune search N=%d: %s accuracy %.4f%s (target %.4f)", task.name,
                         n, config.selection_split, results[n]["accuracy"],
                         (f" after {results[n]['steps']} steps"
                          + (" (abandoned halfway)" if results[n].get("abandoned") else ""))
                         if steps else " as pruned",
                         target)
        return results[n]["accuracy" if steps else "zero_shot_accuracy"]

    first = accuracy_of(0)
    low, high = 0, len(student.plan.blocks)
    # The gates' own answer goes first: the universal blocks the student
    # gives less than half of their block's output.  When they are right, the
    # bisection only has to confirm the boundary around it.
    mid = min(max(1, sum(float(a[0]) < 0.5 for a, b in zip(alphas, student.plan.blocks)
                         if b.universal)), high)
    while low < high:
        accuracy = accuracy_of(mid)
        if accuracy is not None and accuracy >= target:
            low = mid
        else:
            high = mid - 1
        mid = (low + high + 1) // 2
    met = first is not None and first >= target
    if met and config.prune_search_steps:
        # Past the zero-shot boundary: each further block cut is kept only if
        # a brief fine-tune brings it back to the target.
        while low < len(student.plan.blocks):
            accuracy = accuracy_of(low + 1, config.prune_search_steps)
            if accuracy is None or accuracy < target:
                break
            low += 1
    if not met:
        logging.warning("%s: prune search: no candidate reached the target %.4f (%s %.4f - "
                        "tolerance %.4f); even N=0 reads %s. Keeping N=0: the student's "
                        "universal blocks with its weak proxies removed", task.name, target,
                        "teacher" if reference == teacher_accuracy else "student", reference,
                        tolerance, "nothing" if first is None else f"{first:.4f}")
    return {"chosen": low, "target": target, "split": config.selection_split,
            "teacher_accuracy": teacher_accuracy, "student_accuracy": student_accuracy,
            "tolerance": tolerance,
            "met_tolerance": met, "steps_per_candidate": config.prune_search_steps,
            "candidates": {str(n): results[n] for n in sorted(results)}}


# A brief fine-tune still this far below the target halfway through is
# abandoned, a heuristic that trades a rare late recovery for time: a digits
# candidate with 8 universal blocks cut read 41% before fine-tuning, 64%
# after 40 steps and 92% after 80, so brief fine-tunes much shorter than the
# recovery are not worth finishing from that far below.
_ABANDON_MARGIN = 0.10


def _score_candidate(config, strategy, task, student, plan, teacher, n, split, target,
                     steps: int) -> dict:
    """A candidate's accuracy on `split` as pruned or after `steps` of
    fine-tuning; `teacher` is (frozen teacher, its targets)."""
    keras.utils.set_random_seed(config.seed)
    candidate, before = _prepared_pruned(config, strategy, task, student, plan, [split])
    entry = {"zero_shot_accuracy": before[split], **plan.counts()}
    if not steps:
        return {"accuracy": before[split], **entry}
    trainer = _student_trainer(config, strategy, task, candidate, teacher[0], config.finetune,
                               0.0, f"prune_search/n{n}", teacher[1], pruned=True)
    half = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                       max_steps=max(1, steps // 2))
    halfway = trainer.evaluate(task, config.image_size, config.eval_batch_size, split)
    if config.max_steps is not None and half.steps >= config.max_steps:
        raise _Interrupted()
    if halfway < target - _ABANDON_MARGIN:
        return {"accuracy": halfway, "abandoned": True, "steps": half.steps, **entry}
    result = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                         max_steps=min(steps, config.max_steps or steps))
    if result.steps < steps and not result.complete:
        raise _Interrupted()
    accuracy = trainer.evaluate(task, config.image_size, config.eval_batch_size, split)
    return {"accuracy": accuracy, "steps": result.steps, **entry}


class _Interrupted(Exception):
    """A brief fine-tune stopped at --max_steps: the search resumes next run."""


def run_prune(config: Config, strategy, task, report: Report) -> bool:
    """Cuts weak universal blocks and proxies, then every dead path; saves the plan."""
    path = plan_path(config, task)
    if os.path.exists(path):
        if report.get(task.name, "architecture_png") is None:
            # Killed after the plan (the stage's commit point) was written but
            # before its drawing was: draw it now from the same inputs.
            plan, _ = prune_lib.load_plan(path)
            student, backbone = _trained_student(config, task)
            _draw_architecture(config, task, report, student, plan, backbone)
        logging.info("%s: prune stage already done (%s); skipping", task.name, path)
        return True
    logging.info("%s: prune stage: reading the student's gates", task.name)
    student, backbone = _trained_student(config, task)
    alphas = [a.numpy() for a in student.alphas()]
    search = None
    if config.searches_prune:
        try:
            search = _search_prune_universal(config, strategy, task, report, student, alphas)
        except _Interrupted:
            logging.info("%s: prune search interrupted (--max_steps); re-run to resume",
                         task.name)
            return False
        num_universal = search["chosen"]
        logging.info("%s: prune search chose N=%d", task.name, num_universal)
    else:
        num_universal = config.prune_universal or 0
    pruned = prune_lib.prune_plan(student.plan, alphas, num_universal,
                                  config.prune_proxy_threshold, config.prune_universal_threshold)
    counts = pruned.counts()
    prune_lib.save_plan(path, pruned, backbone=config.backbone,
                        backbone_weights=config.backbone_weights, image_size=config.image_size,
                        universal_blocks=[l for l, b in enumerate(pruned.blocks) if b.universal],
                        prune_universal=num_universal,
                        prune_proxy_threshold=config.prune_proxy_threshold,
                        prune_universal_threshold=config.prune_universal_threshold,
                        prune_search=search, gates=_gates(student), **counts)
    png = _draw_architecture(config, task, report, student, pruned, backbone)
    logging.info("%s: pruned to %d universal blocks and %d proxies (%d live blocks of %d); "
                 "architecture drawn in %s", task.name, counts["universal_blocks_kept"],
                 counts["proxies_kept"], counts["blocks_live"], len(pruned.blocks), png)
    return True


def _draw_architecture(config, task, report, student, pruned, backbone) -> str:
    """architecture.png (the student's gates, what pruning kept) and its report entry."""
    png = os.path.join(task_dir(config, task), "architecture.png")
    visualize.plot_architecture(
        png, f"{task.name}: NetTailor on {config.backbone} (max_skip={config.max_skip})",
        student.plan, _gates(student), kept_plan=pruned,
        block_flops=complexity.backbone_flops(backbone, config.image_size)["blocks"])
    report.task(task.name)["architecture_png"] = os.path.relpath(png, config.workdir)
    report.save()
    return png


def run_finetune(config: Config, strategy, task, report: Report) -> bool:
    """Trains the pruned network again: complexity off, fresh optimizer,
    gates still trainable (the paper)."""
    state_path = pruned_state_path(config, task)
    if report.get(task.name, "pruned") and os.path.exists(state_path):
        logging.info("%s: finetune stage already done (%s); skipping", task.name, state_path)
        return True
    if not os.path.exists(plan_path(config, task)):
        raise StageError(f"{task.name}: no pruning plan at {plan_path(config, task)}; run the "
                         f"prune stage first (--stages=prune)")
    plan, info = prune_lib.load_plan(plan_path(config, task))
    search = info.get("prune_search") or None
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        teacher = _frozen_teacher(config, task)
        full, _ = _trained_student(config, task)
    splits = ["test"] + (["val"] if task.num_val else [])
    pruned, before = _prepared_pruned(config, strategy, task, full, plan, splits,
                                      raw_test=True)
    _reuse_search_checkpoint(config, task, search)
    logging.info("%s: finetune stage: training the pruned network (%d universal blocks, "
                 "%d proxies); before fine-tuning: test accuracy %.4f (%.4f with the student's "
                 "BN statistics)", task.name, plan.counts()["universal_blocks_kept"],
                 plan.counts()["proxies_kept"], before["test"], before["raw_test"])
    result = _train_student(config, strategy, task, pruned, teacher, config.finetune, 0.0,
                            "finetune", pruned=True)
    if result is None:
        return False
    prune_lib.save_task_state(pruned, state_path)
    backbone = backbones_lib.build_backbone(config.backbone)  # geometry only
    cost = prune_lib.pruned_cost(backbone, plan, config.image_size, task.num_classes, pruned)
    report.set(task.name, "pruned", {
        "accuracy": result.test_accuracy, "val_accuracy": _or_none(result.val_accuracy),
        "accuracy_before_finetune": before["test"],
        "val_accuracy_before_finetune": before.get("val"),
        "accuracy_before_finetune_student_bn": before["raw_test"],
        **cost, "gates": _gates(pruned),
        "prune_search": None if search is None else {
            k: search[k] for k in ("chosen", "target", "split", "met_tolerance")},
        "plan": os.path.relpath(plan_path(config, task), config.workdir),
        "weights": os.path.relpath(state_path, config.workdir),
        "epochs": result.epochs, "steps": result.steps,
    })
    teacher_flops = (report.get(task.name, "teacher") or {}).get("flops")
    logging.info("%s: NetTailor test accuracy %.4f, %d multiply-adds%s", task.name,
                 result.test_accuracy, cost["flops"],
                 f" ({cost['flops'] / teacher_flops:.2f} of the teacher's)" if teacher_flops else "")
    return True


def _prepared_pruned(config, strategy, task, student, plan, splits, raw_test=False):
    """The pruned network of `plan` as fine-tuning starts from it: the
    student's task weights (each gate keeping its surviving share), BN
    statistics re-estimated on the pruned stream; and its accuracy on
    `splits` ('raw_test': on the test split before the re-estimation).

    Pruning changes what reaches each surviving branch, so the statistics
    collected on the unpruned stream no longer describe it: on the
    quickstart's digits this step alone moved a pruned network from 18% to
    41% before any training.
    """
    with strategy.scope():
        pruned = student_lib.build_student(_universal_backbone(config), task.num_classes, plan,
                                           config.universal_bn, config.image_size)
        student_lib.copy_task_weights(student, pruned)
    evaluate = train.make_evaluator(
        strategy, lambda images: pruned(images, training=False, mimic=False)[0])
    accuracies = {}
    if raw_test:
        accuracies["raw_test"] = evaluate(task, config.image_size, config.eval_batch_size, "test")
    batches = data_lib.train_pipeline(task, config.image_size, config.finetune.batch_size,
                                      epoch=0, seed=config.seed)
    student_lib.recalibrate_batchnorm(pruned, batches.take(_RECALIBRATION_BATCHES))
    for split in splits:
        accuracies[split] = evaluate(task, config.image_size, config.eval_batch_size, split)
    return pruned, accuracies


# Enough images for stable per-channel moments (about 1,000), few enough to
# cost a second or two.
_RECALIBRATION_BATCHES = 32


def _reuse_search_checkpoint(config, task, search) -> None:
    """Starts the fine-tune where the chosen candidate's brief fine-tune of
    the prune search stopped: it ran the first steps of this very stage (same
    schedule, data order and starting weights)."""
    if not search or not search.get("steps_per_candidate"):
        return
    target = os.path.join(task_dir(config, task), "finetune_ckpt")
    source = _search_checkpoint_dir(config, task, search["chosen"])
    candidate = search["candidates"].get(str(search["chosen"]), {})
    if os.path.isdir(target) or not os.path.isdir(source) or candidate.get("abandoned"):
        return
    atomic.copy_directory(source, target)
    logging.info("%s: fine-tuning resumes from the prune search's brief fine-tune (%s)",
                 task.name, source)


def _record_split(config: Config, task) -> None:
    """Writes how the task's data was split into <task>/validation_split.json,
    and refuses a workdir whose tasks were split otherwise: its teacher,
    student and choices were made on other data."""
    record = {"selection_split": config.selection_split,
              "validation_fraction": config.validation_fraction if task.num_val else 0.0,
              "seed": config.seed, "num_train": task.num_train, "num_val": task.num_val,
              "num_test": task.num_test}
    path = os.path.join(task_dir(config, task), "validation_split.json")
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
                             f"and --selection_split")
        if earlier == record:
            return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")


STAGE_FUNCTIONS = {"teacher": run_teacher, "student": run_student, "prune": run_prune,
                   "finetune": run_finetune}


def run(config: Config, strategy) -> Report:
    """Runs the configured stages for every task, in order, skipping finished ones."""
    is_chief, worker = train.worker_role(strategy)
    if not is_chief:
        # Same computation, private files; exports are the chief's alone.
        config = dataclasses.replace(
            config, workdir=os.path.join(config.workdir, "workers", worker),
            stages=tuple(s for s in config.stages if s in STAGE_FUNCTIONS))
        logging.info("multi-worker: %s writes to %s", worker, config.workdir)
    os.makedirs(config.workdir, exist_ok=True)
    tasks = [data_lib.load_task(spec, config.data_dir, config.download) for spec in config.tasks]
    if config.selection_split == "validation":
        tasks = [data_lib.with_validation_split(t, config.validation_fraction, config.seed)
                 for t in tasks]
    for task in tasks:
        _record_split(config, task)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise data_lib.DataError(f"--tasks: two tasks share a name: {', '.join(names)}")
    report = Report(config.workdir, config.backbone, config.image_size)
    for task in tasks:
        report.task(task.name)["num_classes"] = task.num_classes
    report.save()
    from nettailor_tf import deploy, submission  # both build on this module

    functions = {**STAGE_FUNCTIONS, "export": deploy.run_export,
                 "benchmark": deploy.run_benchmark, "submission": submission.run_submission}
    # What a stage does once every task has been through it.
    finishers = {**deploy.BUNDLE_FINISHERS, "submission": submission.write_results}
    try:
        for stage in config.stages:
            # Mixed precision is for training; exported graphs are float32
            # (the TFLite variants quantise from there).
            training = stage in STAGE_FUNCTIONS and config.mixed_precision
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

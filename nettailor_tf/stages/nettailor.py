"""Training NetTailor networks: the loss and the trainer that the student,
the prune search and the fine-tune share, and the step from a student to a
pruned network ready to fine-tune."""
from __future__ import annotations

import dataclasses
from typing import Callable

from absl import logging

from nettailor_tf.run import artifacts
from nettailor_tf.model import complexity
from nettailor_tf.model import backbones as backbones_lib
from nettailor_tf import data as data_lib
from nettailor_tf.model import student_network
from nettailor_tf.training import teacher_cache, train
from nettailor_tf.settings.config import Config
from nettailor_tf.settings.tuned import BRIEF_RECALIBRATION_BATCHES
from nettailor_tf.model.losses import cross_entropy, mimic_loss
from nettailor_tf.training.train import Trainer
from nettailor_tf.run.workdir import Workdir, fingerprint


def or_none(value: float):
    """JSON has no NaN: an accuracy that was not measured is null."""
    return None if value != value else value


def training_outcome(result: "train.TrainResult") -> dict:
    """How a training stage ended, for its report entry: 'stopped' is
    'schedule' (a fixed length), 'plateau' (the rule judged it converged) or
    'cap' (it reached its cap still improving: 'converged' false, a finding);
    the rest is null for a fixed schedule."""
    rule = result.stopped != "schedule"
    return {"stopped": result.stopped, "converged": result.converged,
            "cap_steps": result.total_steps if rule else None,
            "best_step": result.best_step if rule else None,
            "val_loss": or_none(result.val_loss) if rule else None,
            "lr_reductions": result.reductions if rule else None,
            "final_learning_rate": result.learning_rate if rule else None}


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


# The targets of the tasks this process computed, kept for the later stages
# (student, prune search, finetune read the same teacher on the same images):
# {task name: (what they were computed from, targets)}.  Up to this many
# bytes are kept; the oldest go first.
_KEPT_TARGETS: dict = {}
KEPT_TARGETS_BYTES = 4 << 30


def teacher_targets(config, strategy, task, teacher):
    """The teacher's targets, where the task allows: computed once per run
    and task, and reused by every later stage while the teacher's weights
    are the same file (5-7 s a stage for the quickstart's mnist5k)."""
    if not config.cache_teacher_targets:
        return None
    key = (config.workdir, config.image_size, id(strategy),
           data_lib.identity(task)["fingerprint"],
           fingerprint(Workdir(config.workdir).teacher_weights(task.name)))
    kept = _KEPT_TARGETS.get(task.name)
    if kept is not None and kept[0] == key:
        return kept[1]
    targets = teacher_cache.build(teacher, task, config.image_size, config.eval_batch_size,
                                  strategy)
    _KEPT_TARGETS.pop(task.name, None)
    if targets is not None:
        _KEPT_TARGETS[task.name] = (key, targets)
        while sum(t.bytes for _, t in _KEPT_TARGETS.values()) > KEPT_TARGETS_BYTES:
            _KEPT_TARGETS.pop(next(iter(_KEPT_TARGETS)))
    return targets


def branch_costs(config: Config, backbone, plan) -> list[list[float]]:
    """What each branch of `plan` costs, as a share of the universal network
    (stem and every universal block): multiply-adds, or with
    --complexity_cost=latency milliseconds from the latency table."""
    if config.complexity_cost == "latency":
        table = artifacts.latency_table(config)
        norm = table.universal_network_ms(len(backbone.blocks))
        rows = table.branch_costs(plan)
    else:
        norm = complexity.universal_network_flops(backbone, config.image_size)
        rows = complexity.branch_flops(backbone, plan, config.image_size)
    return [[c / norm for c in row] for row in rows]


def cost_identity(config: Config) -> dict:
    """What the student's complexity term was priced with, for the ledger:
    nothing for the paper's multiply-adds, so that workdirs made before the
    latency cost model stay current."""
    if config.complexity_cost != "latency":
        return {}
    return {"complexity_cost": f"latency:{artifacts.latency_table(config).fingerprint()}"}


@dataclasses.dataclass(frozen=True)
class CompiledPasses:
    """A NetTailor network's inference pass, its evaluation and its BN
    re-estimation, each traced at its first use and reused after: whoever
    evaluates or re-estimates the same network shares them (tracing a pruned
    network's pass costs seconds of a stage)."""
    predict: Callable
    evaluate: Callable      # `train.make_evaluator` of `predict`
    recalibrate: student_network.BatchNormRecalibrator


def compiled_passes(strategy, network) -> CompiledPasses:
    """The passes of `network` (a student or pruned network)."""
    def predict(images):
        return network(images, training=False, mimic=False)[0]
    return CompiledPasses(predict, train.make_evaluator(strategy, predict),
                          student_network.BatchNormRecalibrator(network))


def nettailor_trainer(config, strategy, task, student, teacher, schedule, complexity_coeff,
                      name, targets=None, pruned: bool = False,
                      passes: CompiledPasses | None = None) -> Trainer:
    """The trainer of a NetTailor network: the student, or (`pruned`) a pruned
    network, which also trains its gates' masses; `passes`: the network's
    `compiled_passes` where they exist already (None: new ones)."""
    paths = Workdir(config.workdir)
    backbone = backbones_lib.build_backbone(config.backbone)  # geometry only
    costs = branch_costs(config, backbone, student.plan) if complexity_coeff else None
    mimic_normalized = (backbone.mimic_normalized if config.mimic_normalized is None
                        else config.mimic_normalized)
    loss_fn = nettailor_loss(student, teacher, costs, complexity_coeff, config.teacher_coeff,
                             config.complexity_exact, mimic_normalized, targets)
    trainable, decayed = student.task_variables()
    if pruned:
        trainable += student.mass_variables()
    gates = {id(v) for v in student.gate_variables()}
    multipliers = [config.gate_lr_multiplier if id(v) in gates else 1.0 for v in trainable]
    # Evaluations (the plateau rule's, the stage's result, the prune search's
    # brief fine-tunes) see BN statistics re-estimated on the weights being
    # evaluated.  The moving averages lag a network whose weights move fast:
    # a 60-step fine-tune of a 2-class folder task read 55% on test with them
    # and 97% with the statistics re-estimated, same weights.
    passes = passes or compiled_passes(strategy, student)
    batches = recalibration_batches(config, task)
    brief = (batches[:BRIEF_RECALIBRATION_BATCHES] if isinstance(batches, list)
             else batches.take(BRIEF_RECALIBRATION_BATCHES))
    return Trainer(
        strategy, student, loss_fn, trainable, decayed, schedule, lr_multipliers=multipliers,
        held=[] if config.gate_lr_decay else student.gate_variables(), indexed=targets is not None,
        checkpoint_dir=paths.checkpoints(task.name, name),
        summary_dir=paths.tensorboard(task.name, name),
        jit_compile=config.jit_compile, checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        predict_fn=passes.predict, evaluator=passes.evaluate,
        refresh_statistics=lambda short: passes.recalibrate(brief if short else batches),
        start_is_candidate=pruned)


def train_nettailor(config, strategy, task, student, teacher, schedule, complexity_coeff,
                    name, pruned: bool = False,
                    passes: CompiledPasses | None = None) -> "train.TrainResult | None":
    """Trains to the end of `schedule`; None when --max_steps stopped it first."""
    targets = teacher_targets(config, strategy, task, teacher)
    trainer = nettailor_trainer(config, strategy, task, student, teacher, schedule,
                                complexity_coeff, name, targets, pruned, passes)
    result = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                         max_steps=config.max_steps)
    if not result.complete:
        logging.info("%s: %s stopped at step %d of %d (--max_steps); re-run to resume",
                     task.name, name, result.steps, result.total_steps)
        return None
    return result


def gate_values(student) -> list[list[float]]:
    """Each block's gate (its branches' shares), rounded for report.json."""
    return [[round(float(a), 6) for a in alphas.numpy()] for alphas in student.alphas()]


# Enough images for stable per-channel moments (about 1,000), few enough to
# cost a second or two.
RECALIBRATION_BATCHES = 32

# Decoded once and kept while they fit in this many bytes (the quickstart's
# 32 batches at 64 px: 50 MB), else decoded at each re-estimation.
_KEPT_RECALIBRATION_BYTES = 256 * 2 ** 20


def recalibration_batches(config: Config, task):
    """The training batches a pruned network's BN statistics are re-estimated
    on: the same ones at every call (the first of epoch 0), as a list where
    they fit in memory (decoding them took a fifth of each re-estimation)."""
    batches = data_lib.train_pipeline(task, config.image_size, config.finetune.batch_size,
                                      epoch=0, seed=config.seed).take(RECALIBRATION_BATCHES)
    size = RECALIBRATION_BATCHES * config.finetune.batch_size * config.image_size ** 2 * 3 * 4
    return list(batches) if size <= _KEPT_RECALIBRATION_BYTES else batches


def prepared_pruned(config, strategy, task, student, plan, splits, raw_test=False):
    """The pruned network of `plan` as fine-tuning starts from it: the
    student's task weights (each gate keeping its surviving share), BN
    statistics re-estimated on the pruned stream; and its accuracy on
    `splits` ('raw_test': on the test split before the re-estimation).

    Pruning changes what reaches each surviving branch, so the statistics
    collected on the unpruned stream no longer describe it: on the
    quickstart's digits this step alone moved a pruned network from 18% to
    41% before any training.
    """
    pruned, accuracies, _ = prepared_pruned_with_passes(config, strategy, task, student, plan,
                                                        splits, raw_test)
    return pruned, accuracies


def prepared_pruned_with_passes(config, strategy, task, student, plan, splits,
                                raw_test=False):
    """`prepared_pruned`, and the `compiled_passes` it traced, for the
    trainer of the same network (`train_nettailor(passes=...)`)."""
    with strategy.scope():
        pruned = artifacts.pruned_network(config, task, plan)
        student_network.copy_task_weights(student, pruned)
    passes = compiled_passes(strategy, pruned)
    accuracies = {}
    if raw_test:
        accuracies["raw_test"] = passes.evaluate(task, config.image_size,
                                                 config.eval_batch_size, "test")
    passes.recalibrate(recalibration_batches(config, task))
    for split in splits:
        accuracies[split] = passes.evaluate(task, config.image_size, config.eval_batch_size,
                                            split)
    return pruned, accuracies, passes

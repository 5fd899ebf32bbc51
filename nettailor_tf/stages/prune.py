"""The prune stage: which universal blocks and proxies each task keeps."""
from __future__ import annotations

import json
import math
import os

import keras
from absl import logging

from nettailor_tf import artifacts, atomic, complexity, train, visualize
from nettailor_tf import student as student_lib
from nettailor_tf import prune as prune_lib
from nettailor_tf import data as data_lib
from nettailor_tf.config import WHOLE_FINETUNE, Config
from nettailor_tf.report import Report
from nettailor_tf.stages.nettailor import (gate_values, nettailor_trainer, prepared_pruned,
                                           recalibration_batches, selection_accuracy,
                                           teacher_targets)
from nettailor_tf.workdir import Workdir


class ZeroShotScorer:
    """Scores pruning plans as pruning leaves them, on the student itself.

    Each candidate is the student with its gates masked to the plan
    (`prune.mask_student`: the same sums as the pruned network's, tested in
    test_student.py), BN statistics re-estimated on that masked stream, then
    evaluated.  One traced forward pass and one evaluator serve every
    candidate; building and tracing a pruned network per candidate, as
    `prepared_pruned` does for the fine-tune, cost 4 of the 6 s each
    candidate took on the quickstart.  Used as a context manager: the
    student leaves with the gates and statistics it came with.
    """

    def __init__(self, config: Config, strategy, task, student):
        self.config, self.task, self.student = config, task, student
        self.recalibrate = student_lib.BatchNormRecalibrator(student)
        self.evaluate = train.make_evaluator(
            strategy, lambda images: student(images, training=False, mimic=False)[0])
        # The same batches `prepared_pruned` re-estimates on, decoded once.
        self.batches = list(recalibration_batches(config, task))

    def __enter__(self):
        self.statistics = self.recalibrate.save()
        self.gates = [(b.gate.keep.numpy(), b.gate.mass.numpy()) for b in self.student.tailored]
        return self

    def __call__(self, plan, split: str) -> float:
        self._restore()  # the mask's shares are read off the student's own gates
        prune_lib.mask_student(self.student, plan)
        self.recalibrate(self.batches)
        return self.evaluate(self.task, self.config.image_size, self.config.eval_batch_size,
                             split)

    def __exit__(self, *exc):
        self._restore()
        return False

    def _restore(self) -> None:
        self.recalibrate.restore(self.statistics)
        for block, (keep, mass) in zip(self.student.tailored, self.gates):
            block.gate.keep.assign(keep)
            block.gate.mass.assign(mass)


def search_prune_universal(config, strategy, task, report, student, alphas) -> dict:
    """The paper's sweep, automated: the largest N (leanest network) whose
    accuracy on the selection split stays within --prune_tolerance (at least
    one image of that split) of the teacher's, or of the student's where the
    student is the weaker.

    Two phases, cheapest first.  Candidates are first scored as pruning
    leaves them (BN statistics re-estimated, a second or two each, on the
    masked student).  Accuracy falls as N grows, so after N=0 the search
    starts from the gates' own answer, the universal blocks that give their
    block less than `_WEAK_UNIVERSAL` of its output, and walks from there:
    upwards in growing steps while candidates pass, then by bisection
    between the last pass and the first miss.  Fine-tuning only adds
    accuracy, so that boundary is safe but conservative: with
    --prune_search_steps, the candidates beyond it are then tried one by one
    after that many steps of the fine-tuning stage itself, until one misses
    the teacher's accuracy less the tolerance (not the student's: a
    fine-tuned network can match its teacher).
    A brief fine-tune is the start of the final one, which resumes from the
    chosen candidate's checkpoint instead of redoing it (with
    --prune_search_steps=finetune it is the whole final one), and a
    candidate still far below the target halfway is abandoned.  Each result is saved as soon
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
    # A fine-tuned candidate can match the teacher, so it is held to it:
    # the student's own accuracy would let the search cut blocks that the
    # fine-tune cannot pay back (the quickstart's mnist5k with whole-length
    # brief fine-tunes: N=10 passed 0.950 at 0.955 and ended 1.1 points
    # below its teacher, where N=9, at 0.980, ended 0.1 below).
    tuned_target = teacher_accuracy - tolerance
    paths = Workdir(config.workdir)
    results_path = paths.prune_search_results(task.name)
    results = {}
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            results = {int(k): v for k, v in json.load(f).items()}
    teacher = None
    scorer = None
    num_universal = len(student.plan.blocks)

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
            if steps:
                if teacher is None:
                    frozen = artifacts.frozen_teacher(config, task)
                    teacher = (frozen, teacher_targets(config, strategy, task, frozen))
                # The score the walk decided on stays the candidate's zero-shot
                # one, and is not computed again.
                results[n] = score_candidate(
                    config, strategy, task, student, plan, teacher, n, split, tuned_target,
                    steps, zero_shot=results[n]["zero_shot_accuracy"] if n in results else None)
            else:
                accuracy = scorer(plan, split)
                results[n] = {"accuracy": accuracy, "zero_shot_accuracy": accuracy,
                              **plan.counts()}
            atomic.write_text(results_path, json.dumps(results, indent=1) + "\n")
            logging.debug("%s: prune search N=%d: %s accuracy %.4f%s (target %.4f)", task.name,
                         n, config.selection_split, results[n]["accuracy"],
                         (f" after {results[n]['steps']} steps"
                          + (" (abandoned halfway)" if results[n].get("abandoned") else ""))
                         if steps else " as pruned",
                         tuned_target if steps else target)
        return results[n]["accuracy" if steps else "zero_shot_accuracy"]

    def passes(n: int) -> bool:
        accuracy = accuracy_of(n)
        return accuracy is not None and accuracy >= target

    with ZeroShotScorer(config, strategy, task, student) as scorer:
        first = accuracy_of(0)
        met = first is not None and first >= target
        low = 0
        if met:
            guess = sum(float(a[0]) < _WEAK_UNIVERSAL
                        for a, b in zip(alphas, student.plan.blocks) if b.universal)
            low = search_boundary(passes, min(max(1, guess), num_universal), num_universal)
    steps = candidate_steps(config, task)
    if met and steps:
        # Past the zero-shot boundary: each further block cut is kept only if
        # a brief fine-tune brings it within the tolerance of the teacher.
        # The walk stops at the first miss, or after --prune_search_max_tuned
        # candidates: a miss costs a fine-tune that nothing uses.
        limit = num_universal if not config.prune_search_max_tuned else min(
            num_universal, low + config.prune_search_max_tuned)
        while low < limit:
            accuracy = accuracy_of(low + 1, steps)
            if accuracy is None or accuracy < tuned_target:
                break
            low += 1
    if not met:
        logging.warning("%s: prune search: no candidate reached the target %.4f (%s %.4f - "
                        "tolerance %.4f); even N=0 reads %s. Keeping N=0: the student's "
                        "universal blocks with its weak proxies removed", task.name, target,
                        "teacher" if reference == teacher_accuracy else "student", reference,
                        tolerance, "nothing" if first is None else f"{first:.4f}")
    return {"chosen": low, "target": target, "fine_tuned_target": tuned_target,
            "split": config.selection_split,
            "teacher_accuracy": teacher_accuracy, "student_accuracy": student_accuracy,
            "tolerance": tolerance,
            "met_tolerance": met, "steps_per_candidate": steps,
            "max_tuned": config.prune_search_max_tuned,
            "candidates": {str(n): results[n] for n in sorted(results)}}


def candidate_steps(config: Config, task) -> int:
    """Fine-tuning steps each candidate past the zero-shot boundary runs
    (--prune_search_steps): 'finetune' is the fine-tuning stage's own length
    for this task, so that the chosen candidate's fine-tune is the final one."""
    if config.prune_search_steps != WHOLE_FINETUNE:
        return config.prune_search_steps
    schedule = config.finetune
    return schedule.plan(data_lib.steps_per_epoch(task, schedule.batch_size)).total_steps


# The gates' own answer, where the search starts: universal blocks that give
# their block under this share of its output.  On the quickstart's students
# these are 7-8 blocks at 0.00-0.04, and the boundary is one or two above.
_WEAK_UNIVERSAL = 0.05


def search_boundary(passes, start: int, limit: int) -> int:
    """The largest n in [0, limit] with `passes(n)`, given that passes(0)
    holds and that passing is monotone (true up to a boundary, false after):
    tries `start`, then walks up in steps of 1, 2, 4, ... while candidates
    pass, then bisects between the last pass and the first miss."""
    low, high = 0, limit + 1  # passes(low); not passes(high), or high beyond limit
    n, step, walking = start, 1, True
    while low + 1 < high:
        if passes(n):
            low = n
        else:
            high, walking = n, False
        if walking:
            n, step = min(low + step, high - 1), step * 2
        else:
            n = (low + high) // 2
    return low


# A brief fine-tune still this far below the target halfway through is
# abandoned, a heuristic that trades a rare late recovery for time: a digits
# candidate with 8 universal blocks cut read 41% before fine-tuning, 64%
# after 40 steps and 92% after 80, so brief fine-tunes much shorter than the
# recovery are not worth finishing from that far below.
_ABANDON_MARGIN = 0.10


def score_candidate(config, strategy, task, student, plan, teacher, n, split, target,
                     steps: int, zero_shot: float | None = None) -> dict:
    """A candidate's accuracy on `split` after `steps` of fine-tuning (and as
    pruned, unless the walk scored it so already: `zero_shot`); `teacher` is
    (frozen teacher, its targets)."""
    keras.utils.set_random_seed(config.seed)
    candidate, before = prepared_pruned(config, strategy, task, student, plan,
                                        [split] if zero_shot is None else [])
    entry = {"zero_shot_accuracy": before.get(split, zero_shot), **plan.counts()}
    trainer = nettailor_trainer(config, strategy, task, candidate, teacher[0], config.finetune,
                               0.0, f"prune_search/n{n}", teacher[1], pruned=True)
    # The search reads the selection split only; the test split is not evaluated.
    halfway_steps = max(1, steps // 2)
    half = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                       max_steps=min(halfway_steps, config.max_steps or halfway_steps),
                       evaluate_test=False)
    if config.max_steps is not None and half.steps >= config.max_steps:
        raise _Interrupted()
    # Halfway on an epoch's end (mnist5k's 112 of 224), fit has just read it.
    halfway = (half.val_accuracy if split == "val" and math.isfinite(half.val_accuracy)
               else trainer.evaluate(task, config.image_size, config.eval_batch_size, split))
    if halfway < target - _ABANDON_MARGIN:
        return {"accuracy": halfway, "abandoned": True, "steps": half.steps, **entry}
    result = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                         max_steps=min(steps, config.max_steps or steps), evaluate_test=False)
    if result.steps < steps and not result.complete:
        raise _Interrupted()
    # A whole fine-tune ends with an evaluation of the validation split.
    accuracy = (result.val_accuracy if result.complete and split == "val" and task.num_val
                else trainer.evaluate(task, config.image_size, config.eval_batch_size, split))
    return {"accuracy": accuracy, "steps": result.steps, **entry}


class _Interrupted(Exception):
    """A brief fine-tune stopped at --max_steps: the search resumes next run."""


def run_prune(config: Config, strategy, task, report: Report) -> bool:
    """Cuts weak universal blocks and proxies, then every dead path; saves the plan."""
    path = Workdir(config.workdir).plan(task.name)
    if os.path.exists(path):
        if report.get(task.name, "architecture_png") is None:
            # Killed after the plan (the stage's commit point) was written but
            # before its drawing was: draw it now from the same inputs.
            plan, _ = prune_lib.load_plan(path)
            student, backbone = artifacts.trained_student(config, task)
            _draw_architecture(config, task, report, student, plan, backbone)
        logging.info("%s: prune stage already done (%s); skipping", task.name, path)
        return True
    logging.info("%s: prune stage: reading the student's gates", task.name)
    student, backbone = artifacts.trained_student(config, task)
    alphas = [a.numpy() for a in student.alphas()]
    search = None
    if config.searches_prune:
        try:
            search = search_prune_universal(config, strategy, task, report, student, alphas)
        except _Interrupted:
            logging.info("%s: prune search interrupted (--max_steps); re-run to resume",
                         task.name)
            return False
        num_universal = search["chosen"]
        tuned = any(c.get("steps") for c in search["candidates"].values())
        logging.info("%s: prune search chose N=%d of the candidates (N: %s accuracy%s) %s; "
                     "target %.4f as pruned%s", task.name, num_universal,
                     config.selection_split, ", *: after fine-tuning" if tuned else "",
                     ", ".join(f"{n}: {c['accuracy']:.4f}{'*' if c.get('steps') else ''}"
                               for n, c in search["candidates"].items()), search["target"],
                     f", {search['fine_tuned_target']:.4f} after fine-tuning" if tuned else "")
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
                        prune_search=search, gates=gate_values(student), **counts)
    png = _draw_architecture(config, task, report, student, pruned, backbone)
    logging.info("%s: pruned to %d universal blocks and %d proxies (%d live blocks of %d); "
                 "architecture drawn in %s", task.name, counts["universal_blocks_kept"],
                 counts["proxies_kept"], counts["blocks_live"], len(pruned.blocks), png)
    return True


def _draw_architecture(config, task, report, student, pruned, backbone) -> str:
    """architecture.png (the student's gates, what pruning kept) and its report entry."""
    paths = Workdir(config.workdir)
    png = paths.architecture_png(task.name)
    visualize.plot_architecture(
        png, f"{task.name}: NetTailor on {config.backbone} (max_skip={config.max_skip})",
        student.plan, gate_values(student), kept_plan=pruned,
        block_flops=complexity.backbone_flops(backbone, config.image_size)["blocks"])
    report.task(task.name)["architecture_png"] = paths.relative(png)
    report.save()
    return png



"""The prune search: how many universal blocks a task gives up.

Candidates are cut in one order, weakest universal gate first, so a
candidate is a number N.  Two ways to choose it:

- **A budget** (--flops_budget, a share of the teacher's multiply-adds;
  --latency_budget_ms, the latency table's prediction for the float32
  network): the fewest cuts that fit.  Cutting more never helps accuracy,
  so that is the most accurate network within the budget.  Costs are
  analytic: no candidate is trained or scored to find it.
- **No budget**: the leanest network whose damage, as pruning leaves it,
  stays within --prune_allowance.  The damage of candidate N is the
  unpruned student's accuracy minus the candidate's, measured *paired* on
  the same images: the whole training split (evaluation transform) and the
  selection split, thousands of images instead of the selection split's
  hundreds.  Each candidate is scored after its BN statistics are
  re-estimated on the masked student (seconds each).

With --prune_search_steps, candidates past that boundary are then tried
one by one after that many fine-tuning steps, and kept while they reach the
teacher's selection-split accuracy less --prune_tolerance.

Every score is saved as soon as it is known (prune_search.json), so an
interrupted search resumes without redoing any.
"""
from __future__ import annotations

import json
import math
import os

import keras
import numpy as np
from absl import logging

from nettailor_tf import data as data_lib
from nettailor_tf.common import atomic
from nettailor_tf.common.errors import NetTailorError
from nettailor_tf.model import complexity, pruning, student_network
from nettailor_tf.run import artifacts
from nettailor_tf.run.workdir import Workdir
from nettailor_tf.settings.config import Config
from nettailor_tf.settings.options import WHOLE_FINETUNE
from nettailor_tf.settings.tuned import ABANDON_MARGIN, WEAK_UNIVERSAL
from nettailor_tf.stages.nettailor import (nettailor_trainer, prepared_pruned,
                                           recalibration_batches, selection_accuracy,
                                           teacher_targets)
from nettailor_tf.training import selection

# Confidence of the one-sided bounds the search logs and records.
CONFIDENCE = 0.9

def latency_budget_input(config: Config) -> dict:
    """The latency table a latency budget is judged by, for the stage ledger
    (the prune stage's settings are there already, `stage_settings`)."""
    if config.latency_budget_ms is None:
        return {}
    return {"latency_table": artifacts.latency_table(config).fingerprint()}


class ZeroShotScorer:
    """Scores pruning plans as pruning leaves them, on the student itself.

    Each candidate is the student with its gates masked to the plan
    (`pruning.mask_student`: the same sums as the pruned network's, tested in
    test_student_network.py), BN statistics re-estimated on that masked stream, then
    asked for its answer to every image of `splits`.  One traced forward
    pass serves every candidate.  Used as a context manager: the student
    leaves with the gates and statistics it came with.
    """

    def __init__(self, config: Config, task, student, splits):
        self.config, self.task, self.student, self.splits = config, task, student, tuple(splits)
        self.recalibrate = student_network.BatchNormRecalibrator(student)
        self.answer = selection.answer_function(
            lambda images: student(images, training=False, mimic=False)[0])
        # The same batches `prepared_pruned` re-estimates on, decoded once.
        self.batches = list(recalibration_batches(config, task))

    def __enter__(self):
        self.statistics = self.recalibrate.save()
        self.gates = [(b.gate.keep.numpy(), b.gate.mass.numpy()) for b in self.student.tailored]
        return self

    def __call__(self, plan) -> np.ndarray:
        """Whether the candidate of `plan` gets each image right (`plan`
        None: the unpruned student, statistics as trained)."""
        self._restore()  # the mask's shares are read off the student's own gates
        if plan is not None:
            pruning.mask_student(self.student, plan)
            self.recalibrate(self.batches)
        predicted, labels = selection.answers(self.answer, self.task, self.config.image_size,
                                              self.config.eval_batch_size, self.splits)
        return predicted == labels

    def __exit__(self, *exc):
        self._restore()
        return False

    def _restore(self) -> None:
        self.recalibrate.restore(self.statistics)
        for block, (keep, mass) in zip(self.student.tailored, self.gates):
            block.gate.keep.assign(keep)
            block.gate.mass.assign(mass)


class CandidateCosts:
    """What each candidate costs, analytically: multiply-adds as a share of
    the teacher's, and (with a latency budget) the latency table's
    prediction for its float32 network."""

    def __init__(self, config: Config, task, backbone, latency_table=None):
        self.config, self.task, self.backbone = config, task, backbone
        self.teacher_flops = complexity.classifier_flops(backbone, config.image_size,
                                                         task.num_classes)
        self.table = latency_table

    def __call__(self, plan) -> dict:
        branch = complexity.branch_flops(self.backbone, plan, self.config.image_size)
        parts = complexity.backbone_flops(self.backbone, self.config.image_size)
        flops = (parts["stem"] + sum(map(sum, branch)) + parts["head"]
                 + self.backbone.feature_dim * self.task.num_classes)
        cost = {"flops_fraction": round(flops / self.teacher_flops, 6)}
        if self.table is not None:
            cost["predicted_ms"] = round(self.table.predict_ms(plan), 5)
        return cost

    def fits(self, cost: dict) -> bool:
        budget_flops, budget_ms = self.config.flops_budget, self.config.latency_budget_ms
        return ((budget_flops is None or cost["flops_fraction"] <= budget_flops)
                and (budget_ms is None or cost["predicted_ms"] <= budget_ms))


class PruneSearch:
    """One task's search; `run()` returns what it found, for plan.json."""

    def __init__(self, config: Config, strategy, task, report, student, alphas, backbone):
        self.config, self.strategy, self.task = config, strategy, task
        self.student, self.alphas = student, alphas
        self.split = data_lib.selection_split(task, config.selection_split)
        self.teacher_accuracy = selection_accuracy(config, report.get(task.name, "teacher"))
        self.student_accuracy = selection_accuracy(config, report.get(task.name, "student"))
        images = task.num_val if self.split == "val" else task.num_test
        # A tolerance finer than one image of the selection split asks for
        # perfection: 0.5 points of digits' 145 validation images is 0.7 of one.
        self.tolerance = max(config.prune_tolerance, 1.0 / max(images, 1))
        self.tuned_target = self.teacher_accuracy - self.tolerance
        self.num_universal = len(student.plan.blocks)
        table = (artifacts.latency_table(config) if config.latency_budget_ms is not None
                 else None)
        self.costs = CandidateCosts(config, task, backbone, table)
        self.path = Workdir(config.workdir).prune_search_results(task.name)
        self.results = self._load()
        self.scorer = self.reference = self.teacher = None

    def _load(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            saved = {int(k): v for k, v in json.load(f).items()}
        # Zero-shot scores of an older search (a point accuracy, no paired
        # damage) are redone; fine-tuned scores are what they were.
        return {n: v for n, v in saved.items() if "damage" in v or "steps" in v}

    def _save(self) -> None:
        atomic.write_text(self.path, json.dumps(self.results, indent=1) + "\n")

    def plan(self, n: int):
        """Candidate n's plan, or None where pruning would leave no path."""
        try:
            return pruning.prune_plan(self.student.plan, self.alphas, n,
                                      self.config.prune_proxy_threshold,
                                      self.config.prune_universal_threshold)
        except pruning.PruneError:
            return None

    # --- zero-shot scores ----------------------------------------------------

    def score(self, n: int) -> dict | None:
        """Candidate n as pruning leaves it: its paired damage against the
        unpruned student on the pool, its selection-split accuracy, its cost."""
        if n in self.results:
            return self.results[n]
        plan = self.plan(n)
        if plan is None:
            return None
        if self.reference is None:
            self.reference = self.scorer(None)
        correct = self.scorer(plan)
        selected = correct[-self._selection_images():]
        self.results[n] = {
            "damage": selection.paired(self.reference, correct).as_dict(CONFIDENCE),
            "zero_shot_accuracy": float(np.mean(selected)), "accuracy": float(np.mean(selected)),
            **self.costs(plan), **plan.counts()}
        self._save()
        logging.debug("%s: prune search N=%d: damage %.4f (se %.4f) on %d images, %s accuracy "
                      "%.4f as pruned", self.task.name, n,
                      self.results[n]["damage"]["difference"],
                      self.results[n]["damage"]["standard_error"],
                      self.results[n]["damage"]["images"], self.config.selection_split,
                      self.results[n]["zero_shot_accuracy"])
        return self.results[n]

    def _selection_images(self) -> int:
        return self.task.num_val if self.split == "val" else self.task.num_test

    def within_allowance(self, n: int) -> bool:
        entry = self.score(n)
        return entry is not None and entry["damage"]["difference"] <= self.config.prune_allowance

    # --- the two rules -------------------------------------------------------

    def by_budget(self) -> tuple[int, bool]:
        """(the fewest cuts that fit the budget, whether any fits)."""
        last = self.num_universal
        for n in range(last + 1):
            plan = self.plan(n)
            if plan is not None:
                last = n
                if self.costs.fits(self.costs(plan)):
                    return n, True
        return last, False

    def by_allowance(self) -> tuple[int, bool]:
        """(the leanest candidate within the allowance, whether N=0 is)."""
        if not self.within_allowance(0):
            return 0, False
        # The gates' own answer, where the walk starts: universal blocks
        # that give their block under `WEAK_UNIVERSAL` of its output.
        guess = sum(float(a[0]) < WEAK_UNIVERSAL
                    for a, b in zip(self.alphas, self.student.plan.blocks) if b.universal)
        start = min(max(1, guess), self.num_universal)
        return search_boundary(self.within_allowance, start, self.num_universal), True

    def fine_tuned_past(self, low: int) -> int:
        """With --prune_search_steps: each further cut is kept only if a
        fine-tune brings it within the tolerance of the teacher; the walk
        stops at the first miss or after --prune_search_max_tuned tries."""
        steps = candidate_steps(self.config, self.task)
        limit = self.num_universal if not self.config.prune_search_max_tuned else min(
            self.num_universal, low + self.config.prune_search_max_tuned)
        while steps and low < limit:
            accuracy = self.fine_tuned_accuracy(low + 1, steps)
            if accuracy is None or accuracy < self.tuned_target:
                break
            low += 1
        return low

    def fine_tuned_accuracy(self, n: int, steps: int) -> float | None:
        entry = self.results.get(n)
        if entry is None or "steps" not in entry:
            plan = self.plan(n)
            if plan is None:
                return None
            if self.teacher is None:
                frozen = artifacts.frozen_teacher(self.config, self.task)
                self.teacher = (frozen, teacher_targets(self.config, self.strategy, self.task,
                                                        frozen))
            tuned = score_candidate(self.config, self.strategy, self.task, self.student, plan,
                                    self.teacher, n, self.split, self.tuned_target, steps,
                                    zero_shot=entry["zero_shot_accuracy"] if entry else None)
            self.results[n] = {**(entry or {}), **tuned}
            self._save()
        return self.results[n]["accuracy"]

    # --- the whole search ----------------------------------------------------

    def run(self) -> dict:
        budgeted = self.config.flops_budget is not None or self.config.latency_budget_ms is not None
        pool = ("train", self.split)
        with ZeroShotScorer(self.config, self.task, self.student, pool) as self.scorer:
            if budgeted:
                chosen, met = self.by_budget()
                self.score(chosen)  # its damage, for the report
            else:
                chosen, met = self.by_allowance()
                self.score(min(chosen + 1, self.num_universal))  # the margin past it
        if met and not budgeted:
            chosen = self.fine_tuned_past(chosen)
        return self.summary(chosen, met, budgeted)

    def summary(self, chosen: int, met: bool, budgeted: bool) -> dict:
        return {"chosen": chosen, "rule": "budget" if budgeted else "allowance",
                "met": met, "met_tolerance": met,
                "flops_budget": self.config.flops_budget,
                "latency_budget_ms": self.config.latency_budget_ms,
                "allowance": self.config.prune_allowance, "confidence": CONFIDENCE,
                "pool": "train+" + self.config.selection_split,
                "fine_tuned_target": self.tuned_target, "split": self.config.selection_split,
                "teacher_accuracy": self.teacher_accuracy,
                "student_accuracy": self.student_accuracy, "tolerance": self.tolerance,
                "steps_per_candidate": candidate_steps(self.config, self.task),
                "max_tuned": self.config.prune_search_max_tuned,
                "candidates": {str(n): self.results[n] for n in sorted(self.results)}}


def describe(task_name: str, search: dict) -> str:
    """The search's decision and its margin, as one log line."""
    chosen = search["candidates"].get(str(search["chosen"]), {})
    past = search["candidates"].get(str(search["chosen"] + 1))

    def damage(entry):
        d = entry["damage"]
        return (f"damage {100 * d['difference']:.2f} +- {100 * d['standard_error']:.2f} points "
                f"on {d['images']} images")

    cost = f"{chosen.get('flops_fraction', math.nan):.3f} of the teacher's multiply-adds"
    if "predicted_ms" in chosen:
        cost += f", {chosen['predicted_ms']:.3f} ms predicted"
    if search["rule"] == "budget":
        budget = ", ".join(f"{k} {v}" for k, v in (("--flops_budget", search["flops_budget"]),
                                                    ("--latency_budget_ms",
                                                     search["latency_budget_ms"])) if v)
        head = (f"{task_name}: prune search: N={search['chosen']} is the fewest cuts within "
                f"{budget}" if search["met"] else
                f"{task_name}: prune search: {budget} is out of reach; the leanest network, "
                f"N={search['chosen']}, costs")
        return f"{head} ({cost}; {damage(chosen) if 'damage' in chosen else 'not scored'})"
    line = (f"{task_name}: prune search chose N={search['chosen']} ({cost}): "
            f"{damage(chosen) if 'damage' in chosen else 'not scored'} against the allowance "
            f"{100 * search['allowance']:.2f}")
    if past and "damage" in past:
        line += f"; N={search['chosen'] + 1} would be {damage(past)}"
    if "steps" in chosen:
        line += (f"; fine-tuned {search['split']} accuracy {chosen['accuracy']:.4f} against "
                 f"the target {search['fine_tuned_target']:.4f}")
    return line


def candidate_steps(config: Config, task) -> int:
    """Fine-tuning steps each candidate past the zero-shot boundary runs
    (--prune_search_steps): 'finetune' is the fine-tuning stage's own length
    for this task, so that the chosen candidate's fine-tune is the final one."""
    if config.prune_search_steps != WHOLE_FINETUNE:
        return config.prune_search_steps
    schedule = config.finetune
    return schedule.plan(data_lib.steps_per_epoch(task, schedule.batch_size)).total_steps


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
        raise Interrupted()
    # Halfway on an epoch's end (mnist5k's 112 of 224), fit has just read it.
    halfway = (half.val_accuracy if split == "val" and math.isfinite(half.val_accuracy)
               else trainer.evaluate(task, config.image_size, config.eval_batch_size, split))
    if halfway < target - ABANDON_MARGIN:
        return {"accuracy": halfway, "abandoned": True, "steps": half.steps, **entry}
    result = trainer.fit(task, config.image_size, config.seed, config.eval_batch_size,
                         max_steps=min(steps, config.max_steps or steps), evaluate_test=False)
    if result.steps < steps and not result.complete:
        raise Interrupted()
    # A whole fine-tune ends with an evaluation of the validation split.
    accuracy = (result.val_accuracy if result.complete and split == "val" and task.num_val
                else trainer.evaluate(task, config.image_size, config.eval_batch_size, split))
    return {"accuracy": accuracy, "steps": result.steps, **entry}


class Interrupted(NetTailorError):
    """A brief fine-tune stopped at --max_steps: the search resumes next run
    (the prune stage catches it; it never reaches the user)."""

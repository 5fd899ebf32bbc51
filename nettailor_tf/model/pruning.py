"""Pruning (the paper): from gates to a plan, the plan applied to a student as
gate masks, and the files a pruned task is kept in (plan.json, its task
weights).

The published code only masks pruned branches, so its savings are
bookkeeping.  Here masking serves the prune search only; the network that is
exported is built anew with only its live branches (`static_graph`), and its
cost is counted from that network (`complexity.pruned_cost`).
"""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np

from nettailor_tf.common import atomic
from nettailor_tf.common.errors import NetTailorError
from nettailor_tf.model.student_network import BlockPlan, Plan, Student


class PruneError(NetTailorError, ValueError):
    """Pruning would leave no path from the input to the classifier."""


def prune_plan(plan: Plan, alphas: list[np.ndarray], num_universal: int,
               proxy_threshold: float, universal_threshold: float = 0.0) -> Plan:
    """Removes the `num_universal` universal blocks with the smallest alpha,
    every other universal block with alpha <= `universal_threshold` (it adds
    at most that share to its block's output and costs a whole block), every
    proxy with alpha <= `proxy_threshold`, then every dead path.

    One guard on top of the published rules: a block whose branches would all
    go keeps its strongest remaining proxy.  Without it a block can vanish
    and take with it every path to the classifier (seen on `digits`: all
    proxies of a late block under 0.1 once its universal block was cut).
    Blocks still disappear when nothing reads their output.
    """
    live = [l for l, b in enumerate(plan.blocks) if b.live]
    alpha_of = {l: np.asarray(a) for l, a in zip(live, alphas)}
    universal_alpha = {l: alpha_of[l][0] for l in live if plan.blocks[l].universal}
    if not 0 <= num_universal <= len(universal_alpha):
        raise PruneError(f"--prune_universal={num_universal} must be in [0, "
                         f"{len(universal_alpha)}]")
    removed = set(sorted(universal_alpha, key=lambda l: (universal_alpha[l], l))[:num_universal])
    removed |= {l for l, a in universal_alpha.items() if a <= universal_threshold}
    blocks = []
    for l, block in enumerate(plan.blocks):
        if l not in alpha_of:
            blocks.append(BlockPlan(False, []))
            continue
        offset = 1 if block.universal else 0
        sources = [s for j, s in enumerate(block.proxy_sources)
                   if alpha_of[l][j + offset] > proxy_threshold]
        universal = block.universal and l not in removed
        if not universal and not sources and block.proxy_sources:
            strongest = int(np.argmax(alpha_of[l][offset:]))
            sources = [block.proxy_sources[strongest]]
        blocks.append(BlockPlan(universal, sources))
    return remove_dead_paths(Plan(blocks))


def remove_dead_paths(plan: Plan) -> Plan:
    """Drops branches that read a node nothing produces and blocks whose output
    nothing reads (the published code does only the first), until stable."""
    blocks = [BlockPlan(b.universal, list(b.proxy_sources)) for b in plan.blocks]
    last = len(blocks) - 1
    changed = True
    while changed:
        changed = False
        produced = {0} | {l + 1 for l, b in enumerate(blocks) if b.live}
        read = {last + 1}  # the head reads the last node
        for l, b in enumerate(blocks):
            read.update(([l] if b.universal else []) + b.proxy_sources)
        for l, b in enumerate(blocks):
            if not b.live:
                continue
            if l + 1 not in read:
                blocks[l] = BlockPlan(False, [])
                changed = True
                continue
            if b.universal and l not in produced:
                b.universal, changed = False, True
            kept = [s for s in b.proxy_sources if s in produced]
            if kept != b.proxy_sources:
                b.proxy_sources, changed = kept, True
    if not blocks[last].live:
        raise PruneError("pruning leaves no path to the classifier: lower --prune_universal "
                         "or --prune_proxy_threshold")
    return Plan(blocks)


def mask_student(student: Student, pruned: Plan) -> None:
    """Sets the gate keep-masks of a full student to `pruned` (no retrace),
    each gate keeping the share its surviving branches held (`Gate.mass`)."""
    for l in student.live_blocks:
        block, plan = student.block(l), pruned.blocks[l]
        keep = []
        if student.plan.blocks[l].universal:
            keep.append(1.0 if plan.universal else 0.0)
        keep += [1.0 if s in plan.proxy_sources else 0.0
                 for s in student.plan.blocks[l].proxy_sources]
        alphas = block.gate.alphas().numpy()
        block.gate.keep.assign(keep)
        block.gate.mass.assign(float(np.dot(alphas, keep)))


# --- task-specific weights on disk --------------------------------------------

def task_state(student: Student) -> dict[str, np.ndarray]:
    """Everything that belongs to the task (proxies with their BN statistics,
    gates, classifier, task-specific head; universal BN statistics when they
    are re-estimated per task), keyed by variable path."""
    layers = [p for block in student.tailored for p in block.proxies]
    layers += [block.gate for block in student.tailored] + [student.classifier]
    if student.head_trainable:
        layers.append(student.head)
    variables = [v for layer in layers for v in layer.weights]
    if student.universal_training:
        variables += [v for v in student.weights if v.name in ("moving_mean", "moving_variance")
                      and not any(v is w for w in variables)]
    return {v.path: v.numpy() for v in variables}


def save_task_state(student: Student, path: str) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **task_state(student))
    atomic.write_bytes(path, buffer.getvalue())


class DamagedFileError(PruneError):
    """A task file of the workdir cannot be read (truncated, overwritten)."""


def load_task_state(student: Student, path: str) -> None:
    try:
        with np.load(path) as stored:
            state = {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DamagedFileError(f"{path} cannot be read ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else 'damaged'}); "
                               f"delete it and run again: its stage is redone",
                               path=path) from None
    own = {v.path: v for v in student.weights}
    missing = sorted(set(state) - set(own))
    if missing:
        raise DamagedFileError(f"{path} does not fit this network: unknown {missing[:5]}; "
                               f"delete it and run again: its stage is redone", path=path)
    expected = task_state(student)
    # Files written before gates had a mass hold renormalised gates: mass 1.
    absent = sorted(k for k in set(expected) - set(state) if not k.endswith("gate/mass"))
    if absent:
        raise DamagedFileError(f"{path} lacks {absent[:5]}; delete it and run again: its "
                               f"stage is redone", path=path)
    for key, value in state.items():
        own[key].assign(value)


def save_plan(path: str, plan: Plan, **info) -> None:
    data = {"blocks": json.loads(plan.to_json())["blocks"], **info}
    atomic.write_text(path, json.dumps(data, indent=1) + "\n")


def load_plan(path: str) -> tuple[Plan, dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return Plan.from_dict(data), data
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedFileError(f"{path} cannot be read ({type(error).__name__}); delete it "
                               f"and run again: the prune stage is redone",
                               path=path) from None

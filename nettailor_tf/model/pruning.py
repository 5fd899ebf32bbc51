"""Pruning (the paper): from gates to a plan, and from a plan to a static network.

The published code only masks pruned branches, so its savings are bookkeeping.
Here the pruned network is a new static Keras model holding only live
branches, each proxy's gate folded into its last (BN-folded) conv, so
inference runs no gate at all.  The universal branch's gate stays a constant
scale (skipped where it is 1), as an op the TFLite converter cannot fold
(`Scale`): folding it into the universal weights would make them differ per
task and end their sharing across tasks.
"""
from __future__ import annotations

import io
import json
import zipfile

import keras
import numpy as np

from nettailor_tf.common.errors import NetTailorError
from nettailor_tf.model import complexity
from nettailor_tf.common import atomic
from nettailor_tf.model.backbones import Backbone, count_params
from nettailor_tf.model.layers import PACKAGE, apply_activation, fold_batchnorm
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


# --- the static network -------------------------------------------------------

@keras.saving.register_keras_serializable(package=PACKAGE)
class Scale(keras.layers.Layer):
    """Multiplies by a constant: a universal branch's gate value, kept out of
    the shared weights.

    It runs as a 1x1 depthwise convolution whose kernel holds the value per
    channel, not as a multiply: the TFLite converter folds a constant
    multiply (scalar or per channel) into the convolution before it (its
    output channels) and a scalar one into the convolution after it (its
    input channels).  Both are universal convolutions wherever the scaled
    node is a universal block's output or a universal block's input, and a
    folded gate gives every task its own copy of them (measured on the
    quickstart bundle: 68% of its weight bytes per task).  The converter
    fuses no convolution into another, so the depthwise one stays an op of
    its own: the same elementwise cost as the multiply, per task.
    """

    def __init__(self, value: float, **kwargs):
        super().__init__(**kwargs)
        self.value = float(value)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.kernel = np.full((1, 1, channels, 1), self.value, np.float32)

    def call(self, x):
        return keras.ops.depthwise_conv(x, self.kernel, strides=1, padding="valid")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "value": self.value}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Activation(keras.layers.Layer):
    """The backbone's post-block activation (None, 'relu' or 'relu6')."""

    def __init__(self, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.activation = activation

    def call(self, x):
        return apply_activation(x, self.activation)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "activation": self.activation}


class UniversalLayers:
    """BN-folded universal layers shared by the static networks of several
    tasks (a multi-task bundle): each is built once and reused, so an export
    stores its weights once.  A task whose copy of a layer differs (per-task
    BN statistics, `universal_bn='task'`) gets its own copy, counted in
    `unshared`."""

    def __init__(self):
        self._layers: dict = {}
        self.unshared: list[str] = []

    def get(self, key: str, layer, input_shape=(None, None, None, 3)):
        folded = fold_batchnorm(layer, input_shape)
        cached = self._layers.get(key)
        if cached is None:
            self._layers[key] = folded
            return folded
        if _same_weights(cached, folded):
            return cached
        self.unshared.append(key)
        return folded


def _same_weights(a, b) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))


def static_model(student: Student, input_dtype: str = "float32",
                 universal: UniversalLayers | None = None, name: str = "nettailor") -> keras.Model:
    """The trained (pruned) student as a plain functional model with only its
    live branches and no gates: images (0..255) -> logits.

    A block's output is alpha_u * U + sum_p alpha_p * P_p.  The proxies' gates
    are folded into their last conv; the universal gate is applied after the
    sum, as alpha_u * (U + sum_p (alpha_p / alpha_u) * P_p), by `Scale`, whose
    form keeps the TFLite converter from fusing it into the universal
    convolution before or after it, which would give each task its own copy
    of that convolution.  Pass one `universal` cache to every task of a bundle so they
    share the universal layers' variables.
    """
    universal = universal if universal is not None else UniversalLayers()
    images = keras.Input((None, None, 3), dtype=input_dtype, name="images")
    nodes = {0: universal.get("stem", student.stem)(images)}
    for l in student.live_blocks:
        block = student.block(l)
        alphas = block.gate.alphas().numpy().astype(np.float64)
        sources = student.plan.branch_sources(l)
        branches = []
        scale = 1.0
        proxy_sources = sources
        if block.universal is not None:
            layer = universal.get(f"block{l}", block.universal,
                                  (None, None, None, block.universal.in_channels))
            branches.append(layer(nodes[sources[0]]))
            scale = float(alphas[0])
            alphas = alphas[1:]
            proxy_sources = sources[1:]
        for proxy, source, alpha in zip(block.proxies, proxy_sources, alphas):
            channels = student.node_channels[source]
            folded = fold_batchnorm(proxy, (None, None, None, channels))
            last = folded.convs[-1].conv
            factor = alpha / scale
            last.kernel.assign(last.kernel.numpy() * factor)
            last.bias.assign(last.bias.numpy() * factor)
            branches.append(folded(nodes[source]))
        mixed = branches[0] if len(branches) == 1 else keras.layers.Add(name=f"mix{l}")(branches)
        if abs(scale - 1.0) > 1e-7:
            mixed = Scale(scale, name=f"gate{l}_universal")(mixed)
        nodes[l + 1] = Activation(block.activation, name=f"act{l}")(mixed)
    head_shape = (None, None, None, student.node_channels[-1])
    if student.head_trainable:  # task-specific head: this task's own copy
        head = fold_batchnorm(student.head, head_shape)
    else:
        head = universal.get("head", student.head, head_shape)
    classifier = keras.layers.Dense.from_config(student.classifier.get_config())
    logits = classifier(head(nodes[len(student.plan.blocks)]))
    classifier.set_weights(student.classifier.get_weights())
    return keras.Model(images, logits, name=name)


# --- what a pruned network costs ---------------------------------------------

def pruned_cost(backbone: Backbone, plan: Plan, image_size: int, num_classes: int,
                student: Student) -> dict:
    """Multiply-adds and parameters of the static network of `plan`."""
    parts = complexity.backbone_flops(backbone, image_size)
    branch = complexity.branch_flops(backbone, plan, image_size)
    flops = (parts["stem"] + sum(map(sum, branch)) + parts["head"]
             + backbone.feature_dim * num_classes)
    kept = [backbone.blocks[l] for l, b in enumerate(plan.blocks) if b.universal]
    shared = [backbone.stem, *kept] + ([] if backbone.head_task_specific else [backbone.head])
    proxies = [p for block in student.tailored for p in block.proxies]
    own = proxies + [student.classifier] + ([student.head] if backbone.head_task_specific else [])
    universal_params, task_params = count_params(shared), count_params(own)
    counts = plan.counts()
    return {"flops": int(flops), "params_total": universal_params + task_params,
            "params_task_specific": task_params, "params_universal_used": universal_params,
            "universal_blocks_kept": counts["universal_blocks_kept"],
            "proxies_kept": counts["proxies_kept"], "blocks_live": counts["blocks_live"]}


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

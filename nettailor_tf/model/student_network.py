"""The NetTailor student: frozen universal blocks, proxies and gates (the paper).

The architecture is described by a `Plan`: for each block, whether its
universal branch is kept and which nodes its proxies read.  The full student
is the plan made from `max_skip`; a pruned network is a smaller plan, built
by the same code with only its live branches (nothing pruned is computed).
"""
from __future__ import annotations

import dataclasses
import json

import keras
import tensorflow as tf

from nettailor_tf.model.backbones import Backbone
from nettailor_tf.model.blocks import NetTailorBlock, Proxy
from nettailor_tf.model.layers import Bottleneck, fold_batchnorm
from nettailor_tf.settings.config import UNIVERSAL_BN_MODES


@dataclasses.dataclass
class BlockPlan:
    """Live branches of one block: the universal block (reads node l) and
    proxies reading the listed nodes."""
    universal: bool
    proxy_sources: list[int]

    @property
    def live(self) -> bool:
        return self.universal or bool(self.proxy_sources)


@dataclasses.dataclass
class Plan:
    blocks: list[BlockPlan]

    @classmethod
    def full(cls, num_blocks: int, max_skip: int | None) -> "Plan":
        """Every universal block, and proxies reading the last `max_skip`
        nodes (None: every earlier node, the paper's dense connectivity)."""
        if max_skip is not None and max_skip < 1:
            raise ValueError(f"max_skip must be >= 1 or None (dense), got {max_skip}")
        blocks = []
        for l in range(num_blocks):
            first = 0 if max_skip is None else max(0, l - max_skip + 1)
            blocks.append(BlockPlan(True, list(range(l, first - 1, -1))))
        return cls(blocks)

    @classmethod
    def backbone_only(cls, num_blocks: int) -> "Plan":
        """Every universal block and no proxy: the teacher's network."""
        return cls([BlockPlan(True, []) for _ in range(num_blocks)])

    def branch_sources(self, l: int) -> list[int]:
        """Node read by each branch of block l, universal first."""
        plan = self.blocks[l]
        return ([l] if plan.universal else []) + list(plan.proxy_sources)

    def to_json(self) -> str:
        return json.dumps({"blocks": [dataclasses.asdict(b) for b in self.blocks]}, indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls([BlockPlan(bool(b["universal"]), [int(s) for s in b["proxy_sources"]])
                    for b in data["blocks"]])

    def counts(self) -> dict:
        return {"universal_blocks_kept": sum(b.universal for b in self.blocks),
                "proxies_kept": sum(len(b.proxy_sources) for b in self.blocks),
                "blocks_live": sum(b.live for b in self.blocks)}


def proxy_hidden_channels(backbone: Backbone, l: int) -> int | None:
    """The published bottleneck proxy for bottleneck backbones, else None."""
    if isinstance(backbone.blocks[l], Bottleneck):
        return max(backbone.blocks[l].out_channels // 32, 16)
    return None


def node_reductions(backbone: Backbone) -> list[int]:
    """Image size / size of node n, for n = 0..L."""
    return [backbone.stem_reduction] + [s.out_reduction for s in backbone.specs]


class Student(keras.Model):
    """Stem, NetTailor blocks, head and classifier of one task.

    `call` returns `(logits, endpoints, mimic_endpoints)`: the outputs of the
    live blocks (node l+1 for each live block l) and the blocks' mimic nodes
    (the same values, whose gradients reach only each block's own weights),
    which only the mimic loss reads; `mimic=False` leaves them out.
    """

    def __init__(self, stem, blocks: list[NetTailorBlock | None], head, classifier,
                 plan: Plan, head_trainable: bool, universal_training: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.stem = stem
        self.tailored = [b for b in blocks if b is not None]
        self._blocks_by_index = blocks
        self.head = head
        self.classifier = classifier
        self.plan = plan
        self.head_trainable = head_trainable
        self.universal_training = universal_training

    @property
    def live_blocks(self) -> list[int]:
        return [l for l, b in enumerate(self._blocks_by_index) if b is not None]

    def block(self, l: int) -> NetTailorBlock | None:
        return self._blocks_by_index[l]

    def call(self, images, training=None, mimic=True):
        nodes = {0: self.stem(images, training=bool(training) and self.universal_training)}
        endpoints, mimic_endpoints = [], []
        for l, block in enumerate(self._blocks_by_index):
            if block is None:
                continue
            inputs = [nodes[n] for n in self.plan.branch_sources(l)]
            node, mimic_node = block(inputs, training=training)
            if mimic:
                mimic_endpoints.append(mimic_node)
            nodes[l + 1] = node
            endpoints.append(node)
        last = len(self._blocks_by_index)
        features = self.head(nodes[last], training=bool(training) and self.head_trainable)
        logits = self.classifier(features)
        return logits, endpoints, mimic_endpoints

    def alphas(self) -> list[tf.Tensor]:
        """Gate values of the live blocks, in block order."""
        return [block.gate.alphas() for block in self.tailored]

    # --- variables ---------------------------------------------------------

    def proxy_variables(self) -> list:
        return [v for block in self.tailored for p in block.proxies for v in p.trainable_weights]

    def gate_variables(self) -> list:
        return [block.gate.logits for block in self.tailored]

    def mass_variables(self) -> list:
        """Each gate's mass: trained only when a pruned network is fine-tuned."""
        return [block.gate.mass for block in self.tailored]

    def task_variables(self) -> tuple[list, list]:
        """(variables to train, the subset with weight decay): proxies,
        classifier and any task-specific head decay; gate logits do not.
        Universal weights are in neither list: they never change."""
        decayed = self.proxy_variables() + list(self.classifier.trainable_weights)
        if self.head_trainable:
            decayed += list(self.head.trainable_weights)
        return decayed + self.gate_variables(), decayed


def _freeze(layer) -> None:
    """Keeps `layer`'s weights out of training by freezing its variables, not
    the layer: Keras runs the BN of a `trainable=False` layer in inference
    mode, which would stop `universal_bn='task'` from re-estimating the
    statistics (the paper)."""
    for v in layer.weights:
        v.trainable = False


def build_student(backbone: Backbone, num_classes: int, plan: Plan,
                  universal_bn: str = "frozen", image_size: int = 64) -> Student:
    """The student of `plan` over `backbone` (whose weights it takes as universal).

    With `universal_bn='frozen'` the universal layers run on the pretrained
    statistics and are used BN-folded (fewer ops, same values); with 'task'
    they run on batch statistics during training and keep task-specific
    moving statistics (which then differ per task and cannot be shared).
    """
    if universal_bn not in UNIVERSAL_BN_MODES:
        raise ValueError(f"universal_bn must be one of {UNIVERSAL_BN_MODES}, got {universal_bn!r}")
    if len(plan.blocks) != len(backbone.blocks):
        raise ValueError(f"plan has {len(plan.blocks)} blocks, backbone {len(backbone.blocks)}")
    frozen = universal_bn == "frozen"
    reductions = node_reductions(backbone)
    channels = [backbone.stem_channels] + [s.out_channels for s in backbone.specs]
    stem = fold_batchnorm(backbone.stem) if frozen else backbone.stem
    blocks: list[NetTailorBlock | None] = []
    for l, (universal, block_plan) in enumerate(zip(backbone.blocks, plan.blocks)):
        if not block_plan.live:
            blocks.append(None)
            continue
        if block_plan.universal:
            universal = (fold_batchnorm(universal, (None, None, None, universal.in_channels))
                         if frozen else universal)
            _freeze(universal)
        proxies = []
        for source in block_plan.proxy_sources:
            proxies.append(Proxy(
                channels[l + 1], pool_stride=reductions[l + 1] // reductions[source],
                pool_padding=backbone.padding,
                nonnegative_input=backbone.block_activation is not None,
                hidden_channels=proxy_hidden_channels(backbone, l),
                bn_epsilon=getattr(backbone.blocks[l], "bn_epsilon", 1e-5),
                name=f"block{l}_proxy_from{source}"))
        blocks.append(NetTailorBlock(universal if block_plan.universal else None, proxies,
                                     backbone.block_activation, universal_training=not frozen,
                                     name=f"tailored{l}"))
    if backbone.head_task_specific:
        head = keras.Sequential.from_config(backbone.head.get_config())
        head.build((None, None, None, backbone.specs[-1].out_channels))
        head.set_weights(backbone.head.get_weights())
    else:
        head = fold_batchnorm(backbone.head, (None, None, None, backbone.specs[-1].out_channels)) \
            if frozen else backbone.head
    _freeze(stem)
    if not backbone.head_task_specific:
        head.trainable = False
    classifier = keras.layers.Dense(num_classes, name="classifier")
    student = Student(stem, blocks, head, classifier, plan, backbone.head_task_specific,
                      universal_training=not frozen, name="student")
    student.node_channels = channels
    student(tf.zeros((1, image_size, image_size, 3)), training=False)
    return student


def copy_task_weights(source: Student, target: Student) -> None:
    """Copies proxies, gate logits (of the branches both keep), classifier and
    task-specific head from `source` into `target` (e.g. a pruned student).

    Each target gate keeps the share of the source gate its branches held
    (`Gate.mass`), so the target's blocks compute the source's sums minus
    the removed branches' terms."""
    for l in target.live_blocks:
        src, dst = source.block(l), target.block(l)
        if src is None:
            raise ValueError(f"block {l} is live in the target but not in the source")
        src_sources = source.plan.branch_sources(l)
        src_universal = source.plan.blocks[l].universal
        logits = src.gate.logits.numpy()
        source_alphas = src.gate.alphas().numpy()
        keep, mass = [], 0.0
        dst_sources = target.plan.branch_sources(l)
        for j, node in enumerate(dst_sources):
            is_universal = target.plan.blocks[l].universal and j == 0
            if is_universal:
                k = 0
            else:
                k = src_sources.index(node, 1 if src_universal else 0)
                proxy_index = k - (1 if src_universal else 0)
                own = j - (1 if target.plan.blocks[l].universal else 0)
                dst.proxies[own].set_weights(src.proxies[proxy_index].get_weights())
            keep.append(logits[k])
            mass += float(source_alphas[k])
        dst.gate.logits.assign(keep)
        dst.gate.mass.assign(mass)
    target.classifier.set_weights(source.classifier.get_weights())
    if target.head_trainable:
        target.head.set_weights(source.head.get_weights())


def recalibrate_batchnorm(student: Student, batches) -> int:
    """Re-estimates the moving statistics of every BN that the student runs
    in training mode (its proxies, and any task-specific universal or head
    BN) as the plain average over `batches` of (images, labels).

    Pruning changes what reaches each surviving branch (a removed universal
    block no longer feeds the nodes after it), so the statistics collected on
    the unpruned stream no longer describe it.  Returns the batches used.
    """
    return BatchNormRecalibrator(student)(batches)


class BatchNormRecalibrator:
    """`recalibrate_batchnorm` for one student, called many times (the prune
    search re-estimates one masked student per candidate, the plateau rule
    before each evaluation): one traced forward pass serves every call, and
    `save` / `restore` put back the statistics it started from.

    The per-batch statistics are summed on the device, inside the traced
    pass, and reach the host once per call: reading every BN's moments after
    each batch cost a third of a re-estimation's time on the quickstart."""

    def __init__(self, student: Student):
        self.layers = [layer for layer in student._flatten_layers()
                       if isinstance(layer, keras.layers.BatchNormalization)]

        def forward(images, sums):
            student(images, training=True, mimic=False)
            # Read after the pass's own updates (automatic control
            # dependencies keep a variable's writes and reads in order).
            return [total + moment for total, moment in zip(sums, self._moments())]

        self.forward = tf.function(forward)

    def _moments(self) -> list:
        return [v for layer in self.layers for v in (layer.moving_mean, layer.moving_variance)]

    def save(self) -> list:
        return [(l.moving_mean.numpy(), l.moving_variance.numpy()) for l in self.layers]

    def restore(self, saved: list) -> None:
        for layer, (mean, variance) in zip(self.layers, saved):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)

    def __call__(self, batches) -> int:
        saved = [layer.momentum for layer in self.layers]
        for layer in self.layers:
            layer.momentum = 0.0  # each batch overwrites the statistics; averaged below
        try:
            # -0.0 is the sum's identity for every float, +0.0 and -0.0 included.
            sums = [tf.fill(tf.shape(v), tf.constant(-0.0, v.dtype)) for v in self._moments()]
            count = 0
            for images, _ in batches:
                sums = self.forward(images, sums)
                count += 1
            if count:
                # Divided on the host, as the averages always were.
                totals = [s.numpy() for s in sums]
                self.restore([(totals[i] / count, totals[i + 1] / count)
                              for i in range(0, len(totals), 2)])
        finally:
            for layer, momentum in zip(self.layers, saved):
                layer.momentum = momentum
        return count

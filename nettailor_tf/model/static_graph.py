"""The pruned network as it is exported: a new static Keras model holding only
its live branches, each proxy's gate folded into its last (BN-folded) conv,
so inference runs no gate at all.  The universal branch's gate stays a
constant scale (skipped where it is 1), as an op the TFLite converter cannot
fold (`Scale`): folding it into the universal weights would make them differ
per task and end their sharing across tasks (`UniversalLayers`).
"""
from __future__ import annotations

import keras
import numpy as np

from nettailor_tf.model.layers import PACKAGE, apply_activation, fold_batchnorm
from nettailor_tf.model.student_network import Student


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

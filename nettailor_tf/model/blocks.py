"""Task-specific proxies and the gated NetTailor block (the paper).

A NetTailor block mixes its frozen universal block with proxies that read
the current node or older ones: `node_{l+1} = act(sum_j alpha_j branch_j)`.

Gradient routing of the mimic loss (the paper: the block's mimic term
trains its own proxies and gate, never what feeds the block) is done here
without computing anything twice: the block is evaluated once and gives two
outputs of equal value, the node and the mimic node.  Their gradients are
told apart in the backward pass (`_with_mimic_route`): both reach the
block's weights, only the node's reaches its inputs.  Evaluating the proxies
a second time on stop-gradient inputs, as the published code does, gives the
same gradients for a second forward pass and a second weight gradient of
every proxy.
"""
from __future__ import annotations

import functools

import keras
import tensorflow as tf

from nettailor_tf.model.gates import Gate, PROXY_LOGIT, UNIVERSAL_LOGIT
from nettailor_tf.model.layers import ConvBN, PACKAGE, apply_activation


@keras.saving.register_keras_serializable(package=PACKAGE)
class Proxy(keras.layers.Layer):
    """A cheap stand-in for a block: [max-pool], 1x1 conv, BN (no activation).

    Args:
        out_channels: the block's output channels.
        pool_stride: input size / block output size (1, 2, 4, ...).  The
            max-pool has kernel `pool_stride + 1` and gives ceil(size / stride)
            outputs, like the blocks do.
        pool_padding: where the pool's windows sit, matching the backbone's
            strided convolutions: 'same' (TensorFlow: nothing before, the
            rest after; for TF-trained weights such as EfficientNet-Lite) or
            'symmetric' (`pool_stride // 2` each side, as PyTorch's blocks
            pad).  Both pad as if with -inf, exact for the negative values
            that linear bottlenecks produce: 'same' is TF's own max-pool
            padding; 'symmetric' mirrors the border rows, which are already
            inside the first and last windows, so the maximum is unchanged
            (or pads zeros where `nonnegative_input` says that is exact).
        nonnegative_input: the input is post-ReLU (zero padding is exact
            and is the cheaper op on device).
        hidden_channels: None for the plain proxy; for bottleneck backbones
            the published variant 1x1 conv to this width, BN, ReLU, 1x1 conv,
            BN (the paper: max(C_out / 32, 16)).
        bn_epsilon: BN epsilon.
        folded: BN folded into the convs (the deployed form).
    """

    def __init__(self, out_channels, pool_stride=1, hidden_channels=None, bn_epsilon=1e-5,
                 folded=False, pool_padding="same", nonnegative_input=False, **kwargs):
        super().__init__(**kwargs)
        if pool_stride < 1:
            raise ValueError(f"pool_stride must be >= 1, got {pool_stride}")
        if pool_padding not in ("same", "symmetric"):
            raise ValueError(f"pool_padding must be 'same' or 'symmetric', got {pool_padding!r}")
        self.pool_padding = pool_padding
        self.nonnegative_input = bool(nonnegative_input)
        self.out_channels = out_channels
        self.pool_stride = pool_stride
        self.hidden_channels = hidden_channels
        self.bn_epsilon = bn_epsilon
        self.folded = folded
        # N(0, 0.01): a new proxy starts close to silent (the paper).
        init = keras.initializers.RandomNormal(stddev=0.01)
        conv_bn = lambda filters, activation, name: ConvBN(
            filters, 1, activation=activation, bn_epsilon=bn_epsilon, folded=folded,
            kernel_initializer=init, name=name)
        self.convs = ([conv_bn(hidden_channels, "relu", "reduce")] if hidden_channels else [])
        self.convs.append(conv_bn(out_channels, None, "project"))

    def build(self, input_shape):
        shape = input_shape
        for conv in self.convs:
            conv.build(shape)
            shape = conv.compute_output_shape(shape)

    def call(self, x, training=None, scale=None):
        """`scale` multiplies the output (through the last BN's gamma and beta:
        a gate value costs a per-channel op instead of a pass over the map)."""
        if self.pool_stride > 1:
            s = self.pool_stride
            if self.pool_padding == "same":
                x = keras.ops.max_pool(x, s + 1, s, "same")
            else:
                x = keras.ops.pad(x, [[0, 0], [s // 2, s // 2], [s // 2, s // 2], [0, 0]],
                                  mode="constant" if self.nonnegative_input else "symmetric")
                x = keras.ops.max_pool(x, s + 1, s, "valid")
        for i, conv in enumerate(self.convs):
            last = i == len(self.convs) - 1
            x = conv(x, training=training, scale=scale if last else None)
        return x

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        out = lambda d: None if d is None else -(-d // self.pool_stride)
        return (n, out(h), out(w), self.out_channels)

    def get_config(self):
        return {**super().get_config(), "out_channels": self.out_channels,
                "pool_stride": self.pool_stride, "pool_padding": self.pool_padding,
                "nonnegative_input": self.nonnegative_input,
                "hidden_channels": self.hidden_channels,
                "bn_epsilon": self.bn_epsilon, "folded": self.folded}


@keras.saving.register_keras_serializable(package=PACKAGE)
class NetTailorBlock(keras.layers.Layer):
    """A frozen universal block and task-specific proxies, mixed by a gate.

    Branch 0 is the universal block (when kept), then the proxies; the call
    takes one input per branch, in that order.

    Args:
        universal: the (frozen) universal block layer, or None once pruned.
        proxies: list of `Proxy` layers.
        activation: what the backbone applies after a block (None, 'relu',
            'relu6'), applied after the mix.
        universal_training: run the universal block's BN on batch statistics
            while training (`--universal_bn=task`); False keeps the pretrained
            statistics (and lets the universal block be BN-folded).
        initial_logits: the gate's starting logits (default +2 universal, -2
            proxies).

    Call arguments:
        inputs: list of tensors, one per branch.
        training: training mode of proxies (and universal, see above).

    Returns:
        (node, mimic_node): equal values, different gradient paths.  The
        mimic node, read only by the block's own mimic loss, sends gradients
        to the block's weights (proxies, gate) and none to its inputs.
    """

    def __init__(self, universal, proxies, activation=None, universal_training=False,
                 initial_logits=None, **kwargs):
        super().__init__(**kwargs)
        if universal is None and not proxies:
            raise ValueError("a NetTailor block needs at least one branch")
        self.universal = universal
        self.proxies = list(proxies)
        self.activation = activation
        self.universal_training = universal_training
        num_branches = len(self.proxies) + (universal is not None)
        if initial_logits is None:
            initial_logits = ([UNIVERSAL_LOGIT] if universal is not None else []) + \
                [PROXY_LOGIT] * len(self.proxies)
        self.gate = Gate(num_branches, initial_logits, name="gate")

    @property
    def num_branches(self) -> int:
        return self.gate.num_branches

    def build(self, input_shapes):
        input_shapes = list(input_shapes)
        if self.universal is not None:
            if not self.universal.built:
                self.universal.build(input_shapes[0])
            input_shapes = input_shapes[1:]
        for proxy, shape in zip(self.proxies, input_shapes):
            if not proxy.built:  # deserialised proxies arrive built
                proxy.build(shape)
        self.gate.build()

    def call(self, inputs, training=None):
        inputs = list(inputs)
        if not training:
            node = self._node(inputs, training=False)
            return node, node  # the routes differ in gradients only
        return _with_mimic_route(lambda *xs: self._node(list(xs), training=True), inputs)

    def _node(self, inputs, training):
        """act(sum_j alpha_j branch_j).  Each proxy's gate value rides on its last
        BN's gamma and beta; only the universal branch needs a multiply over
        its output."""
        alphas = self.gate.alphas()
        terms = []
        if self.universal is not None:
            universal_out = self.universal(inputs.pop(0),
                                           training=training and self.universal_training)
            terms.append(keras.ops.cast(alphas[0], universal_out.dtype) * universal_out)
        first = len(terms)
        terms += [proxy(x, training=training, scale=alphas[first + i])
                  for i, (proxy, x) in enumerate(zip(self.proxies, inputs))]
        # A chain of adds: Grappler makes it one AddN, as tf.add_n was.
        return apply_activation(functools.reduce(keras.ops.add, terms), self.activation)

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {**super().get_config(),
                "universal": None if self.universal is None else serialize(self.universal),
                "proxies": [serialize(p) for p in self.proxies],
                "activation": self.activation, "universal_training": self.universal_training,
                "initial_logits": self.gate.initial_logits}

    @classmethod
    def from_config(cls, config):
        deserialize = keras.saving.deserialize_keras_object
        config = dict(config)
        if config["universal"] is not None:
            config["universal"] = deserialize(config["universal"])
        config["proxies"] = [deserialize(p) for p in config["proxies"]]
        return cls(**config)


def _with_mimic_route(compute, inputs):
    """(node, mimic_node) for `node = compute(*inputs)`, computed once.

    Both outputs are the node; in the backward pass the node's gradient g
    reaches the inputs and the weights, the mimic node's g_m only the
    weights.  Gradients are linear in what flows back, so the weights get
    J_w^T (g + g_m) from one backward pass and the inputs J_x^T g from
    another: the gradients of evaluating the block a second time on
    stop-gradient inputs, without that second evaluation.
    """
    # One input per distinct tensor: the universal block and a proxy both read
    # node l, and a tape asked for the gradient of the same tensor twice
    # gives the whole gradient twice, which would then be counted twice.
    distinct, position = [], []
    for x in inputs:
        match = next((i for i, seen in enumerate(distinct) if seen is x), None)
        if match is None:
            match = len(distinct)
            distinct.append(x)
        position.append(match)

    @tf.custom_gradient
    def routes(*xs):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xs)
            node = compute(*[xs[i] for i in position])

        def gradient(d_node, d_mimic, variables=()):
            # A route the loss does not read may come back as None.
            d_weights = d_node if d_mimic is None else (
                d_mimic if d_node is None else d_node + d_mimic)
            weight_grads = ([None] * len(variables) if d_weights is None else
                            tape.gradient(node, variables, output_gradients=d_weights))
            input_grads = ([None] * len(xs) if d_node is None else
                           tape.gradient(node, xs, output_gradients=d_node))
            return input_grads, weight_grads

        return (node, tf.identity(node)), gradient

    return routes(*distinct)

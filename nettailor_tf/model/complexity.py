"""Analytic multiply-adds and parameter counts of networks and of their parts.

FLOPs here are multiply-adds of one image, counted from the layer geometry
(convolutions and dense layers; BN folds into the convs at inference and
element-wise ops are negligible), so they are exact, cheap and available at
any image size without running anything.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from nettailor_tf.model.backbones import Backbone, count_params
from nettailor_tf.model.layers import BasicBlock, Bottleneck, ConvBN, InvertedResidual, Normalize
from nettailor_tf.model.student_network import Plan, Student, proxy_hidden_channels

Shape = tuple  # (batch, height, width, channels)


def _out(size: int, strides: int) -> int:
    return -(-size // strides)


def conv_flops(layer, input_shape: Shape) -> tuple[int, Shape]:
    """Multiply-adds of a Conv2D / DepthwiseConv2D and its output shape."""
    _, h, w, c = input_shape
    k = layer.kernel_size[0] * layer.kernel_size[1]
    stride = layer.strides[0]
    if layer.padding == "valid":
        h, w = h - layer.kernel_size[0] + 1, w - layer.kernel_size[1] + 1
    oh, ow = _out(h, stride), _out(w, stride)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return oh * ow * k * c, (1, oh, ow, c)
    return oh * ow * k * c * layer.filters, (1, oh, ow, layer.filters)


def layer_flops(layer, input_shape: Shape) -> tuple[int, Shape]:
    """Multiply-adds of `layer` on one input of `input_shape`, and its output shape."""
    if isinstance(layer, ConvBN):
        shape = input_shape
        if layer.pad is not None:
            p = layer.kernel_size // 2
            shape = (1, shape[1] + 2 * p, shape[2] + 2 * p, shape[3])
        return conv_flops(layer.conv, shape)
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
        return conv_flops(layer, input_shape)
    if isinstance(layer, InvertedResidual):
        return _chain_flops([l for l in (layer.expand, layer.depthwise, layer.project) if l],
                            input_shape)
    if isinstance(layer, (BasicBlock, Bottleneck)):
        convs = [layer.conv1, layer.conv2] + ([layer.conv3] if isinstance(layer, Bottleneck) else [])
        flops, shape = _chain_flops(convs, input_shape)
        if layer.downsample is not None:
            flops += layer_flops(layer.downsample, input_shape)[0]
        return flops, shape
    if isinstance(layer, keras.Sequential):
        return _chain_flops(layer.layers, input_shape)
    if isinstance(layer, keras.layers.Dense):
        return input_shape[-1] * layer.units, (1, layer.units)
    if isinstance(layer, (keras.layers.GlobalAveragePooling2D,)):
        return 0, (1, input_shape[-1])
    if isinstance(layer, keras.layers.ZeroPadding2D):
        (t, b), (l, r) = layer.padding
        return 0, (1, input_shape[1] + t + b, input_shape[2] + l + r, input_shape[3])
    if isinstance(layer, keras.layers.MaxPooling2D):
        k, s = layer.pool_size[0], layer.strides[0]
        if layer.padding == "valid":
            return 0, (1, (input_shape[1] - k) // s + 1, (input_shape[2] - k) // s + 1,
                       input_shape[3])
        return 0, (1, _out(input_shape[1], s), _out(input_shape[2], s), input_shape[3])
    if isinstance(layer, (Normalize, keras.layers.BatchNormalization, keras.layers.ReLU,
                          keras.layers.Identity, keras.layers.Activation)):
        return 0, input_shape
    raise TypeError(f"no FLOPs rule for layer {layer.name} ({type(layer).__name__})")


def _chain_flops(layers, input_shape: Shape) -> tuple[int, Shape]:
    total, shape = 0, input_shape
    for layer in layers:
        flops, shape = layer_flops(layer, shape)
        total += flops
    return total, shape


def backbone_flops(backbone: Backbone, image_size: int) -> dict:
    """Per-part multiply-adds: {'stem': int, 'blocks': [int, ...], 'head': int}."""
    flops, shape = layer_flops(backbone.stem, (1, image_size, image_size, 3))
    parts = {"stem": flops, "blocks": []}
    for block in backbone.blocks:
        flops, shape = layer_flops(block, shape)
        parts["blocks"].append(flops)
    parts["head"] = layer_flops(backbone.head, shape)[0]
    return parts


def classifier_flops(backbone: Backbone, image_size: int, num_classes: int) -> int:
    """Multiply-adds of the whole backbone plus a `num_classes` linear classifier."""
    parts = backbone_flops(backbone, image_size)
    return parts["stem"] + sum(parts["blocks"]) + parts["head"] + backbone.feature_dim * num_classes


# --- NetTailor: per-branch costs and the expected complexity ------------------

def branch_flops(backbone: Backbone, plan, image_size: int) -> list[list[int]]:
    """Multiply-adds of every branch of `plan`, universal first, per block."""
    shape = layer_flops(backbone.stem, (1, image_size, image_size, 3))[1]
    node_shapes = [shape]
    universal = []
    for block in backbone.blocks:
        flops, shape = layer_flops(block, shape)
        universal.append(flops)
        node_shapes.append(shape)
    costs = []
    for l, block_plan in enumerate(plan.blocks):
        _, h, w, c_out = node_shapes[l + 1]
        hidden = proxy_hidden_channels(backbone, l)
        row = [universal[l]] if block_plan.universal else []
        for source in block_plan.proxy_sources:
            c_in = node_shapes[source][3]
            per_pixel = c_in * hidden + hidden * c_out if hidden else c_in * c_out
            row.append(h * w * per_pixel)
        costs.append(row)
    return costs


def universal_network_flops(backbone: Backbone, image_size: int) -> int:
    """Stem plus every universal block: the normaliser of the complexity loss."""
    parts = backbone_flops(backbone, image_size)
    return parts["stem"] + sum(parts["blocks"])


def expected_complexity(alphas, costs, plan, exact: bool = True):
    """The complexity loss C of the paper (the paper's eq. 9).

    Args:
        alphas: gate values per live block of `plan` (tensors, branch order as
            `plan.branch_sources`).
        costs: per block, per branch cost already divided by the universal
            network's FLOPs.
        plan: the topology (which node each branch reads).
        exact: per-branch `p_in` (of the node the branch reads); False uses
            block l-1's `in` for every branch of block l, as the published
            code does.
    """
    num_blocks = len(plan.blocks)
    live = [l for l, b in enumerate(plan.blocks) if b.live]
    alpha_of = dict(zip(live, alphas))
    one = tf.constant(1.0)
    # in_[l]: probability that block l's output (node l+1) receives nothing.
    in_ = {l: tf.reduce_prod(1.0 - alpha_of[l]) for l in live}
    # out_[n]: probability that no branch reads node n.
    out_ = {}
    for l in live:
        for j, node in enumerate(plan.branch_sources(l)):
            out_[node] = out_.get(node, one) * (1.0 - alpha_of[l][j])
    total = tf.constant(0.0)
    for l in live:
        p_out = one if l == num_blocks - 1 else out_.get(l + 1, one)
        for j, node in enumerate(plan.branch_sources(l)):
            source_block = node - 1 if exact else l - 1
            p_in = in_.get(source_block, one) if source_block >= 0 else one
            total += costs[l][j] * (alpha_of[l][j] - p_in - p_out)
    return total


def pruned_cost(backbone: Backbone, plan: Plan, image_size: int, num_classes: int,
                student: Student) -> dict:
    """Multiply-adds and parameters of the static network of `plan`."""
    parts = backbone_flops(backbone, image_size)
    branch = branch_flops(backbone, plan, image_size)
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

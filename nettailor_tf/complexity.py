"""Analytic multiply-adds and parameter counts of networks and of their parts.

FLOPs here are multiply-adds of one image, counted from the layer geometry
(convolutions and dense layers; BN folds into the convs at inference and
element-wise ops are negligible), so they are exact, cheap and available at
any image size without running anything.
"""
from __future__ import annotations

import keras

from nettailor_tf.backbones import Backbone
from nettailor_tf.layers import BasicBlock, Bottleneck, ConvBN, InvertedResidual, Normalize

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

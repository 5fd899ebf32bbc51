"""Proxy (shapes, -inf padding, weights, BN statistics, folding) and NetTailorBlock
(saving, mixing, the mimic route)."""
import functools

import keras
import numpy as np
from helpers import randomize_weights
import pytest
import tensorflow as tf

from nettailor_tf.model.blocks import NetTailorBlock, Proxy
from nettailor_tf.model.layers import BasicBlock, ConvBN, fold_batchnorm



def _proxy(in_channels, out_channels, pool_stride=1, hidden_channels=None, seed=0):
    proxy = Proxy(out_channels, pool_stride, hidden_channels)
    proxy.build((None, None, None, in_channels))
    randomize_weights(proxy, seed, kernel_std=0.3)
    return proxy


def _bn_statistics(layer):
    return [v.numpy().copy() for v in layer.weights if v.name in ("moving_mean", "moving_variance")]


def _tf_same_max_pool(x, kernel, stride):
    """NumPy max-pool with TF "same" geometry (extra padding after), padding with -inf."""
    n, h, w, c = x.shape
    outs = []
    for size in (h, w):
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        outs.append((out, total // 2, total - total // 2))
    (oh, top, bottom), (ow, left, right) = outs
    padded = np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)], constant_values=-np.inf)
    y = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = padded[:, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
            y[:, i, j] = window.max(axis=(1, 2))
    return y


# --- Proxy ---------------------------------------------------------------------

@pytest.mark.parametrize("pool_stride", [1, 2, 4])
@pytest.mark.parametrize("size", [7, 8, 9, 15, 16])
def test_proxy_output_shape_is_ceil_of_size_over_stride(pool_stride, size):
    """Like the strided blocks, a proxy gives ceil(size / stride) outputs on odd and even sizes."""
    proxy = _proxy(3, 5, pool_stride)
    y = proxy(tf.random.normal((2, size, size + 1, 3)), training=False)
    expected = (2, -(-size // pool_stride), -(-(size + 1) // pool_stride), 5)
    assert tuple(y.shape) == expected
    assert proxy.compute_output_shape((2, size, size + 1, 3)) == expected


@pytest.mark.parametrize("pool_stride,size", [(2, 8), (2, 9), (4, 9), (4, 16)])
def test_proxy_max_pool_pads_with_minus_infinity(pool_stride, size):
    """On all-negative inputs the pooled values stay negative: the padding is -inf, not zeros."""
    channels = 4
    proxy = Proxy(channels, pool_stride)
    proxy.build((None, None, None, channels))
    # Identity 1x1 conv and a BN at its initial statistics: the proxy returns the
    # pooled input divided by sqrt(1 + eps).
    proxy.convs[-1].conv.kernel.assign(np.eye(channels, dtype=np.float32)[None, None])
    x = -1.0 - np.random.default_rng(0).uniform(0, 3, (2, size, size, channels)).astype(np.float32)
    y = proxy(x, training=False).numpy() * np.sqrt(1 + proxy.bn_epsilon)
    assert y.max() < 0  # zero padding would put zeros on the border
    np.testing.assert_allclose(y, _tf_same_max_pool(x, pool_stride + 1, pool_stride), rtol=1e-6)


@pytest.mark.parametrize("pool_stride,size", [(2, 8), (2, 9), (4, 9), (4, 16), (8, 17)])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_symmetric_proxy_pool_centres_its_windows_like_pytorch_blocks(pool_stride, size,
                                                                      nonnegative):
    """pool_padding='symmetric' pools the windows [i*s - s//2, i*s + s//2], as a PyTorch
    block's stride-s convolution with padding k//2 sees them, padding as if with -inf
    (mirrored rows), or with zeros where the input is post-ReLU."""
    channels = 3
    proxy = Proxy(channels, pool_stride, pool_padding="symmetric",
                  nonnegative_input=nonnegative)
    proxy.build((None, None, None, channels))
    proxy.convs[-1].conv.kernel.assign(np.eye(channels, dtype=np.float32)[None, None])
    rng = np.random.default_rng(size)
    x = rng.uniform(0, 3, (2, size, size, channels)).astype(np.float32)
    if not nonnegative:
        x -= 4.0  # all negative: zero padding would show
    y = proxy(x, training=False).numpy() * np.sqrt(1 + proxy.bn_epsilon)
    half, out = pool_stride // 2, -(-size // pool_stride)
    padded = np.pad(x, [(0, 0), (half, half), (half, half), (0, 0)], constant_values=-np.inf)
    expected = np.stack([np.stack([
        padded[:, i * pool_stride:i * pool_stride + pool_stride + 1,
               j * pool_stride:j * pool_stride + pool_stride + 1].max(axis=(1, 2))
        for j in range(out)], axis=1) for i in range(out)], axis=1)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    if size % pool_stride == 0:
        # TF's "same" pads nothing before a size the stride divides: its windows start at
        # i*s, and give another answer on the same input.
        same = _tf_same_max_pool(x, pool_stride + 1, pool_stride)
        assert not np.allclose(same, expected)


def test_proxy_weight_counts():
    """Plain proxy: kernel, gamma, beta (+ 2 BN statistics); bottleneck: twice that."""
    plain = _proxy(24, 40)
    assert len(plain.trainable_weights) == 3 and len(plain.non_trainable_weights) == 2
    assert sum(int(np.prod(v.shape)) for v in plain.trainable_weights) == 24 * 40 + 2 * 40

    bottleneck = _proxy(32, 64, hidden_channels=16)
    assert len(bottleneck.trainable_weights) == 6 and len(bottleneck.non_trainable_weights) == 4
    # 1x1 conv 32->16 + BN(16) gamma/beta, then 1x1 conv 16->64 + BN(64) gamma/beta.
    expected = 32 * 16 + 2 * 16 + 16 * 64 + 2 * 64
    assert sum(int(np.prod(v.shape)) for v in bottleneck.trainable_weights) == expected
    kernels = [tuple(c.conv.kernel.shape) for c in bottleneck.convs]
    assert kernels == [(1, 1, 32, 16), (1, 1, 16, 64)]
    assert bottleneck.convs[0].activation == "relu" and bottleneck.convs[-1].activation is None


def test_new_proxy_kernel_is_small():
    """The 1x1 kernel starts N(0, 0.01): a new proxy is close to silent."""
    proxy = Proxy(256, 1)
    proxy.build((None, None, None, 256))
    std = float(np.std(proxy.convs[-1].conv.kernel.numpy()))
    assert 0.008 < std < 0.012


def test_gated_batch_norm_trains_as_keras_batch_norm():
    """ConvBN's gated BN (`scale=`, one fused op) in training mode: Keras's BN output times
    the scale, and the moving statistics Keras's layer moves to."""
    conv = ConvBN(6, 1, bn_epsilon=1e-3)
    conv.build((None, None, None, 5))
    randomize_weights(conv, 0, kernel_std=0.3)
    twin = ConvBN.from_config(conv.get_config())
    twin.build((None, None, None, 5))
    twin.set_weights(conv.get_weights())
    x = tf.random.normal((4, 7, 7, 5), mean=1.0, stddev=2.0, seed=1)
    gated = conv(x, training=True, scale=0.7)
    plain = twin(x, training=True)  # Keras's BatchNormalization layer
    np.testing.assert_allclose(gated.numpy(), 0.7 * plain.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(_bn_statistics(conv), _bn_statistics(twin)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden_channels", [None, 6])
def test_folded_proxy_equals_inference_output(hidden_channels):
    """fold_batchnorm(proxy) has no BN and computes the proxy's inference output."""
    proxy = _proxy(5, 7, pool_stride=2, hidden_channels=hidden_channels, seed=3)
    folded = fold_batchnorm(proxy, (None, None, None, 5))
    assert isinstance(folded, Proxy) and folded.folded and folded.pool_stride == 2
    assert all(conv.bn is None for conv in folded.convs)
    x = tf.random.normal((3, 10, 10, 5), seed=4)
    np.testing.assert_allclose(folded(x).numpy(), proxy(x, training=False).numpy(), atol=1e-5)


def test_proxy_config_round_trip_keeps_the_pool_alignment():
    proxy = Proxy(6, 2, pool_padding="symmetric", nonnegative_input=True, name="p")
    restored = Proxy.from_config(proxy.get_config())
    assert (restored.pool_padding, restored.nonnegative_input) == ("symmetric", True)


def test_proxy_config_round_trip():
    """get_config/from_config keeps the geometry."""
    proxy = Proxy(12, pool_stride=4, hidden_channels=16, bn_epsilon=1e-3, name="p")
    restored = Proxy.from_config(proxy.get_config())
    assert (restored.out_channels, restored.pool_stride, restored.hidden_channels,
            restored.bn_epsilon, restored.name) == (12, 4, 16, 1e-3, "p")


def test_proxy_rejects_bad_stride():
    with pytest.raises(ValueError):
        Proxy(4, pool_stride=0)


# --- NetTailorBlock ---------------------------------------------------------------

def _block(seed=0):
    """Block over node l (8x8x16) with proxies reading node l and node l-1 (16x16x8)."""
    universal = BasicBlock(16, 16, 1, name="universal")
    universal.build((None, 8, 8, 16))
    universal.trainable = False
    proxies = [Proxy(16, 1, name="proxy_from_l"), Proxy(16, 2, name="proxy_from_l_minus_1")]
    block = NetTailorBlock(universal, proxies, activation="relu", name="tailored")
    block.build([(None, 8, 8, 16), (None, 8, 8, 16), (None, 16, 16, 8)])
    randomize_weights(block, seed, kernel_std=0.3)
    return block


def _block_inputs(seed=0):
    rng = np.random.default_rng(seed)
    node_l = np.maximum(rng.normal(0, 1, (4, 8, 8, 16)), 0).astype(np.float32)
    node_before = np.maximum(rng.normal(0, 1, (4, 16, 16, 8)), 0).astype(np.float32)
    return [node_l, node_l, node_before]


def test_block_output_is_the_gated_mix_after_the_activation():
    """node = relu(sum_j alpha_j branch_j), with branch 0 the universal block."""
    block = _block()
    inputs = _block_inputs()
    alphas = block.gate.alphas().numpy()
    branches = [block.universal(inputs[0], training=False)] + [
        p(x, training=False) for p, x in zip(block.proxies, inputs[1:])]
    expected = np.maximum(sum(a * b.numpy() for a, b in zip(alphas, branches)), 0)
    node, mimic_node = block(inputs, training=False)
    np.testing.assert_allclose(node.numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(mimic_node.numpy(), node.numpy())


def test_block_keras_round_trip(tmp_path):
    """A model with a NetTailorBlock (universal, proxies, gate and its mask) survives `.keras`."""
    node_l = keras.Input((8, 8, 16), name="node_l")
    node_before = keras.Input((16, 16, 8), name="node_before")
    block = _block(seed=5)
    block.gate.keep.assign([1.0, 0.0, 1.0])
    model = keras.Model([node_l, node_before], block([node_l, node_l, node_before])[0])
    path = str(tmp_path / "block.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    inputs = _block_inputs(seed=6)
    feed = [inputs[0], inputs[2]]
    np.testing.assert_allclose(restored(feed).numpy(), model(feed).numpy(), atol=1e-6)
    restored_block = restored.get_layer("tailored")
    assert isinstance(restored_block, NetTailorBlock)
    assert [p.pool_stride for p in restored_block.proxies] == [1, 2]
    np.testing.assert_array_equal(restored_block.gate.keep.numpy(), [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(restored_block.gate.logits.numpy(), block.gate.logits.numpy())


def test_mimic_route_has_the_main_route_values():
    """Training mode: the mimic node has the node's values, and the BN statistics move
    once, as one call of each proxy moves them."""
    block = _block(seed=7)
    inputs = _block_inputs(seed=8)
    start = _bn_statistics(block)
    node, routed = block(inputs, training=True)
    np.testing.assert_array_equal(routed.numpy(), node.numpy())
    after_block = _bn_statistics(block)

    for v, value in zip([v for v in block.weights if v.name.startswith("moving_")], start):
        v.assign(value)
    for proxy, x in zip(block.proxies, inputs[1:]):
        proxy(x, training=True)
    for a, b in zip(after_block, _bn_statistics(block)):
        np.testing.assert_allclose(a, b, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(start, after_block))

    # Inference: both outputs are the node.
    node, routed = block(inputs, training=False)
    np.testing.assert_array_equal(node.numpy(), routed.numpy())


def test_mimic_route_sends_no_gradient_to_the_inputs():
    """Gradients of the routed output reach the proxies and gate but not the inputs."""
    block = _block(seed=9)
    inputs = [tf.constant(x) for x in _block_inputs(seed=10)]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        node, routed = block(inputs, training=True)
        main_loss, routed_loss = tf.reduce_sum(node ** 2), tf.reduce_sum(routed ** 2)
    assert all(g is None or not np.any(g.numpy()) for g in tape.gradient(routed_loss, inputs))
    assert all(g is not None and np.any(g.numpy()) for g in tape.gradient(main_loss, inputs))
    variables = block.gate.trainable_weights + [
        v for p in block.proxies for v in p.trainable_weights]
    grads = tape.gradient(routed_loss, variables)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)


def _evaluated_twice(block, inputs):
    """The published routing: the block, and the block again on stop-gradient inputs."""
    def evaluate(xs):
        alphas = block.gate.alphas()
        branches = [block.universal(xs[0], training=False)] + [
            p(x, training=True) for p, x in zip(block.proxies, xs[1:])]
        return tf.nn.relu(tf.add_n([alphas[j] * b for j, b in enumerate(branches)]))
    return evaluate(inputs), evaluate([tf.stop_gradient(x) for x in inputs])


@pytest.mark.parametrize("read", ["both", "node", "mimic"])
def test_one_evaluation_has_the_gradients_of_two(read):
    """Gradients through (node, mimic node) of one evaluation equal those of the block
    evaluated twice, the second time on stop-gradient inputs: for the inputs and every
    trainable weight, whichever outputs the loss reads."""
    block = _block(seed=11)
    node_l, _, node_before = [tf.constant(x) for x in _block_inputs(seed=12)]
    # The universal block and the first proxy read the same tensor, as in a student.
    inputs, sources = [node_l, node_l, node_before], [node_l, node_before]
    rng = np.random.default_rng(13)
    weights = [tf.constant(rng.normal(0, 1, (4, 8, 8, 16)).astype(np.float32)) for _ in range(2)]

    def loss(node, mimic_node):
        terms = {"node": tf.reduce_sum(weights[0] * node),
                 "mimic": tf.reduce_sum(weights[1] * mimic_node ** 2)}
        return sum(terms.values()) if read == "both" else terms[read]

    variables = block.trainable_weights
    results = []
    for outputs in (block, functools.partial(_evaluated_twice, block)):
        with tf.GradientTape() as tape:
            tape.watch(sources)
            value = loss(*(outputs(inputs, training=True) if outputs is block
                           else outputs(inputs)))
        grads = tape.gradient(value, sources + variables)
        results.append((float(value), [np.zeros(v.shape) if g is None else g.numpy()
                                       for g, v in zip(grads, sources + variables)]))
    (one, one_grads), (two, two_grads) = results
    assert one == pytest.approx(two, rel=1e-5)
    assert max(np.abs(g).max() for g in two_grads) > 1e-2  # not trivially zero
    for a, b in zip(one_grads, two_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_block_needs_a_branch():
    with pytest.raises(ValueError):
        NetTailorBlock(None, [])

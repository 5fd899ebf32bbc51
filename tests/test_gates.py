"""Gate: initial alphas, the keep-mask (exact zeros, renormalised, no retrace), config, weights."""
import numpy as np
import pytest
import tensorflow as tf

from nettailor_tf.model.gates import Gate, sharpness


def _softmax(logits):
    e = np.exp(np.asarray(logits, np.float64))
    return e / e.sum()


def _gate(num_branches, initial_logits=None):
    gate = Gate(num_branches, initial_logits)
    gate.build()
    return gate


def test_initial_alphas_favour_the_universal_branch():
    """Logits +2 / -2: alpha_universal = e^2 / (e^2 + 3 e^-2) ~ 0.948 with 3 proxies."""
    alphas = _gate(4).alphas().numpy()
    e = np.e
    expected = np.array([e ** 2, e ** -2, e ** -2, e ** -2]) / (e ** 2 + 3 * e ** -2)
    np.testing.assert_allclose(alphas, expected, rtol=1e-6)
    assert round(float(alphas[0]), 2) == 0.95  # the paper: "about 0.95"
    assert alphas.sum() == pytest.approx(1.0, abs=1e-6)
    # A block without proxies passes its universal branch through unchanged.
    np.testing.assert_array_equal(_gate(1).alphas().numpy(), [1.0])


def test_keep_mask_excludes_branches_and_renormalises():
    """A pruned branch gets exactly 0 and the rest are a softmax over the kept logits only."""
    gate = _gate(4, [0.5, -1.0, 2.0, 0.25])
    gate.keep.assign([1.0, 0.0, 1.0, 1.0])
    alphas = gate.alphas().numpy()
    assert alphas[1] == 0.0
    kept = _softmax([0.5, 2.0, 0.25])
    np.testing.assert_allclose(alphas[[0, 2, 3]], kept, rtol=1e-6)
    # Pruning the universal branch works the same way.
    gate.keep.assign([0.0, 1.0, 0.0, 1.0])
    alphas = gate.alphas().numpy()
    assert alphas[0] == 0.0 and alphas[2] == 0.0
    np.testing.assert_allclose(alphas[[1, 3]], _softmax([-1.0, 0.25]), rtol=1e-6)


def test_pruned_logits_get_zero_finite_gradients():
    """Masked logits get exactly zero gradient and nothing is NaN (the -inf stays internal)."""
    gate = _gate(3, [1.0, 0.0, -1.0])
    gate.keep.assign([0.0, 1.0, 0.0])  # a single kept branch: alpha exactly 1, gradient 0
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(gate.alphas() * tf.constant([3.0, 5.0, 7.0]))
    grad = tape.gradient(value, gate.logits).numpy()
    assert float(value) == 5.0
    np.testing.assert_array_equal(grad, [0.0, 0.0, 0.0])

    gate.keep.assign([1.0, 1.0, 0.0])
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(gate.alphas() * tf.constant([3.0, 5.0, 7.0]))
    grad = tape.gradient(value, gate.logits).numpy()
    assert np.all(np.isfinite(grad)) and grad[2] == 0.0
    a = _softmax([1.0, 0.0])
    # d/dz_i sum_j a_j w_j = a_i (w_i - sum_j a_j w_j)
    mean = a[0] * 3 + a[1] * 5
    np.testing.assert_allclose(grad[:2], [a[0] * (3 - mean), a[1] * (5 - mean)], rtol=1e-5)

    # A dead block (every branch masked) outputs zeros, with zero (not NaN) gradients.
    gate.keep.assign([0.0, 0.0, 0.0])
    with tf.GradientTape() as tape:
        alphas = gate.alphas()
        value = tf.reduce_sum(alphas * tf.constant([3.0, 5.0, 7.0]))
    np.testing.assert_array_equal(alphas.numpy(), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(tape.gradient(value, gate.logits).numpy(), [0.0, 0.0, 0.0])


def test_changing_the_mask_does_not_retrace():
    """The keep-mask is a variable: a traced function sees the new mask without retracing."""
    gate = _gate(4)
    traces = []

    @tf.function
    def read_alphas():
        traces.append(1)  # Python side effect: runs once per trace
        return gate.alphas()

    before = read_alphas().numpy()
    gate.keep.assign([1.0, 1.0, 0.0, 0.0])
    after = read_alphas().numpy()
    gate.logits.assign([0.0, 0.0, 0.0, 0.0])
    last = read_alphas().numpy()
    assert len(traces) == 1
    np.testing.assert_allclose(before, _softmax([2, -2, -2, -2]), rtol=1e-6)
    np.testing.assert_allclose(after, np.r_[_softmax([2, -2]), 0, 0], rtol=1e-6)
    np.testing.assert_allclose(last, [0.5, 0.5, 0.0, 0.0], rtol=1e-6)


def test_config_round_trip():
    """from_config(get_config()) rebuilds a gate with the same branches and starting logits."""
    gate = Gate(3, [1.5, -0.5, 0.0], name="my_gate")
    config = gate.get_config()
    assert config["num_branches"] == 3 and config["initial_logits"] == [1.5, -0.5, 0.0]
    restored = Gate.from_config(config)
    restored.build()
    gate.build()
    assert restored.name == "my_gate" and restored.num_branches == 3
    np.testing.assert_array_equal(restored.alphas().numpy(), gate.alphas().numpy())
    np.testing.assert_allclose(restored.alphas().numpy(), _softmax([1.5, -0.5, 0.0]), rtol=1e-6)


def test_weight_counts():
    """The logits and the mass can be trained (the student trains only the logits); the
    keep-mask cannot."""
    gate = _gate(5)
    assert [v.name for v in gate.trainable_weights] == ["logits", "mass"]
    assert [v.name for v in gate.non_trainable_weights] == ["keep"]
    assert float(gate.mass.numpy()) == 1.0
    assert gate.logits.shape == (5,) and gate.keep.shape == (5,)
    np.testing.assert_array_equal(gate.keep.numpy(), np.ones(5))
    np.testing.assert_array_equal(gate.logits.numpy(), [2, -2, -2, -2, -2])


def test_mass_scales_the_kept_branches_and_sharpness_reads_the_entropy():
    gate = _gate(3)
    gate.keep.assign([1.0, 0.0, 1.0])
    gate.mass.assign(0.6)
    alphas = gate.alphas().numpy()
    assert alphas[1] == 0 and alphas.sum() == pytest.approx(0.6)
    np.testing.assert_allclose(alphas[[0, 2]] / 0.6, _softmax([2.0, -2.0]), rtol=1e-6)
    sharp = sharpness([[1.0], [0.5, 0.5], [0.98, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]])
    assert sharp["normalized_entropy"][0] is None  # one branch: nothing to choose
    assert sharp["normalized_entropy"][1] == pytest.approx(1.0)
    assert sharp["normalized_entropy"][3] == pytest.approx(1.0)
    assert 0 < sharp["normalized_entropy"][2] < 0.15
    assert sharp["mean_normalized_entropy"] == pytest.approx(
        (2 + sharp["normalized_entropy"][2]) / 3, abs=1e-4)


@pytest.mark.parametrize("args", [(0,), (2, [1.0]), (1, [1.0, 2.0])])
def test_invalid_arguments(args):
    """Zero branches or a logit count that does not match are rejected."""
    with pytest.raises(ValueError):
        Gate(*args)

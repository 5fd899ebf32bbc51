"""Losses by hand: the mimic term T of the paper and the cross-entropy."""
import numpy as np
import pytest
import tensorflow as tf

from nettailor_tf.model.losses import cross_entropy, mimic_loss, mse


def test_mimic_loss_by_hand():
    """T = [MSE(z_s, z_t) + sum over live blocks MSE(h_l^s, h_l^t)] / L, L = all blocks."""
    logits = tf.constant([[1.0, 2.0], [0.0, -1.0]])
    teacher_logits = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    # Squared errors 0, 4, 0, 4 -> MSE 2.
    student_block0 = tf.constant([[1.0, 1.0, 1.0, 1.0]])
    teacher_block0 = tf.constant([[0.0, 1.0, 3.0, 1.0]])   # errors 1, 0, 4, 0 -> MSE 1.25
    student_block2 = tf.constant([[2.0, 2.0]])
    teacher_block2 = tf.constant([[5.0, 2.0]])             # errors 9, 0 -> MSE 4.5
    # Blocks 1 and 3 are pruned: their teacher endpoints must be ignored.
    teacher_endpoints = [teacher_block0, tf.fill((1, 3), 100.0), teacher_block2,
                         tf.fill((1, 2), -100.0)]
    value = mimic_loss(logits, [student_block0, student_block2], teacher_logits,
                       teacher_endpoints, live_blocks=[0, 2], num_blocks=4)
    assert float(value) == pytest.approx((2.0 + 1.25 + 4.5) / 4, rel=1e-6)


def test_mimic_loss_is_zero_on_the_teacher_and_float32_on_half_inputs():
    """A perfect mimic costs 0; float16 inputs are compared in float32."""
    rng = np.random.default_rng(0)
    endpoints = [tf.constant(rng.normal(0, 1, (2, 4, 4, 3)), tf.float32) for _ in range(3)]
    logits = tf.constant(rng.normal(0, 1, (2, 7)), tf.float32)
    assert float(mimic_loss(logits, endpoints, logits, endpoints, [0, 1, 2], 3)) == 0.0
    half = mimic_loss(tf.constant([[300.0]], tf.float16), [], tf.constant([[0.0]], tf.float16),
                      [], [], 1)
    assert half.dtype == tf.float32 and float(half) == 90000.0  # overflows in float16 (max 65504)


def test_mse_is_the_mean_over_all_elements():
    a = tf.constant([[[1.0, 3.0]], [[0.0, 0.0]]])
    assert float(mse(a, tf.zeros_like(a))) == pytest.approx((1 + 9) / 4)


def test_cross_entropy_by_hand():
    """Mean over the batch of -log softmax(logits)[label]."""
    logits = tf.constant([[0.0, 0.0], [2.0, 0.0]])
    labels = tf.constant([1, 1])
    expected = (np.log(2.0) + np.log(1 + np.exp(2.0))) / 2
    assert float(cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_normalized_mimic_is_relative_to_the_teacher_scale():
    teacher_logits = np.array([[2.0, 0.0]], np.float32)
    logits = np.array([[1.0, 0.0]], np.float32)
    teacher_block = np.full((1, 2, 2, 1), 10.0, np.float32)
    student_block = np.full((1, 2, 2, 1), 9.0, np.float32)
    plain = mimic_loss(logits, [student_block], teacher_logits, [teacher_block], [0], 1)
    # Logits: MSE 0.5; block: MSE 1.
    assert float(plain) == pytest.approx(0.5 + 1.0)
    relative = mimic_loss(logits, [student_block], teacher_logits, [teacher_block], [0], 1,
                          normalized=True)
    # Divided by the teacher's mean squares: 0.5 / 2 and 1 / 100.
    assert float(relative) == pytest.approx(0.25 + 0.01)
    # Scaling student and teacher together leaves the relative error unchanged.
    scaled = mimic_loss(logits, [5 * student_block], teacher_logits, [5 * teacher_block], [0], 1,
                        normalized=True)
    assert float(scaled) == pytest.approx(float(relative))

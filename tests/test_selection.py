"""Per-image answers and paired comparisons with confidence bounds."""
import math

import numpy as np
import pytest
import tensorflow as tf

from nettailor_tf import data as data_lib
from nettailor_tf.training import selection


def test_a_paired_comparison_counts_the_images_only_one_network_gets_right():
    a = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1], bool)
    b = np.array([1, 0, 0, 1, 0, 1, 1, 1, 1, 1], bool)
    paired = selection.paired(a, b)
    assert (paired.n, paired.a_only, paired.b_only) == (10, 2, 1)
    assert paired.difference == pytest.approx(np.mean(a) - np.mean(b))
    assert paired.accuracy_b == pytest.approx(0.7)
    # The variance of a paired difference of proportions: (discordant share
    # - difference^2) / n.
    assert paired.standard_error == pytest.approx(math.sqrt((0.3 - 0.1 ** 2) / 10))
    assert paired.lower(0.9) == pytest.approx(0.1 - 1.2815516 * paired.standard_error)
    assert paired.upper(0.9) == pytest.approx(0.1 + 1.2815516 * paired.standard_error)


def test_pairing_is_what_gives_power():
    """Two networks that differ on 10 of 4,000 images: their accuracies'
    own spreads (about 0.7 points each) would hide the 0.25-point
    difference; the paired bound does not."""
    rng = np.random.default_rng(0)
    b = rng.random(4000) < 0.9
    a = b.copy()
    a[np.flatnonzero(b)[:10]] = False
    paired = selection.paired(a, b)
    assert paired.difference == pytest.approx(-10 / 4000)
    unpaired_error = math.sqrt(2 * 0.9 * 0.1 / 4000)  # two independent accuracies
    assert paired.standard_error < unpaired_error / 5
    assert paired.upper(0.9) < 0 < paired.difference + 1.28 * unpaired_error
    assert paired.as_dict(0.9)["b_only"] == 10


def test_identical_answers_have_no_spread_and_mismatched_shapes_are_refused():
    same = selection.paired(np.ones(5, bool), np.ones(5, bool))
    assert same.difference == 0 and same.standard_error == 0
    with pytest.raises(ValueError, match="paired comparison"):
        selection.paired(np.ones(5, bool), np.ones(4, bool))
    assert selection.paired(np.zeros(0, bool), np.zeros(0, bool)).standard_error == math.inf


def test_answers_follow_the_splits_stored_order_with_their_labels():
    """A network that answers with each image's mean pixel class: the answers
    must line up with the labels the same pipeline yields."""
    task = data_lib.with_validation_split(data_lib.load_task("digits"), 0.1, 0)
    step = selection.answer_function(
        lambda images: tf.one_hot(tf.cast(tf.reduce_mean(images, [1, 2, 3]) % 10, tf.int32), 10))
    predicted, labels = selection.answers(step, task, 16, 64, ("val", "test"))
    assert predicted.shape == labels.shape == (task.num_val + task.num_test,)
    expected = []
    for split in ("val", "test"):
        for images, batch_labels in data_lib.eval_pipeline(task, 16, 64, split):
            expected.append(np.asarray(tf.cast(tf.reduce_mean(images, [1, 2, 3]) % 10, tf.int32)))
            np.testing.assert_array_equal(batch_labels.numpy(),
                                          labels[sum(map(len, expected)) - len(batch_labels):
                                                 sum(map(len, expected))])
    np.testing.assert_array_equal(predicted, np.concatenate(expected))

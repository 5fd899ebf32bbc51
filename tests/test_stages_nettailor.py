"""The loss and the student-to-pruned step the NetTailor stages share."""
import functools

import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize_weights, stage_config, task_layers

from nettailor_tf import data as data_lib
from nettailor_tf.model import losses, pruning, student_network
from nettailor_tf.run import artifacts
from nettailor_tf.stages import nettailor


def _student_and_teacher(config):
    student = artifacts.full_student(config, 10)
    randomize_weights(task_layers(student), 1)
    teacher, backbone = artifacts.build_teacher(config, 10)
    return student, teacher


def test_the_loss_adds_complexity_only_when_weighted(tmp_path):
    config = stage_config(tmp_path)
    student, teacher = _student_and_teacher(config)
    costs = [[0.1] * (len(a)) for a in student.alphas()]
    images = tf.random.uniform((2, 16, 16, 3), 0, 255, seed=0)
    labels = tf.constant([1, 2])
    with_cost = nettailor.nettailor_loss(student, teacher, costs, 0.3, 10.0, True)
    without = nettailor.nettailor_loss(student, teacher, costs, 0.0, 10.0, True)
    total, _, terms = with_cost(images, labels, False)
    total0, _, terms0 = without(images, labels, False)
    assert "complexity" in terms and "complexity" not in terms0
    np.testing.assert_allclose(float(total), float(terms["ce"] + 10 * terms["mimic"]
                                                   + 0.3 * terms["complexity"]), rtol=1e-5)
    np.testing.assert_allclose(float(total0), float(terms0["ce"] + 10 * terms0["mimic"]),
                               rtol=1e-5)


def test_the_mimic_term_averages_over_the_blocks_a_pruned_network_keeps(tmp_path):
    config = stage_config(tmp_path)
    _, teacher = _student_and_teacher(config)
    # Block 1 is gone; block 2 reads block 0's output through a proxy.
    block = student_network.BlockPlan
    plan = student_network.Plan([block(True, [0]), block(False, []), block(False, [1]),
                                 block(True, [3])])
    network = artifacts.pruned_network(config, type("T", (), {"num_classes": 10})(), plan)
    randomize_weights(task_layers(network), 3)
    assert network.live_blocks == [0, 2, 3]
    images = tf.random.uniform((2, 16, 16, 3), 0, 255, seed=0)
    _, _, terms = nettailor.nettailor_loss(network, teacher, None, 0.0, 1.0, True)(
        images, tf.constant([1, 2]), False)
    logits, _, routed = network(images, training=False)
    teacher_logits, endpoints = teacher(images, training=False)
    over_live = losses.mimic_loss(logits, routed, teacher_logits, endpoints, [0, 2, 3], 3)
    over_all = losses.mimic_loss(logits, routed, teacher_logits, endpoints, [0, 2, 3], 4)
    np.testing.assert_allclose(float(terms["mimic"]), float(over_live), rtol=1e-5)
    assert abs(float(terms["mimic"]) - float(over_all)) > 1e-3 * float(over_all)


def test_a_pruned_network_gets_fresh_batchnorm_statistics(tmp_path, mocked_svhn):
    config = stage_config(tmp_path)
    task = data_lib.with_validation_split(data_lib.load_task("tfds:svhn_cropped"), 0.1, 0)
    student = artifacts.full_student(config, task.num_classes)
    randomize_weights(task_layers(student), 2)
    alphas = [a.numpy() for a in student.alphas()]
    plan = pruning.prune_plan(student.plan, alphas, 1, 0.0)
    pruned, accuracies = nettailor.prepared_pruned(
        config, tf.distribute.get_strategy(), task, student, plan, ["val"], raw_test=True)
    assert set(accuracies) == {"val", "raw_test"}
    assert all(0 <= a <= 1 for a in accuracies.values())
    # The proxies' statistics now describe the pruned stream, not the student's.
    before = {v.path: v.numpy() for p in student.tailored[-1].proxies for v in p.weights
              if "moving_mean" in v.path}
    after = {v.path: v.numpy() for p in pruned.tailored[-1].proxies for v in p.weights
             if "moving_mean" in v.path}
    assert before and after
    assert not all(np.allclose(b, a) for b, a in zip(before.values(), after.values()))


@pytest.mark.parametrize("split,expected", [("validation", 0.5), ("test", 0.9)])
def test_choices_read_the_selection_split(tmp_path, split, expected):
    config = stage_config(tmp_path, selection_split=split)
    assert nettailor.selection_accuracy(config, {"accuracy": 0.9, "val_accuracy": 0.5}) == expected
    assert nettailor.or_none(float("nan")) is None and nettailor.or_none(0.5) == 0.5


def test_the_fine_tune_trainer_reuses_the_passes_its_network_was_prepared_with(
        tmp_path, mocked_svhn, monkeypatch):
    """The trainer of a prepared pruned network evaluates and re-estimates
    its BN statistics with the passes `prepared_pruned_with_passes` traced
    (no second trace of the network), and reads what they read."""
    config = stage_config(tmp_path)
    strategy = tf.distribute.get_strategy()
    task = data_lib.with_validation_split(data_lib.load_task("tfds:svhn_cropped"), 0.1, 0)
    student = artifacts.full_student(config, task.num_classes)
    randomize_weights(task_layers(student), 2)
    plan = pruning.prune_plan(student.plan, [a.numpy() for a in student.alphas()], 1, 0.0)
    traces = []  # one entry per trace of the network (its passes are traced, never eager)
    call = student_network.Student.call

    @functools.wraps(call)  # Keras reads the `training` argument off the signature
    def counting_call(self, images, training=None, mimic=True):
        traces.append(training)
        return call(self, images, training=training, mimic=mimic)

    monkeypatch.setattr(student_network.Student, "call", counting_call)
    pruned, accuracies, passes = nettailor.prepared_pruned_with_passes(
        config, strategy, task, student, plan, ["val"], raw_test=True)
    traced = len(traces)
    assert True in traces and False in traces  # the BN pass and the inference pass
    trainer = nettailor.nettailor_trainer(config, strategy, task, pruned, None, config.finetune,
                                          0.0, "finetune", pruned=True, passes=passes)
    assert trainer.evaluate(task, config.image_size, config.eval_batch_size, "val") \
        == accuracies["val"]
    trainer.refresh_statistics(False)
    trainer.refresh_statistics(True)
    assert len(traces) == traced
    # Without them the trainer traces the network again.
    fresh = nettailor.nettailor_trainer(config, strategy, task, pruned, None, config.finetune,
                                        0.0, "finetune", pruned=True)
    assert fresh.evaluate(task, config.image_size, config.eval_batch_size, "val") \
        == accuracies["val"]
    assert len(traces) > traced

"""Checkpoints worth resuming from: every weight and optimizer slot by name, no
save while the loss is running away, a roll-back to the last healthy one on a
divergence, and a fall-back past a damaged file."""
import json
import math
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from nettailor_tf import data
from nettailor_tf.model import backbones
from nettailor_tf.model.losses import cross_entropy
from nettailor_tf.training import checkpoints, train

import helpers

SCHEDULE = train.Schedule(epochs=2, batch_size=32, learning_rate=0.05, decay_epochs=1)


@pytest.fixture(scope="module")
def digits():
    return data.load_task("digits")


def _trainer(tmp_dir, schedule=SCHEDULE, seed=0, loss_scale=None, rate_groups=False):
    """A tiny classifier's trainer; `loss_scale` (a tf.Variable) multiplies the
    loss, as a learning rate far too high would; `rate_groups`: the head at
    3x the rate held, the first two variables at 2x."""
    keras.utils.set_random_seed(seed)
    strategy = tf.distribute.get_strategy()
    model = backbones.classifier_model(backbones.build_backbone("tiny"), 10)

    def loss_fn(images, labels, training):
        logits, _ = model(images, training=training)
        loss = cross_entropy(logits, labels)
        return (loss if loss_scale is None else loss * loss_scale), logits, {}

    variables = model.trainable_variables
    multipliers = [2.0, 2.0] + [1.0] * (len(variables) - 4) + [3.0, 3.0]
    trainer = train.Trainer(strategy, model, loss_fn, variables, variables, schedule,
                            checkpoint_dir=str(tmp_dir), checkpoint_every=10, log_every=10,
                            lr_multipliers=multipliers if rate_groups else None,
                            held=variables[-2:] if rate_groups else ())
    return trainer, model


def test_checkpoint_holds_every_weight_of_a_subclassed_student(tmp_path):
    # TF's object graph misses layers a Keras 3 subclassed model keeps in
    # lists (the student's gates and proxies): the trainer keys weights by path.
    from nettailor_tf.model import student_network
    backbone = backbones.build_backbone("tiny")
    plan = student_network.Plan.full(4, 3)
    student = student_network.build_student(backbone, 10, plan, "frozen", 16)
    weights = checkpoints.weights_by_path(student)
    assert len(weights) == len(student.weights)
    checkpoint = tf.train.Checkpoint(weights=weights)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    gate = student.block(3).gate.logits
    moving_mean = student.block(3).proxies[0].convs[-1].bn.moving_mean
    saved_gate, saved_mean = gate.numpy(), moving_mean.numpy()
    gate.assign(gate.numpy() + 1.0)
    moving_mean.assign(moving_mean.numpy() + 1.0)
    checkpoint.restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(gate.numpy(), saved_gate)
    np.testing.assert_array_equal(moving_mean.numpy(), saved_mean)


def test_checkpoint_keys_stay_unique_when_folded_layers_share_a_path():
    # EfficientNet's folded stem and head both hold a ConvBN named "conv".
    from nettailor_tf.model import student_network
    backbone = backbones.build_backbone("efficientnet_lite0")
    student = student_network.build_student(backbone, 10, student_network.Plan.full(16, 3), "frozen", 32)
    weights = checkpoints.weights_by_path(student)
    assert len(weights) == len(student.weights)




def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(digits, tmp_path, caplog):
    first, _ = _trainer(tmp_path)
    first.fit(digits, 16, seed=3, max_steps=25)  # checkpoints at steps 20 and 25
    newest = tf.train.latest_checkpoint(str(tmp_path))
    assert newest.endswith("-25") or "ckpt" in newest
    data_files = [p for p in tmp_path.iterdir() if p.name.startswith(os.path.basename(newest))
                  and ".data" in p.name]
    for path in data_files:
        path.write_bytes(path.read_bytes()[:100])  # cut short, as a full disk would
    second, _ = _trainer(tmp_path, seed=99)
    with caplog.at_level("WARNING", logger="absl"):
        result = second.fit(digits, 16, seed=3, max_steps=30)
    assert any("cannot be read" in r.getMessage() and "trying the one before" in r.getMessage()
               for r in caplog.records)
    assert result.resumed_from_step == 20


def test_no_readable_checkpoint_is_one_clear_error(digits, tmp_path):
    first, _ = _trainer(tmp_path)
    first.fit(digits, 16, seed=3, max_steps=25)
    for path in tmp_path.iterdir():
        if ".data" in path.name:
            path.write_bytes(b"")
    second, _ = _trainer(tmp_path)
    with pytest.raises(train.TrainingError, match="no checkpoint in .* can be read; delete"):
        second.fit(digits, 16, seed=3)


def test_a_loss_that_blows_up_at_once_leaves_no_checkpoint_to_resume(digits, tmp_path):
    trainer, _ = _trainer(tmp_path, train.Schedule(2, 32, 1e12, 1))
    with pytest.raises(train.TrainingError,
                       match=r"digits: the loss (became|diverged).* at step \d+; no healthy "
                             r"checkpoint in .*; the stage starts over\. Rerun with a lower"):
        trainer.fit(digits, 16, seed=0)
    assert tf.train.latest_checkpoint(str(tmp_path)) is None


def test_a_divergence_rolls_back_to_the_last_healthy_checkpoint_and_a_rerun_learns(
        digits, tmp_path):
    # The loss is multiplied by 1e4 from step 25 on: the weights blow up within
    # a few steps, as with a learning rate far too high.
    boost = tf.Variable(1.0, trainable=False)
    calls = tf.Variable(0, trainable=False)

    def boosted(images, labels, training):
        calls.assign_add(1)
        boost.assign(tf.where(calls > 25, 1e4, 1.0))
        return boost

    trainer, _ = _trainer(tmp_path, loss_scale=None)
    inner = trainer.loss_fn
    trainer.loss_fn = lambda images, labels, training: (
        lambda out: (out[0] * boosted(images, labels, training), out[1], out[2]))(
        inner(images, labels, training))
    with pytest.raises(train.TrainingError) as info:
        trainer.fit(digits, 16, seed=3)
    message = str(info.value)
    assert "rolled back to the last healthy checkpoint, ckpt-20" in message, message
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-20")
    health = json.loads((tmp_path / checkpoints.HEALTH_FILE).read_text())
    # Every checkpoint kept was saved while the loss was near its best.
    assert all(loss <= checkpoints.SAVE_FACTOR * health["best"]
               for loss in health["checkpoints"].values())

    # The rerun (a sane loss now, as after lowering the learning rate) goes on
    # from step 20 and learns: far above chance (0.1).
    rerun, _ = _trainer(tmp_path, seed=99)
    result = rerun.fit(digits, 16, seed=3)
    assert result.resumed_from_step == 20
    assert result.test_accuracy > 0.3


def _tiny_model(name, width=4, third=False):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(width, name="first")(inputs)
    if third:
        hidden = keras.layers.Dense(width, name="third")(hidden)
    return keras.Model(inputs, keras.layers.Dense(4, name="second")(hidden), name=name)


def test_optimizer_slots_are_restored_by_weight_name_not_position(tmp_path):
    model = _tiny_model("net")
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    for k, slot in enumerate(optimizer.momentums):
        slot.assign(np.full(slot.shape, float(k + 1), np.float32))
    saved = {v.path: optimizer.momentums[optimizer._get_variable_index(v)].numpy()
             for v in model.trainable_variables}
    step = tf.Variable(0, dtype=tf.int64)
    checkpoints.TrainingCheckpoints(str(tmp_path), model, optimizer, step, "t").save(1)

    # The same network, its weights handed to the optimizer in reverse order:
    # the two kernels (and the two biases) have one shape, so a restore by
    # position would swap their momentum without an error.
    again = _tiny_model("net")
    reordered = keras.optimizers.SGD(0.1, momentum=0.9)
    reordered.build(list(reversed(again.trainable_variables)))
    restored = checkpoints.TrainingCheckpoints(str(tmp_path), again, reordered,
                                               tf.Variable(0, dtype=tf.int64), "t").restore()
    assert restored.endswith("ckpt-1")
    for v in again.trainable_variables:
        np.testing.assert_array_equal(
            reordered.momentums[reordered._get_variable_index(v)].numpy(), saved[v.path],
            err_msg=v.path)


def _keeper(directory, **changes):
    """The checkpoints of a tiny network with a built SGD optimizer
    (`changes`: another width, or a third layer)."""
    model = _tiny_model("net", **changes)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    return checkpoints.TrainingCheckpoints(str(directory), model, optimizer,
                                           tf.Variable(0, dtype=tf.int64), "t")


def test_a_save_is_held_back_while_the_loss_is_high_and_dropped_if_it_diverges(tmp_path):
    keeper = _keeper(tmp_path)

    def feed(loss, steps):
        for _ in range(steps):
            keeper.observe(loss, 0)

    feed(1.0, 20)
    assert keeper.save(20)
    feed(2.5, 20)                  # 2.5 x the best: still saved
    assert keeper.save(40)
    feed(5.0, 20)                  # 5 x: held back, not yet a divergence
    assert not keeper.save(60)
    assert keeper.save(60, final=True)  # a stage's last step always saves
    assert [os.path.basename(p) for p in keeper.manager.checkpoints] == ["ckpt-40", "ckpt-60"]

    # After the best improves to 0.5, ckpt-60 (saved at 5.0) is no longer
    # healthy, ckpt-40 (2.5) neither: a divergence drops both.
    feed(0.5, 20)
    with pytest.raises(train.TrainingError, match=r"no healthy checkpoint .* \(2 later one"):
        feed(math.nan, 1)
    assert tf.train.latest_checkpoint(str(tmp_path)) is None
    assert not (tmp_path / checkpoints.HEALTH_FILE).exists()


def test_the_best_loss_survives_a_restart(tmp_path):
    first = _keeper(tmp_path)
    for _ in range(20):
        first.observe(0.2, 0)
    first.save(20)
    second = _keeper(tmp_path)  # a new process: new network, new optimizer
    assert second.health.best == pytest.approx(0.2)
    for _ in range(checkpoints.MIN_STEPS):
        second.observe(1.0, 0)     # 5 x a best seen before the restart
    assert not second.save(25)


@pytest.mark.parametrize("changes, difference", [
    ({"width": 8}, r"weight 'first\.kernel' is \(4, 4\) in it and \(4, 8\) in the model"),
    ({"third": True}, r"it lacks the model's weight 'third\.kernel' \(2 missing in all\)"),
])
def test_a_checkpoint_of_a_changed_model_is_refused_by_name_not_skipped(tmp_path, caplog,
                                                                         changes, difference):
    """Two good checkpoints of one network; the changed network must not
    take either, nor warn and fall back as if the newest were damaged."""
    keeper = _keeper(tmp_path)
    keeper.save(1)
    keeper.save(2)
    newest = keeper.manager.latest_checkpoint
    changed = _keeper(tmp_path, **changes)
    with caplog.at_level("WARNING", logger="absl"):
        with pytest.raises(train.TrainingError) as caught:
            changed.restore()
    message = str(caught.value)
    assert re.fullmatch(rf"t: checkpoint {re.escape(newest)} does not match the model: "
                        rf"{difference}; rerun with the settings it was made with, or delete "
                        rf"{re.escape(str(tmp_path))} to train this stage over", message), message
    assert not [r for r in caplog.records if "cannot be read" in r.getMessage()]


def test_a_checkpoint_with_weights_the_model_lacks_is_refused(tmp_path):
    _keeper(tmp_path, third=True).save(1)
    with pytest.raises(train.TrainingError, match=r"ckpt-1 does not match the model: it holds 2 "
                                                  r"weight\(s\) the model lacks, e\.g\. "
                                                  r"'third\.bias'"):
        _keeper(tmp_path).restore()


# --- rate groups: one optimizer per group, checkpointed as one ----------------

def test_a_stage_with_rate_groups_resumes_every_groups_slots(digits, tmp_path):
    steps_per_epoch = data.steps_per_epoch(digits, SCHEDULE.batch_size)
    straight, straight_model = _trainer(tmp_path / "straight", rate_groups=True)
    straight.fit(digits, 16, seed=3, evaluate_test=False)
    assert len(straight.optimizer.group_optimizers) == 3
    stop = steps_per_epoch + 7  # mid-epoch, after the decay
    first, _ = _trainer(tmp_path / "resumed", rate_groups=True)
    first.fit(digits, 16, seed=3, max_steps=stop, evaluate_test=False)
    second, resumed_model = _trainer(tmp_path / "resumed", seed=99, rate_groups=True)
    assert second.fit(digits, 16, seed=3, evaluate_test=False).resumed_from_step == stop
    for a, b in zip(straight_model.weights, resumed_model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


PROBLEM_SCHEDULE = train.Schedule(epochs=2, batch_size=1, learning_rate=0.1, plateau=True,
                                  weight_decay=0.5, momentum=0.9)
BATCH = (tf.zeros((1, 4, 4, 3)), tf.zeros((1,), tf.int32))


class _AdamTrainer(train.Trainer):
    def make_group_optimizer(self, learning_rate):
        return keras.optimizers.Adam(learning_rate)


def _problem_trainer(directory, trainer_class=train.Trainer, seed=0):
    """`helpers.rate_group_problem`'s trainer, built, and its checkpoints."""
    model, loss, multipliers, held, decayed = helpers.rate_group_problem(seed)
    trainer = trainer_class(tf.distribute.get_strategy(), model,
                            lambda images, labels, training: (loss(), tf.zeros((1, 2)), {}),
                            model.trainable_variables, decayed, PROBLEM_SCHEDULE,
                            checkpoint_dir=str(directory), lr_multipliers=multipliers,
                            held=held)
    trainer.build_steps(steps_per_epoch=2)
    return trainer, model, checkpoints.TrainingCheckpoints(
        str(directory), model, trainer.optimizer, trainer.step, "t")


def test_adam_rate_groups_resume_with_their_moments_and_step_counts(tmp_path):
    # Adam's bias correction counts steps: each group's count must resume
    # too, or the first steps after a resume would be far too long.
    straight, straight_model, _ = _problem_trainer(tmp_path / "straight", _AdamTrainer)
    for _ in range(5):
        straight.train_step(BATCH)
    first, _, saver = _problem_trainer(tmp_path / "resumed", _AdamTrainer)
    for _ in range(3):
        first.train_step(BATCH)
    saver.save(3)
    second, resumed_model, restorer = _problem_trainer(tmp_path / "resumed", _AdamTrainer,
                                                       seed=9)
    assert restorer.restore()
    for _ in range(2):
        second.train_step(BATCH)
    for a, b in zip(straight_model.weights, resumed_model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)


def test_a_checkpoint_of_the_single_sgd_with_scaled_gradients_resumes_exactly(tmp_path):
    # The loop before rate groups: one SGD, gradients scaled per variable, the
    # plateau rule's lowered rate in the optimizer's variable.  Its momentum is
    # rate x gradient, as each group's SGD keeps it: the checkpoint restores
    # into the groups by name, and training goes on as the old loop would.
    model, loss, multipliers, held, decayed = helpers.rate_group_problem()
    initial = [v.numpy() for v in model.trainable_variables]
    rates = [0.1, 0.1, 0.01, 0.01, 0.01]
    old = keras.optimizers.SGD(0.1, momentum=0.9)
    helpers.old_rule_steps(old, model.trainable_variables, loss, multipliers, held, decayed,
                           0.5, 0.1, rates[:3])
    checkpoints.TrainingCheckpoints(str(tmp_path), model, old, tf.Variable(3, dtype=tf.int64),
                                    "t").save(3)
    helpers.old_rule_steps(old, model.trainable_variables, loss, multipliers, held, decayed,
                           0.5, 0.1, rates[3:])
    expected = [v.numpy() for v in model.trainable_variables]
    for variable, value in zip(model.trainable_variables, initial):
        variable.assign(value)

    trainer, resumed_model, restorer = _problem_trainer(tmp_path, seed=9)
    assert restorer.restore()
    assert int(trainer.step.numpy()) == 3
    assert float(trainer.optimizer.learning_rate) == pytest.approx(0.01)
    for _ in rates[3:]:
        trainer.train_step(BATCH)
    for value, variable in zip(expected, resumed_model.trainable_variables):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-5, atol=1e-7,
                                   err_msg=variable.path)

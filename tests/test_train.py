"""The training loop: resumption, the optimizer's arithmetic, the plateau rule, mixed
precision, two replicas and two worker processes (checkpoint health:
test_checkpoints.py; the plateau rule's decisions alone: test_plateau.py)."""
import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from nettailor_tf import data
from nettailor_tf.model import backbones
from nettailor_tf.model.losses import cross_entropy
from nettailor_tf.training import progress, train

import helpers

SCHEDULE = train.Schedule(epochs=2, batch_size=32, learning_rate=0.05, decay_epochs=1)


@pytest.fixture(scope="module")
def digits():
    return data.load_task("digits")


def _trainer(tmp_dir, schedule=SCHEDULE, seed=0):
    keras.utils.set_random_seed(seed)
    strategy = tf.distribute.get_strategy()
    model = backbones.classifier_model(backbones.build_backbone("tiny"), 10)

    def loss_fn(images, labels, training):
        logits, _ = model(images, training=training)
        return cross_entropy(logits, labels), logits, {}

    trainer = train.Trainer(strategy, model, loss_fn, model.trainable_variables,
                            model.trainable_variables, schedule, checkpoint_dir=str(tmp_dir),
                            checkpoint_every=10, log_every=10)
    return trainer, model


def test_interrupted_run_resumes_to_the_same_weights(digits, tmp_path):
    steps_per_epoch = data.steps_per_epoch(digits, SCHEDULE.batch_size)
    straight, straight_model = _trainer(tmp_path / "straight")
    result = straight.fit(digits, 16, seed=3)
    assert result.steps == 2 * steps_per_epoch and result.resumed_from_step == 0

    # Stop mid-epoch 1 (not on a checkpoint boundary of the epoch), as a kill would.
    stop = steps_per_epoch + 7
    first, _ = _trainer(tmp_path / "resumed")
    assert first.fit(digits, 16, seed=3, max_steps=stop).steps == stop
    # A new process would build everything afresh, with another initialisation.
    second, resumed_model = _trainer(tmp_path / "resumed", seed=99)
    result2 = second.fit(digits, 16, seed=3)
    assert result2.resumed_from_step == stop and result2.steps == 2 * steps_per_epoch
    for a, b in zip(straight_model.weights, resumed_model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert result2.test_accuracy == pytest.approx(result.test_accuracy, abs=1e-6)
    # Training learned something: 10 balanced classes, chance is 0.1.
    assert result.test_accuracy > 0.3

    # Resumed in the same process (the prune search's halfway check): the
    # trainer keeps its traced step and optimizer and ends at the same weights.
    same, same_model = _trainer(tmp_path / "same_process")
    halfway = same.fit(digits, 16, seed=3, max_steps=stop, evaluate_test=False)
    assert halfway.steps == stop and np.isnan(halfway.test_accuracy)
    traced = same.train_step
    result3 = same.fit(digits, 16, seed=3)
    assert same.train_step is traced and result3.resumed_from_step == stop
    for a, b in zip(straight_model.weights, same_model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_statistics_reach_the_host_only_to_be_shown_checked_or_saved(digits, tmp_path):
    """The loop reads its statistics at log steps, every HEALTH_EVERY steps
    for the divergence check and before each checkpoint, never once a step;
    and what it reads or when does not change the training."""
    schedule = train.Schedule(epochs=1, batch_size=32, learning_rate=0.05, decay_epochs=1)
    steps = data.steps_per_epoch(digits, schedule.batch_size)
    often, often_model = _trainer(tmp_path / "often", schedule)
    often.log_every = often.checkpoint_every = 1
    often.fit(digits, 16, seed=3, evaluate_test=False)
    assert often.host_reads >= steps  # a read per step, as asked
    rare, rare_model = _trainer(tmp_path / "rare", schedule)
    rare.log_every = rare.checkpoint_every = 1000
    rare.fit(digits, 16, seed=3, evaluate_test=False)
    # Health checks every HEALTH_EVERY steps, the epoch's end (a check and a
    # save), and the report's log lines (two a stage off a terminal).
    bound = -(-steps // train.HEALTH_EVERY) + 1 + progress.STEP_LINES_PER_STAGE + 1
    assert rare.host_reads <= bound < steps / 2
    for a, b in zip(often_model.weights, rare_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_divergence_is_caught_before_a_checkpoint_is_written(tmp_path):
    """The loss read in batches still judges every step: a loss that goes
    non-finite between two health checks stops the run at the next check,
    before the checkpoint that would have held it."""
    strategy = tf.distribute.get_strategy()
    w = tf.Variable(1.0)
    model = keras.Sequential([keras.layers.Input((1,)), keras.layers.Dense(1)])
    calls = tf.Variable(0)

    def loss_fn(images, labels, training):
        calls.assign_add(1)
        # Finite for 12 steps, then infinite: between the checks at 10 and 20.
        blow_up = tf.cast(calls > 12, tf.float32) * 1e38
        loss = tf.square(w) + blow_up * blow_up
        return loss, tf.zeros((tf.shape(labels)[0], 10)), {}

    digits_small = data.load_task("digits")
    trainer = train.Trainer(strategy, model, loss_fn, [w], [], train.Schedule(1, 32, 0.0, 1),
                            checkpoint_dir=str(tmp_path), checkpoint_every=15, log_every=1000)
    with pytest.raises(train.TrainingError, match="the loss became inf at step 13"):
        trainer.fit(digits_small, 8, seed=0)
    assert not tf.train.latest_checkpoint(str(tmp_path))  # step 15's was never written


def test_finished_run_is_not_trained_again(digits, tmp_path):
    trainer, _ = _trainer(tmp_path, train.Schedule(1, 32, 0.05, 1))
    first = trainer.fit(digits, 16, seed=0)
    again, _ = _trainer(tmp_path, train.Schedule(1, 32, 0.05, 1))
    second = again.fit(digits, 16, seed=0)
    assert second.resumed_from_step == second.steps == first.steps
    assert second.test_accuracy == pytest.approx(first.test_accuracy)


def test_sgd_with_coupled_weight_decay_and_step_decay():
    # One variable, loss = x (gradient 1): PyTorch's SGD with weight decay wd
    # and momentum m gives v1 = g + wd*x0, x1 = x0 - lr*v1.
    strategy = tf.distribute.get_strategy()
    w = keras.Variable(np.array([2.0], np.float32))
    schedule = train.Schedule(epochs=2, batch_size=1, learning_rate=0.1, decay_epochs=1,
                              weight_decay=0.5, momentum=0.9)

    def loss_fn(images, labels, training):
        return tf.reduce_sum(w), tf.zeros((1, 2)), {}

    trainer = train.Trainer(strategy, None, loss_fn, [w], [w], schedule, checkpoint_dir="unused")
    trainer.build_steps(steps_per_epoch=2)
    batch = (tf.zeros((1, 4, 4, 3)), tf.zeros((1,), tf.int32))
    trainer.train_step(batch)
    v1 = 1 + 0.5 * 2.0
    x1 = 2.0 - 0.1 * v1
    assert float(w[0]) == pytest.approx(x1, abs=1e-6)
    trainer.train_step(batch)
    v2 = 0.9 * v1 + (1 + 0.5 * x1)
    assert float(w[0]) == pytest.approx(x1 - 0.1 * v2, abs=1e-6)
    # Step 2 starts epoch 1: the learning rate drops tenfold.
    assert float(trainer.optimizer.learning_rate) == pytest.approx(0.01)


def test_decay_at_fractions_of_the_stage_and_a_gate_learning_rate_multiplier():
    # Two variables, loss = a + b (gradient 1 each), no momentum or decay:
    # each step moves a by lr and b by 10 * lr; the rate drops tenfold at
    # 40% and 80% of the 10 steps (steps 4 and 8).
    strategy = tf.distribute.get_strategy()
    a = keras.Variable(np.array([0.0], np.float32))
    b = keras.Variable(np.array([0.0], np.float32))
    schedule = train.Schedule(epochs=5, batch_size=1, learning_rate=0.1, weight_decay=0.0,
                              momentum=0.0)

    def loss_fn(images, labels, training):
        return tf.reduce_sum(a) + tf.reduce_sum(b), tf.zeros((1, 2)), {}

    trainer = train.Trainer(strategy, None, loss_fn, [a, b], [], schedule,
                            checkpoint_dir="unused", lr_multipliers=[1.0, 10.0])
    stage = trainer.build_steps(steps_per_epoch=2)
    assert stage.total_steps == 10 and stage.decay_steps == [4, 8]
    batch = (tf.zeros((1, 4, 4, 3)), tf.zeros((1,), tf.int32))
    rates = []
    for _ in range(10):
        rates.append(float(trainer.optimizer.learning_rate))
        trainer.train_step(batch)
    np.testing.assert_allclose(rates, [0.1] * 4 + [0.01] * 4 + [0.001] * 2, rtol=1e-6)
    assert float(a[0]) == pytest.approx(-sum(rates), rel=1e-5)
    assert float(b[0]) == pytest.approx(-10 * sum(rates), rel=1e-5)


def test_held_variables_keep_their_rate_and_a_multiplier_scales_weight_decay_too():
    # loss = a + b + c; c has weight decay 0.5 and a multiplier of 2 (a
    # PyTorch parameter group with twice the rate); b's rate holds at 10x the
    # stage's initial rate while the stage's decays at step 2 of 4.
    strategy = tf.distribute.get_strategy()
    a, b, c = (keras.Variable(np.array([1.0], np.float32)) for _ in range(3))
    schedule = train.Schedule(epochs=2, batch_size=1, learning_rate=0.1, decay_every=0.5,
                              weight_decay=0.5, momentum=0.0)

    def loss_fn(images, labels, training):
        return tf.reduce_sum(a + b + c), tf.zeros((1, 2)), {}

    trainer = train.Trainer(strategy, None, loss_fn, [a, b, c], [c], schedule,
                            checkpoint_dir="unused", lr_multipliers=[1.0, 10.0, 2.0], held=[b])
    assert trainer.build_steps(steps_per_epoch=2).decay_steps == [2]
    batch = (tf.zeros((1, 4, 4, 3)), tf.zeros((1,), tf.int32))
    expected_c = 1.0
    for step in range(4):
        lr = 0.1 if step < 2 else 0.01
        trainer.train_step(batch)
        expected_c -= 2 * lr * (1 + 0.5 * expected_c)
    assert float(a[0]) == pytest.approx(1 - 2 * 0.1 - 2 * 0.01, abs=1e-6)
    assert float(b[0]) == pytest.approx(1 - 4 * 10 * 0.1, abs=1e-5)
    assert float(c[0]) == pytest.approx(expected_c, abs=1e-6)


PLATEAU = train.Schedule(epochs=2, batch_size=32, learning_rate=0.05, plateau=True,
                         eval_steps=5, plateau_patience=1, stop_patience=3,
                         plateau_min_delta=0.02, plateau_monitor="loss", restore_best=True)


def _recording(trainer):
    """Records (step, decision, learning rate) of every plateau evaluation."""
    seen, build = [], trainer.build_steps

    def build_steps(steps_per_epoch):
        stage = build(steps_per_epoch)
        observe = trainer.plateau.observe

        def recorded(value, step, optimizer, accuracy):
            decision, state = observe(value, step, optimizer, accuracy)
            seen.append((step, decision, round(float(optimizer.learning_rate), 8)))
            return decision, state
        trainer.plateau.observe = recorded
        return stage
    trainer.build_steps = build_steps
    return seen


def test_the_plateau_rule_lowers_the_rate_stops_and_resumes_mid_wait_exactly(digits, tmp_path):
    split = data.with_validation_split(digits, 0.1, seed=0)
    straight, straight_model = _trainer(tmp_path / "straight", PLATEAU)
    seen = _recording(straight)
    result = straight.fit(split, 16, seed=3)
    # Measured on this seed: the validation loss improves until step 25, then
    # the rate is lowered twice (one evaluation each) and the stage stops at
    # the third evaluation without improvement, half-way to its cap of 80.
    decisions = [d for _, d, _ in seen]
    assert decisions[-3:] == ["reduce", "reduce", "stop"], seen
    assert result.stopped == "plateau" and result.converged is True and result.complete
    assert result.steps == seen[-1][0] < result.total_steps == 2 * 40
    assert result.reductions == 2 and result.learning_rate == pytest.approx(0.0005)
    # The weights of the lowest validation loss are kept: their accuracy is reported.
    assert result.best_step == seen[-4][0]
    assert result.val_accuracy == pytest.approx(straight.evaluate(split, 16, 32, "val"))

    # Killed after the first lowering (one evaluation into the wait), resumed
    # by a new process with another initialisation: the same decisions, rate
    # and final weights.
    stop = seen[-3][0] + 3
    first, _ = _trainer(tmp_path / "resumed", PLATEAU)
    interrupted = first.fit(split, 16, seed=3, max_steps=stop)
    assert interrupted.steps == stop and not interrupted.complete
    assert first.plateau.state().stop_wait == 1
    second, resumed_model = _trainer(tmp_path / "resumed", PLATEAU, seed=99)
    resumed_seen = _recording(second)
    again = second.fit(split, 16, seed=3)
    assert resumed_seen == seen[-2:]
    assert (again.steps, again.stopped, again.best_step) == (result.steps, "plateau",
                                                             result.best_step)
    for a, b in zip(straight_model.weights, resumed_model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert again.test_accuracy == pytest.approx(result.test_accuracy, abs=1e-6)
    # A third run finds the stage stopped and trains nothing.
    third, _ = _trainer(tmp_path / "resumed", PLATEAU, seed=7)
    done = third.fit(split, 16, seed=3)
    assert done.resumed_from_step == done.steps == result.steps and done.stopped == "plateau"


def test_a_stage_at_its_cap_still_improving_has_not_converged(digits, tmp_path):
    split = data.with_validation_split(digits, 0.1, seed=0)
    capped = dataclasses.replace(PLATEAU, epochs=1, eval_steps=10, stop_patience=5,
                                 plateau_patience=4, plateau_min_delta=0.0)
    result = _trainer(tmp_path, capped)[0].fit(split, 16, seed=3)
    assert result.steps == result.total_steps == 40
    assert result.stopped == "cap" and result.converged is False and result.complete
    assert result.reductions == 0 and result.learning_rate == pytest.approx(0.05)


def test_held_variables_keep_their_rate_when_the_plateau_rule_lowers_it():
    # loss = a + b; b is held at 10x the initial rate.  The rule's lowering
    # is an assignment to the optimizer's rate: a follows it, b does not.
    strategy = tf.distribute.get_strategy()
    a, b = (keras.Variable(np.array([1.0], np.float32)) for _ in range(2))
    schedule = dataclasses.replace(PLATEAU, batch_size=1, learning_rate=0.1,
                                   weight_decay=0.0, momentum=0.0)

    def loss_fn(images, labels, training):
        return tf.reduce_sum(a + b), tf.zeros((1, 2)), {}

    trainer = train.Trainer(strategy, None, loss_fn, [a, b], [], schedule,
                            checkpoint_dir="unused", lr_multipliers=[1.0, 10.0], held=[b])
    assert trainer.build_steps(steps_per_epoch=2).decay_steps == []
    batch = (tf.zeros((1, 4, 4, 3)), tf.zeros((1,), tf.int32))
    trainer.train_step(batch)
    trainer.optimizer.learning_rate = 0.01
    trainer.train_step(batch)
    assert float(a[0]) == pytest.approx(1 - 0.1 - 0.01, abs=1e-6)
    assert float(b[0]) == pytest.approx(1 - 2 * 10 * 0.1, abs=1e-5)


def test_fit_selects_on_validation_and_reports_test_once(digits, tmp_path):
    split = data.with_validation_split(digits, 0.1, seed=0)
    trainer, _ = _trainer(tmp_path, train.Schedule(1, 32, 0.05, min_steps=60))
    result = trainer.fit(split, 16, seed=0)
    steps_per_epoch = data.steps_per_epoch(split, 32)
    # 60 steps need two whole epochs of this split.
    assert result.epochs == 2 and result.steps == 2 * steps_per_epoch
    assert 0 < result.val_accuracy <= 1 and 0 < result.test_accuracy <= 1
    assert result.val_accuracy == pytest.approx(trainer.evaluate(split, 16, 32, "val"))
    assert result.test_accuracy == pytest.approx(trainer.evaluate(split, 16, 32, "test"))

    # Stopped early at an epoch's end, that epoch's evaluation is returned (the
    # prune search's halfway check uses it); mid-epoch there is none.
    at_epoch, _ = _trainer(tmp_path / "epoch_end", train.Schedule(1, 32, 0.05, min_steps=60))
    first_epoch = at_epoch.fit(split, 16, seed=0, max_steps=steps_per_epoch,
                               evaluate_test=False)
    assert first_epoch.steps == steps_per_epoch and np.isnan(first_epoch.test_accuracy)
    assert first_epoch.val_accuracy == pytest.approx(at_epoch.evaluate(split, 16, 32, "val"))
    mid, _ = _trainer(tmp_path / "mid_epoch", train.Schedule(1, 32, 0.05, min_steps=60))
    assert np.isnan(mid.fit(split, 16, seed=0, max_steps=5, evaluate_test=False).val_accuracy)


def test_each_evaluation_sees_statistics_refreshed_once_per_set_of_weights(digits, tmp_path):
    """`refresh_statistics` runs before the first evaluation of each set of
    weights (every epoch evaluation, the final validation and test passes
    sharing one), never after the evaluation it is meant for; brief before
    the curve's points, full before the last epoch's, the stage's result."""
    split = data.with_validation_split(digits, 0.1, seed=0)
    trainer, model = _trainer(tmp_path, train.Schedule(1, 32, 0.05, min_steps=60))
    events, briefs = [], []

    def refresh(brief):
        events.append(("refresh", int(trainer.step.numpy())))
        briefs.append(brief)

    trainer.refresh_statistics = refresh
    evaluator = train.make_evaluator(trainer.strategy, trainer.predict_fn)

    def recording(*args, **kwargs):
        events.append(("evaluate", int(trainer.step.numpy())))
        return evaluator(*args, **kwargs)

    trainer._evaluator = recording
    result = trainer.fit(split, 16, seed=0)
    trainer.evaluate(split, 16, 32, "test")  # the same weights again
    refreshed = [step for kind, step in events if kind == "refresh"]
    evaluated = [step for kind, step in events if kind == "evaluate"]
    assert refreshed == sorted(set(evaluated)) and result.steps in refreshed
    for step in set(evaluated):  # the refresh comes first
        assert events.index(("refresh", step)) < events.index(("evaluate", step))
    assert len(briefs) >= 2 and all(briefs[:-1]) and not briefs[-1]


def test_a_stage_that_only_makes_its_starting_weights_worse_ends_with_them(digits, tmp_path):
    """The plateau rule evaluates the starting weights first; where no later
    evaluation improves on them the stage ends with them (without
    `restore_best`), not with what training made of them."""
    split = data.with_validation_split(digits, 0.1, seed=0)
    trainer, model = _trainer(tmp_path / "worse", dataclasses.replace(PLATEAU,
                                                                       restore_best=False))
    trainer.start_is_candidate = True  # as a fine-tune's pruned network
    # Trained away from the labels: every step raises the validation loss.
    trainer.loss_fn = lambda images, labels, training: (
        lambda logits: (-cross_entropy(logits, labels), logits, {}))(
            model(images, training=training)[0])
    start = [w.numpy().copy() for w in model.weights]
    start_accuracy, start_loss = trainer.evaluate(split, 16, 32, "val", with_loss=True)
    seen = _recording(trainer)
    result = trainer.fit(split, 16, seed=3)
    assert seen[0][:2] == (0, "improved") and result.best_step == 0
    assert result.stopped == "plateau" and result.steps > 0
    for before, weight in zip(start, model.weights):
        np.testing.assert_array_equal(weight.numpy(), before, err_msg=weight.path)
    assert result.val_accuracy == pytest.approx(start_accuracy)
    assert result.val_loss == pytest.approx(start_loss)


def test_brief_refreshes_only_draw_the_curve(digits, tmp_path):
    """The plateau rule's evaluations, which decide, follow full statistics
    refreshes; a fixed schedule's curve points a brief one, and a run
    stopped at one (`max_steps` at an epoch's end, as the prune search's
    halfway check does) answers after a full refresh."""
    split = data.with_validation_split(digits, 0.1, seed=0)
    ruled, _ = _trainer(tmp_path / "ruled", PLATEAU)
    ruled_briefs = []
    ruled.refresh_statistics = ruled_briefs.append
    assert ruled.fit(split, 16, seed=3).stopped == "plateau"
    assert len(ruled_briefs) > 3 and not any(ruled_briefs)

    halted, _ = _trainer(tmp_path / "halted", train.Schedule(1, 32, 0.05, min_steps=60))
    briefs = []
    halted.refresh_statistics = briefs.append
    evaluator = train.make_evaluator(halted.strategy, halted.predict_fn)
    early = halted.fit(split, 16, seed=0, max_steps=data.steps_per_epoch(split, 32),
                       evaluate_test=False)
    assert not early.complete and briefs == [True, False]
    assert early.val_accuracy == pytest.approx(evaluator(split, 16, 32, "val"))


def test_a_given_evaluator_is_the_one_evaluations_use(digits, tmp_path):
    """`Trainer(evaluator=...)`: an evaluator traced elsewhere for the same
    network (the fine-tune's, from preparing the pruned network) serves every
    evaluation, after the statistics refresh."""
    split = data.with_validation_split(digits, 0.1, seed=0)
    probe, _ = _trainer(tmp_path / "probe")
    evaluator = train.make_evaluator(probe.strategy, probe.predict_fn)
    calls = []

    def recording(*args, **kwargs):
        calls.append(args[3])
        return evaluator(*args, **kwargs)

    keras.utils.set_random_seed(0)
    trainer = train.Trainer(probe.strategy, probe.model, probe.loss_fn, probe.trainable,
                            probe.trainable, train.Schedule(1, 32, 0.05, min_steps=20),
                            checkpoint_dir=str(tmp_path / "given"), evaluator=recording,
                            refresh_statistics=lambda brief: calls.append("refresh"))
    result = trainer.fit(split, 16, seed=0)
    assert calls[0] == "refresh" and calls.count("val") >= 1 and calls[-1] == "test"
    assert result.test_accuracy == evaluator(split, 16, 32, "test")


def test_a_fixed_schedule_draws_its_curve_in_a_few_evaluations_ending_with_the_last(
        digits, tmp_path):
    """Nine short epochs are evaluated every third epoch, the last included:
    a few points of the curve, not one pass per epoch."""
    trainer, _ = _trainer(tmp_path, train.Schedule(epochs=9, batch_size=256,
                                                   learning_rate=0.05))
    steps_per_epoch = data.steps_per_epoch(digits, 256)
    evaluator = train.make_evaluator(trainer.strategy, trainer.predict_fn)
    evaluated = []

    def recording(*args, **kwargs):
        evaluated.append(int(trainer.step.numpy()))
        return evaluator(*args, **kwargs)

    trainer._evaluator = recording
    result = trainer.fit(digits, 16, seed=0)
    # Without a validation split the curve is the test split's, and its last
    # point is the stage's result.
    assert result.steps == 9 * steps_per_epoch
    assert evaluated == [3 * steps_per_epoch, 6 * steps_per_epoch, 9 * steps_per_epoch]


def test_mixed_precision_trains_in_float16_with_float32_weights_and_loss_scaling(digits,
                                                                               tmp_path):
    """--mixed_precision: float16 compute, float32 variables, a loss-scale
    optimizer; the loss stays finite and training still learns."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        trainer, model = _trainer(tmp_path, train.Schedule(epochs=1, batch_size=32,
                                                           learning_rate=0.05, decay_epochs=1))
        conv = next(l for l in model._flatten_layers() if isinstance(l, keras.layers.Conv2D))
        assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
        result = trainer.fit(digits, 16, seed=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert result.steps == data.steps_per_epoch(digits, 32)
    assert result.test_accuracy > 0.3  # 10 classes: chance is 0.1


def test_mixed_precision_gates_stay_float32():
    """A student built under the mixed policy: gate values are float32
    (softmax in float16 would round small gates to 0) and its outputs match
    the float32 student's to float16 precision."""
    from nettailor_tf.model.student_network import Plan, build_student

    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    reference = build_student(backbones.build_backbone("tiny"), 5, Plan.full(4, 2), "frozen", 16)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:  # as a training stage builds it: everything under the mixed policy
        mixed = build_student(backbones.build_backbone("tiny"), 5, Plan.full(4, 2), "frozen", 16)
        mixed.set_weights(reference.get_weights())
        assert all(a.dtype == tf.float32 for a in mixed.alphas())
        logits = mixed(images, training=False)[0]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    expected = reference(images, training=False)[0].numpy()
    np.testing.assert_allclose(np.asarray(logits, np.float32), expected,
                               atol=0.05 * np.abs(expected).max())


def _free_ports(n):
    import socket
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_worker_processes_match_one_worker_with_two_replicas(tmp_path):
    """MultiWorkerMirroredStrategy over two processes on localhost (TF_CONFIG)
    ends with the same teacher as one process with two replicas (the same
    per-replica batches, so the same BN statistics): equal up to float noise.
    Only the chief's files are the run's; the other worker writes under
    workers/."""
    import os

    # 90% of digits held out: 4 steps of 32 images are enough to compare the
    # two, and each step of the two workers is a gRPC all-reduce on 2 cores.
    common = ["--tasks=digits", "--stages=teacher", "--backbone=tiny",
              "--backbone_weights=random", "--image_size=16", "--teacher_epochs=1",
              "--teacher_batch_size=32", "--seed=0", "--log_every=1000", "--noteacher_plateau",
              "--validation_fraction=0.9", "--teacher_min_steps=1"]
    # The one-process run starts beside the two workers: most of each run is
    # TensorFlow starting, which overlaps.
    one = subprocess.Popen(
        [sys.executable, "-m", "nettailor_tf.main", f"--workdir={tmp_path / 'one'}",
         "--strategy=mirrored", "--num_cpu_devices=2", *common],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    ports = _free_ports(2)
    workers = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({
            "cluster": {"worker": [f"localhost:{p}" for p in ports]},
            "task": {"type": "worker", "index": index}}))
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "nettailor_tf.main", f"--workdir={tmp_path / 'two'}",
             "--strategy=multi_worker", *common],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-2000:]
    assert "strategy mirrored with replicas=2" in err

    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    accuracies = [r["tasks"]["digits"]["teacher"]["accuracy"] for r in reports]
    assert abs(accuracies[0] - accuracies[1]) <= 2 / 359  # at most two test images differ
    weights = []
    for directory in ("one", "two"):
        model = backbones.classifier_model(backbones.build_backbone("tiny"), 10, name="teacher")
        model.load_weights(str(tmp_path / directory / "tasks" / "digits" / "teacher.weights.h5"))
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert (tmp_path / "two" / "workers" / "worker1" / "tasks" / "digits" / "teacher.weights.h5").exists()


# --- rate groups: per-variable learning rates done by the optimizer ------------

RATE_GROUPS = train.Schedule(epochs=2, batch_size=1, learning_rate=0.1, decay_every=0.5,
                             weight_decay=0.5, momentum=0.9)


class _AdamTrainer(train.Trainer):
    def make_group_optimizer(self, learning_rate):
        return keras.optimizers.Adam(learning_rate)


def _rate_group_run(schedule, trainer_class=train.Trainer, steps=4):
    """Trains `helpers.rate_group_problem` with the loop for `steps` steps
    (the plateau rule lowers the rate after step 2 when the schedule has it);
    returns (the problem, its initial weights, final weights, each step's rate)."""
    problem = helpers.rate_group_problem()
    model, loss, multipliers, held, decayed = problem
    initial = [v.numpy() for v in model.trainable_variables]
    trainer = trainer_class(tf.distribute.get_strategy(), None,
                            lambda images, labels, training: (loss(), tf.zeros((1, 2)), {}),
                            model.trainable_variables, decayed, schedule,
                            checkpoint_dir="unused", lr_multipliers=multipliers, held=held)
    trainer.build_steps(steps_per_epoch=2)
    batch = (tf.zeros((1, 4, 4, 3)), tf.zeros((1,), tf.int32))
    rates = []
    for step in range(steps):
        if schedule.plateau and step == 2:
            trainer.plateau.observe(1.0, step, trainer.optimizer)  # improved
            decision, _ = trainer.plateau.observe(1.0, step, trainer.optimizer)
            assert decision == "reduce"
        rates.append(float(trainer.optimizer.learning_rate))
        trainer.train_step(batch)
    final = [v.numpy() for v in model.trainable_variables]
    for variable, value in zip(model.trainable_variables, initial):
        variable.assign(value)
    return problem, final, rates


@pytest.mark.parametrize("lowered_by", ["schedule", "plateau"])
def test_rate_groups_with_sgd_equal_the_old_gradient_rescaling(lowered_by):
    # With SGD+momentum the old rule (one optimizer, scaled gradients) gave
    # each group its rate: Keras' SGD folds the rate into the momentum.  A
    # held group (bias 1, 10x) crosses the rate's lowering at step 2.
    schedule = (RATE_GROUPS if lowered_by == "schedule" else
                dataclasses.replace(PLATEAU, batch_size=1, learning_rate=0.1,
                                    weight_decay=0.5, momentum=0.9))
    (model, loss, multipliers, held, decayed), final, rates = _rate_group_run(schedule)
    assert rates[1] == pytest.approx(0.1) and rates[2] < rates[1] and rates[3] == rates[2]
    helpers.old_rule_steps(keras.optimizers.SGD(0.1, momentum=0.9), model.trainable_variables,
                           loss, multipliers, held, decayed, 0.5, 0.1, rates)
    for new, old in zip(final, model.trainable_variables):
        np.testing.assert_allclose(new, old.numpy(), rtol=1e-5, atol=1e-7, err_msg=old.path)


def test_rate_groups_give_adam_its_rate_where_scaled_gradients_did_not():
    # Adam normalises the gradient: a group at 10x (or 2x) must be a separate
    # Adam at 10x the rate; the old rule's scaled gradient moved it at 1x.
    (model, loss, multipliers, held, decayed), final, rates = _rate_group_run(
        RATE_GROUPS, _AdamTrainer)
    variables = model.trainable_variables
    initial = [v.numpy() for v in variables]
    helpers.separate_optimizer_steps(keras.optimizers.Adam, variables, loss, multipliers,
                                     held, decayed, 0.5, 0.1, rates)
    for new, separate in zip(final, variables):
        np.testing.assert_allclose(new, separate.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=separate.path)
    separate = [v.numpy() for v in variables]
    for variable, value in zip(variables, initial):
        variable.assign(value)
    helpers.old_rule_steps(keras.optimizers.Adam(0.1), variables, loss, multipliers, held,
                           decayed, 0.5, 0.1, rates)
    # bias 1 (10x, held) and kernel 2 (2x) moved by the wrong step under the old rule.
    for index in (1, 2):
        moved_new = np.abs(separate[index] - initial[index]).max()
        moved_old = np.abs(variables[index].numpy() - initial[index]).max()
        assert moved_new > 1.5 * moved_old, (index, moved_new, moved_old)

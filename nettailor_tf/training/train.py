"""The custom training loop: tf.function steps under a tf.distribute strategy.

One loop serves every stage (teacher, student, finetune): a stage hands it a
loss function, the variables to train and those to decay (and, per variable,
a learning-rate factor: `rate_groups`).  The loop owns the optimizer (SGD
with PyTorch-style coupled weight decay and Keras' piecewise-constant decay
of the stage's schedule, or the learning rate the plateau rule lowers),
checkpoints, resumption, TensorBoard and progress.  It evaluates the validation split
after some epochs (a fixed schedule) or every few steps (the plateau rule,
which also ends the stage: `stopping`); the test split once, at the end.

Resumption is exact: the data order and augmentation of an epoch are a pure
function of (seed, epoch) (see `data.train_pipeline`), so a run restored at
step s skips the first `s % steps_per_epoch` batches of its epoch and goes on
as if it had never stopped: no step done twice, none skipped.  The plateau
rule's state and best weights are in the same checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import keras
import tensorflow as tf
from absl import logging

from nettailor_tf import data as data_lib
from nettailor_tf.training import stopping
from nettailor_tf.training.checkpoints import TrainingCheckpoints
from nettailor_tf.training.rate_groups import GroupedOptimizer, RateGroup, learning_rate_schedule
from nettailor_tf.training.result import TrainResult
# train.make_evaluator, train.format_duration: where the stages find them.
from nettailor_tf.training.evaluation import make_evaluator  # noqa: F401
from nettailor_tf.training.progress import format_duration, ProgressReporter  # noqa: F401
from nettailor_tf.common.errors import TrainingError  # noqa: F401 (train.TrainingError)
from nettailor_tf.settings.schedules import Schedule, StagePlan
from nettailor_tf.settings.tuned import EVALUATIONS_PER_STAGE


# Steps between the divergence check's reads of the loss (each reads every
# step's loss since the last; a save checks first, so no checkpoint holds a
# diverged network).
HEALTH_EVERY = 10


class _Window:
    """The statistics of an epoch's steps so far, summed on the device, and
    the losses the divergence check has not read yet."""

    def __init__(self):
        self.sums, self.last, self.count, self._losses = {}, {}, 0, []

    def add(self, stats: dict) -> None:
        self.sums = {k: v + self.sums[k] if k in self.sums else v for k, v in stats.items()}
        self.last = stats
        self._losses.append(stats["loss"])
        self.count += 1

    def take_losses(self) -> list:
        losses, self._losses = self._losses, []
        return losses


# loss_fn(images, labels, training) -> (total loss of the local batch, logits,
# {name: scalar term}); the loop scales it to the global batch.
# With `Trainer(indexed=True)` it also gets each image's position in the
# training split: loss_fn(images, labels, training, indices).
LossFn = Callable[..., tuple]


class Trainer:
    """Trains `model`'s `trainable` variables with `loss_fn` on one task.

    Build the model (and anything the loss reads) inside `strategy.scope()`
    before creating the trainer.

    Args:
        strategy: the tf.distribute strategy the model was built under.
        model: the Keras model; its weights are checkpointed.
        loss_fn: see `LossFn`.
        trainable: variables the optimizer updates.
        decayed: subset of `trainable` that gets coupled weight decay.
        schedule: epochs, batch size and learning rate.
        checkpoint_dir: where `tf.train.CheckpointManager` keeps its files.
        summary_dir: TensorBoard event directory (None: no summaries).
        jit_compile: XLA for the train step (slower on CPU, measured on 2 CPU cores).
        checkpoint_every: steps between checkpoints (and at each epoch end).
        log_every: steps between log lines and summaries.
        predict_fn: images -> logits for evaluation (default: the model's
            first output in inference mode).
        lr_multipliers: one factor per `trainable` variable that scales its
            learning rate (so the step of its gradient and weight decay), as
            a PyTorch parameter group would (None: all 1).  Each distinct
            (multiplier, held) pair is trained by an optimizer of its own
            (`make_group_optimizer`) at its rate: right for any optimizer.
        held: variables whose learning rate stays at (stage's initial rate x
            multiplier) for the whole stage instead of following its decay
            (the schedule's, or the plateau rule's lowerings).
        eval_split: the split `fit` evaluates during the stage ('val' or
            'test'; the plateau rule watches it); the test accuracy is
            measured once at the end.
        indexed: hand `loss_fn` each image's position in the training split
            (to look up targets computed once, e.g. a frozen teacher's).
        refresh_statistics: called before an evaluation when the weights
            have moved since its last call, to re-estimate the model's BN
            statistics on them (None: evaluate with the moving averages);
            its argument `brief` asks for a cheaper estimate, enough for a
            fixed schedule's curve points: the stage's result, and the
            plateau rule's evaluations, follow a full one.
        evaluator: a `make_evaluator` of `predict_fn` traced elsewhere, whose
            trace it reuses (None: one is made at the first evaluation).
        start_is_candidate: the model starts trained (a pruned network): the
            plateau rule evaluates it before the first step, and a stage
            that never improves on it ends with it.
    """

    def __init__(self, strategy, model, loss_fn: LossFn, trainable, decayed, schedule: Schedule,
                 checkpoint_dir: str, summary_dir: str | None = None, jit_compile: bool = False,
                 checkpoint_every: int = 200, log_every: int = 20, predict_fn=None,
                 lr_multipliers=None, held=(), eval_split: str = "val", indexed: bool = False,
                 refresh_statistics=None, evaluator=None, start_is_candidate=False):
        self.strategy = strategy
        self.predict_fn = predict_fn or (lambda images: model(images, training=False)[0])
        self.model = model
        self.loss_fn = loss_fn
        self.trainable = list(trainable)
        decayed_ids = {id(v) for v in decayed}
        self.decay_mask = [id(v) in decayed_ids for v in self.trainable]
        multipliers = list(lr_multipliers or [1.0] * len(self.trainable))
        if len(multipliers) != len(self.trainable):
            raise ValueError("lr_multipliers needs one factor per trainable variable")
        held_ids = {id(v) for v in held}
        self.rate_groups = [RateGroup(k, id(v) in held_ids)
                            for k, v in zip(multipliers, self.trainable)]
        self.eval_split = eval_split
        self.indexed = indexed
        self.refresh_statistics = refresh_statistics
        # (step, brief) of the last refresh: the weights the statistics describe.
        self._refreshed = None
        self._evaluator = evaluator
        self.start_is_candidate = start_is_candidate
        self._stage = None  # the schedule `fit` built its steps for
        self.schedule = schedule
        self.checkpoint_dir = checkpoint_dir
        self.summary_dir = summary_dir
        self.jit_compile = jit_compile
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.host_reads = 0  # training statistics read to the host (`_to_host`)
        replicas = strategy.num_replicas_in_sync
        if schedule.batch_size % replicas:
            raise ValueError(f"batch size {schedule.batch_size} is not divisible by the "
                             f"{replicas} replicas")

    # --- update step ---------------------------------------------------------

    def make_group_optimizer(self, learning_rate) -> keras.optimizers.Optimizer:
        """A rate group's optimizer (the step adds the coupled weight decay)."""
        return keras.optimizers.SGD(learning_rate, momentum=self.schedule.momentum)

    def build_steps(self, steps_per_epoch: int) -> StagePlan:
        """Creates the optimizer and the compiled train and eval steps for a
        task of `steps_per_epoch` batches; returns the resolved schedule."""
        schedule, replicas = self.schedule, self.strategy.num_replicas_in_sync
        stage = schedule.plan(steps_per_epoch)
        # float16 compute (--mixed_precision) needs loss scaling, or small
        # gradients underflow to zero; bfloat16 and float32 do not.
        loss_scaling = keras.mixed_precision.global_policy().compute_dtype == "float16"
        with self.strategy.scope():
            self.optimizer = GroupedOptimizer(
                learning_rate_schedule(stage, schedule), schedule.learning_rate,
                self.make_group_optimizer, self.rate_groups)
            if loss_scaling:  # one scale for every group: see `rate_groups`
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            # Keras 3 optimizers must create their slots inside the scope
            # before the first distributed step (measured on 2 CPU cores).
            self.optimizer.build(self.trainable)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.plateau = stopping.PlateauTracker(self.model, schedule, self.start_is_candidate)
        decay = schedule.weight_decay

        def replica_step(images, labels, *indices):
            with tf.GradientTape() as tape:
                loss, logits, terms = self.loss_fn(images, labels, True, *indices)
                # Replicas' gradients are summed: scale to the global batch.
                scaled = loss / replicas
                if loss_scaling:
                    scaled = self.optimizer.scale_loss(scaled)
            grads = tape.gradient(scaled, self.trainable)
            # Coupled (PyTorch) weight decay: g += wd * w, split over replicas
            # for the same reason as the loss (and scaled like the loss, since
            # the loss-scale optimizer divides every gradient by the scale).
            factor = decay / replicas
            if loss_scaling:
                factor = factor * tf.cast(self.optimizer.dynamic_scale, tf.float32)
            grads = [g + tf.cast(factor, v.dtype) * v if m and g is not None else g
                     for g, v, m in zip(grads, self.trainable, self.decay_mask)]
            self.optimizer.apply_gradients(zip(grads, self.trainable))
            correct = tf.reduce_sum(tf.cast(
                tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
            stats = {"loss": loss, "correct": correct, **terms}
            if loss_scaling:
                stats["loss_scale"] = self.optimizer.dynamic_scale / replicas
            return {k: tf.cast(v, tf.float32) for k, v in stats.items()}

        @tf.function(jit_compile=self.jit_compile)
        def train_step(batch):
            stats = self.strategy.run(replica_step, args=batch)
            self.step.assign_add(1)
            return {k: self.strategy.reduce("SUM", v, axis=None) for k, v in stats.items()}

        self.train_step = train_step
        return stage

    # --- evaluation ----------------------------------------------------------

    def evaluate(self, task: data_lib.TaskData, image_size: int, batch_size: int,
                 split: str = "test", with_loss: bool = False, brief: bool = False):
        """Top-1 accuracy on `split`; (accuracy, mean cross-entropy) `with_loss`;
        `brief`: after a brief statistics refresh (see `refresh_statistics`)."""
        if self.refresh_statistics is not None:
            # Once per set of weights: the final validation and test passes
            # share one re-estimation, which a brief one does not replace.
            # Before the first step there is no step counter yet; the
            # statistics are then the caller's.
            step = int(self.step.numpy()) if hasattr(self, "step") else None
            last_step, last_brief = self._refreshed or (None, False)
            if step is not None and (step != last_step or (last_brief and not brief)):
                self.refresh_statistics(brief)
                self._refreshed = (step, brief)
        if self._evaluator is None:
            self._evaluator = make_evaluator(self.strategy, self.predict_fn)
        return self._evaluator(task, image_size, batch_size, split, with_loss)

    # --- the loop ------------------------------------------------------------

    def fit(self, task: data_lib.TaskData, image_size: int, seed: int,
            eval_batch_size: int | None = None, max_steps: int | None = None,
            evaluate_test: bool = True) -> TrainResult:
        """Trains to the end of the stage, resuming from the last checkpoint.

        A fixed schedule evaluates the task's validation split (the test split
        when the task has none) after some epochs; with the plateau rule
        (`Schedule.plateau`) it is evaluated every `eval_steps` steps, and the
        rule lowers the rate and ends the stage when its loss stops improving
        (within the schedule's length, the cap).  The test split is evaluated
        once, at the end (unless `evaluate_test` is false: the result's test
        accuracy is then NaN).  `max_steps` stops early (after a checkpoint),
        as an interruption would.
        """
        run = self._start(task, image_size, eval_batch_size, max_steps)
        if (self.start_is_candidate and self.plateau.enabled and run.step == 0
                and not self.plateau.state().evaluations):
            # The trained starting weights are the rule's first candidate: a
            # stage that only makes them worse (a pruned 2-class network
            # that a rate of 0.01 drove to one constant answer within 9
            # steps) ends with them, not at chance.
            self._plateau_evaluation(run)
        while run.step < run.stop_at and not run.stopped:
            self._train_epoch(run, seed)
        run.writer.flush()
        return self._finish(run, evaluate_test)

    def _start(self, task, image_size, eval_batch_size, max_steps) -> "_Run":
        """Builds (once) and restores the stage; where its loop starts."""
        schedule = self.schedule
        steps_per_epoch = data_lib.steps_per_epoch(task, schedule.batch_size)
        if self._stage is None or self._stage.steps_per_epoch != steps_per_epoch:
            self._stage = self.build_steps(steps_per_epoch)
        # A later call (training resumed in the same process, as the prune
        # search does halfway) keeps the optimizer and the traced step, which
        # the checkpoint then restores to the same values: building and
        # tracing them again cost 5 s a call on the quickstart.
        stage = self._stage
        logging.info("%s: %s", task.name, stage.describe(schedule))
        checkpoints = TrainingCheckpoints(self.checkpoint_dir, self.model, self.optimizer,
                                          self.step, task.name,
                                          extra=self.plateau.checkpoint_objects())
        restored = checkpoints.restore()
        if restored:
            logging.info("%s: resuming from %s (step %d of %d)", task.name, restored,
                         int(self.step.numpy()), stage.total_steps)
        step = int(self.step.numpy())
        eval_split = "val" if task.num_val and self.eval_split == "val" else "test"
        if self.plateau.enabled and eval_split == "test" and self.eval_split == "val":
            logging.warning("%s: no validation split: the plateau rule watches the test loss "
                            "(as every choice does under --selection_split=test)", task.name)
        writer = (tf.summary.create_file_writer(self.summary_dir) if self.summary_dir
                  else tf.summary.create_noop_writer())
        return _Run(task=task, image_size=image_size, stage=stage, checkpoints=checkpoints,
                    writer=writer, report=ProgressReporter(stage.total_steps, self.log_every,
                                                             step),
                    eval_batch_size=eval_batch_size or schedule.batch_size,
                    eval_split=eval_split, resumed_from=step, step=step,
                    stop_at=stage.total_steps if max_steps is None
                    else min(stage.total_steps, max_steps),
                    stopped="plateau" if self.plateau.state().stopped else "")

    def _train_epoch(self, run: "_Run", seed: int) -> None:
        """Trains to the end of the current epoch, `run.stop_at` or the
        plateau rule's stop, checkpointing and evaluating on the way.

        Statistics stay on the device (summed there) and reach the host only
        for a log line or summary, the divergence check every `HEALTH_EVERY`
        steps and before a save: a read per step would make the host wait
        for each step before queueing the next, serialising a GPU or TPU."""
        schedule, steps_per_epoch = self.schedule, run.stage.steps_per_epoch
        epoch, skip = divmod(run.step, steps_per_epoch)
        dataset = self.strategy.experimental_distribute_dataset(data_lib.train_pipeline(
            run.task, run.image_size, schedule.batch_size, epoch, seed, skip_batches=skip,
            with_index=self.indexed))
        window = _Window()
        tic = time.perf_counter()
        run.paused = 0.0
        for batch in dataset:
            window.add(self.train_step(batch))
            run.step += 1
            step = run.step
            end_of_epoch = step % steps_per_epoch == 0
            evaluates = self.plateau.enabled and (step % run.stage.eval_interval(schedule) == 0
                                                  or step == run.stage.total_steps)
            # The plateau rule's evaluation may end the stage, which saves.
            may_save = (evaluates or step % self.checkpoint_every == 0 or end_of_epoch
                         or step == run.stop_at)
            if may_save or step % HEALTH_EVERY == 0:
                self._check_health(run, window)
            self._report_step(run, window, time.perf_counter() - tic - run.paused)
            if evaluates:
                self._plateau_evaluation(run)
            if (run.stopped or step % self.checkpoint_every == 0 or end_of_epoch
                    or step == run.stop_at):
                run.checkpoints.save(step, final=step == run.stage.total_steps
                                     or bool(run.stopped))
            if run.stopped or end_of_epoch or step == run.stop_at:
                break
        run.train_time += time.perf_counter() - tic - run.paused
        run.images_seen += window.count * schedule.batch_size
        if not self.plateau.enabled:
            self._epoch_evaluation(run)

    def _to_host(self, values: dict) -> dict:
        """Device scalars -> Python floats in one transfer (counted: the
        loop's contract is how rarely this happens)."""
        self.host_reads += 1
        if not values:
            return {}
        stacked = tf.stack([tf.cast(v, tf.float32) for v in values.values()]).numpy()
        return dict(zip(values, (float(x) for x in stacked)))

    def _check_health(self, run: "_Run", window: "_Window") -> None:
        """Hands the losses of the steps since the last check, in order, to
        the checkpoints' divergence check (which may roll back and raise)."""
        losses = window.take_losses()
        if not losses:
            return
        replicas = self.strategy.num_replicas_in_sync
        values = self._to_host({i: loss for i, loss in enumerate(losses)})
        first = run.step - len(losses) + 1
        for i in range(len(losses)):
            # Per replica: the reduced loss is the sum over replicas.
            run.checkpoints.observe(values[i] / replicas, first + i)

    def _report_step(self, run: "_Run", window: "_Window", elapsed: float) -> None:
        """The progress bar every step; its figures, the log line and
        TensorBoard only where they are shown (one read of the sums)."""
        if not (run.step % self.log_every == 0 or run.report.shows(run.step)):
            run.report(run.step, None)
            return
        replicas, count = self.strategy.num_replicas_in_sync, window.count
        sums = self._to_host({**window.sums, "lr": self.optimizer.learning_rate,
                              **({"loss_scale": window.last["loss_scale"]}
                                 if "loss_scale" in window.last else {})})
        values = {"loss": sums["loss"] / (count * replicas),
                  "acc": sums["correct"] / (count * self.schedule.batch_size),
                  "img/s": count * self.schedule.batch_size / max(elapsed, 1e-9),
                  "lr": sums["lr"]}
        if "loss_scale" in sums:
            values["loss_scale"] = sums["loss_scale"]
        run.report(run.step, values)
        if run.step % self.log_every == 0:
            with run.writer.as_default(step=run.step):
                for k, v in values.items():
                    tf.summary.scalar(f"train/{k.replace('/', '_per_')}", v)
                for k, v in window.sums.items():
                    if k not in ("loss", "correct", "loss_scale"):
                        tf.summary.scalar(f"train/{k}", sums[k] / count / replicas)

    def _epoch_evaluation(self, run: "_Run") -> None:
        """A fixed schedule's evaluation at the end of some epochs.

        A small data set's many short epochs are evaluated a few times per
        stage (`EVALUATIONS_PER_STAGE`, and the last epoch), not after each
        one (digits' 13 student epochs, a 150-image folder's 38)."""
        stage = run.stage
        evaluate_every = -(-stage.epochs // EVALUATIONS_PER_STAGE)
        epochs_done = run.step // stage.steps_per_epoch
        if run.step % stage.steps_per_epoch or not (epochs_done % evaluate_every == 0
                                                     or epochs_done == stage.epochs):
            return
        # The curve's points before the last follow a brief statistics
        # refresh: they decide nothing (a refresh leaves no trace in training,
        # whose BN layers read their batches' moments) and the last one, the
        # stage's result, follows a full one.
        brief = epochs_done < stage.epochs
        run.eval_accuracy = self.evaluate(run.task, run.image_size, run.eval_batch_size,
                                          run.eval_split, brief=brief)
        run.evaluated_at, run.eval_brief = run.step, brief and self.refresh_statistics is not None
        logging.debug("%s: epoch %d/%d %s accuracy %.4f", run.task.name, epochs_done,
                      stage.epochs, "validation" if run.eval_split == "val" else "test",
                      run.eval_accuracy)
        with run.writer.as_default(step=run.step):
            tf.summary.scalar(f"{run.eval_split}/accuracy", run.eval_accuracy)

    def _plateau_evaluation(self, run: "_Run") -> None:
        """Evaluates, lets the plateau rule decide, and acts on it."""
        tic, step = time.perf_counter(), run.step
        # A full refresh: the rule compares these losses, and a brief one
        # made its decisions noisier (`tuned.BRIEF_RECALIBRATION_BATCHES`).
        accuracy, loss = self.evaluate(run.task, run.image_size, run.eval_batch_size,
                                       run.eval_split, with_loss=True)
        run.eval_accuracy, run.evaluated_at = accuracy, step
        rate = float(self.optimizer.learning_rate)
        decision, state = self.plateau.observe(loss, step, self.optimizer, accuracy)
        with run.writer.as_default(step=step):
            tf.summary.scalar(f"{run.eval_split}/accuracy", accuracy)
            tf.summary.scalar(f"{run.eval_split}/loss", loss)
        logging.debug("%s: step %d %s loss %.4f accuracy %.4f (%s)", run.task.name, step,
                      run.eval_split, loss, accuracy, decision)
        run.stopped = self.plateau.verdict(run.task.name, step, run.eval_split, decision, state,
                                           rate, float(self.optimizer.learning_rate),
                                           at_cap=step >= run.stage.total_steps)
        if run.stopped and self.plateau.restore_best(step, run.task.name, run.eval_split):
            run.eval_accuracy = float("nan")  # the kept weights are evaluated at the end
        run.paused += time.perf_counter() - tic

    def _finish(self, run: "_Run", evaluate_test: bool) -> TrainResult:
        stage, state = run.stage, self.plateau.state()
        if not run.stopped and run.step >= stage.total_steps:
            # Resumed at the end: how it ended is in the restored state.
            run.stopped = ("schedule" if not self.plateau.enabled
                           else "plateau" if state.stopped else "cap")
        test_accuracy = val_accuracy = float("nan")
        eval_accuracy, eval_loss = run.eval_accuracy, state.last
        if run.eval_brief:
            # A curve point's: the weights the stage ends with are evaluated
            # after a full refresh of their statistics.
            eval_accuracy = float("nan")
        if run.stopped or run.evaluated_at == run.step and run.eval_split == "val":
            if not math.isfinite(eval_accuracy):
                # Resumed after the end, the best weights restored, or the
                # last evaluation a brief one: evaluate what the stage ends with.
                eval_accuracy, eval_loss = self.evaluate(
                    run.task, run.image_size, run.eval_batch_size, run.eval_split,
                    with_loss=True)
        if run.stopped:
            if run.eval_split == "val":
                val_accuracy = eval_accuracy
                if evaluate_test:
                    test_accuracy = self.evaluate(run.task, run.image_size,
                                                  run.eval_batch_size, "test")
            else:
                test_accuracy = eval_accuracy
        elif run.evaluated_at == run.step and run.eval_split == "val":
            # Stopped early at an evaluation (the prune search's halfway
            # check at an epoch's end): that evaluation is the caller's answer.
            val_accuracy = eval_accuracy
        return TrainResult(
            run.step, test_accuracy, run.images_seen / max(run.train_time, 1e-9),
            run.resumed_from, val_accuracy=val_accuracy, total_steps=stage.total_steps,
            epochs=-(-run.step // stage.steps_per_epoch) if self.plateau.enabled
            else stage.epochs, stopped=run.stopped,
            val_loss=eval_loss if self.plateau.enabled else float("nan"),
            best_step=state.best_step, reductions=state.reductions,
            learning_rate=float(self.optimizer.learning_rate))


@dataclasses.dataclass
class _Run:
    """One call of `Trainer.fit`: where its loop stands."""
    task: data_lib.TaskData
    image_size: int
    stage: StagePlan
    checkpoints: TrainingCheckpoints
    writer: object
    report: ProgressReporter
    eval_batch_size: int
    eval_split: str
    resumed_from: int
    step: int
    stop_at: int
    stopped: str = ""               # see TrainResult.stopped
    images_seen: int = 0
    train_time: float = 0.0
    paused: float = 0.0             # seconds of this epoch spent evaluating
    eval_accuracy: float = float("nan")
    evaluated_at: int | None = None
    eval_brief: bool = False        # the last evaluation followed a brief refresh

"""The custom training loop: tf.function steps under a tf.distribute strategy.

One loop serves every stage (teacher, student, finetune): a stage hands it a
loss function, the variables to train and those to decay (and, per variable,
a learning-rate factor).  The loop owns the optimizer (SGD with PyTorch-style
coupled weight decay and Keras' piecewise-constant decay of the stage's
schedule), checkpoints, resumption, TensorBoard and progress.  After each
epoch it evaluates on the task's validation split; the test split only once,
at the end.

Resumption is exact: the data order and augmentation of an epoch are a pure
function of (seed, epoch) (see `data.train_pipeline`), so a run restored at
step s skips the first `s % steps_per_epoch` batches of its epoch and goes on
as if it had never stopped: no step done twice, none skipped.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable

import keras
import tensorflow as tf
from absl import logging

from nettailor_tf import data as data_lib
from nettailor_tf.config import STRATEGIES
from nettailor_tf.checkpoints import TrainingCheckpoints
from nettailor_tf.errors import TrainingError  # noqa: F401 (train.TrainingError)
from nettailor_tf.schedules import Schedule, StagePlan


_EVALUATIONS_PER_STAGE = 10


def make_strategy(name: str, num_cpu_devices: int = 1) -> tf.distribute.Strategy:
    """Builds the strategy; `num_cpu_devices` > 1 splits the CPU into logical
    devices so that the multi-replica path can be exercised without GPUs.

    Must run before TensorFlow initialises its devices (before any op).
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is not one of {', '.join(STRATEGIES)}")
    if num_cpu_devices > 1 and name not in ("mirrored", "multi_worker"):
        raise ValueError(f"--num_cpu_devices={num_cpu_devices} splits the CPU for a "
                         f"multi-replica strategy; use --strategy=mirrored (or drop it)")
    if num_cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def worker_role(strategy: tf.distribute.Strategy) -> tuple[bool, str]:
    """(is this process the chief, its name) under a multi-worker strategy;
    (True, 'chief') for every single-process strategy.

    Every worker runs the same steps and holds the same weights; only the
    chief's files are the run's.  The others write theirs elsewhere (the
    checkpoint calls are collective: every worker must make them)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type:
        return True, "chief"
    task_id = int(getattr(resolver, "task_id", 0) or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return is_chief, f"{task_type}{task_id}"


def learning_rate_schedule(stage: StagePlan, schedule: Schedule):
    """Keras' piecewise-constant schedule of a resolved stage."""
    values = [schedule.learning_rate * 0.1 ** k for k in range(len(stage.decay_steps) + 1)]
    if stage.decay_steps:
        # Keras switches to the next value after a boundary; the stage's
        # decay step is the first step with the lower rate.
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [s - 1 for s in stage.decay_steps], values)
    # The class needs a boundary: one past the end changes nothing.
    return keras.optimizers.schedules.PiecewiseConstantDecay([stage.total_steps + 1], values * 2)


# loss_fn(images, labels, training) -> (total loss of the local batch, logits,
# {name: scalar term}); the loop scales it to the global batch.
# With `Trainer(indexed=True)` it also gets each image's position in the
# training split: loss_fn(images, labels, training, indices).
LossFn = Callable[..., tuple]


@dataclasses.dataclass
class TrainResult:
    steps: int
    test_accuracy: float        # nan until the stage is complete
    train_images_per_second: float
    resumed_from_step: int
    # nan for a task without a validation split, and for a stage stopped
    # early anywhere but at an epoch's end (evaluated there).
    val_accuracy: float = float("nan")
    total_steps: int = 0
    epochs: int = 0

    @property
    def complete(self) -> bool:
        return self.steps >= self.total_steps


def make_evaluator(strategy, predict_fn):
    """(task, image_size, batch_size, split) -> top-1 accuracy of `predict_fn`
    (images -> logits), with one compiled step reused across calls."""
    def replica_eval(images, labels):
        logits = predict_fn(images)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                          tf.float32)
        return tf.reduce_sum(correct), tf.cast(tf.size(labels), tf.float32)

    # The last batch is smaller: let one trace serve both shapes.
    @tf.function(reduce_retracing=True)
    def eval_step(batch):
        correct, count = strategy.run(replica_eval, args=batch)
        return (strategy.reduce("SUM", correct, axis=None),
                strategy.reduce("SUM", count, axis=None))

    def evaluate(task: data_lib.TaskData, image_size: int, batch_size: int,
                 split: str = "test") -> float:
        correct = total = 0.0
        dataset = strategy.experimental_distribute_dataset(
            data_lib.eval_pipeline(task, image_size, batch_size, split))
        for batch in dataset:
            c, n = eval_step(batch)
            correct, total = correct + float(c), total + float(n)
        return correct / max(total, 1.0)

    return evaluate


# Log lines a stage writes about its steps when stderr is not a terminal
# (TensorBoard gets every --log_every steps regardless).
STEP_LINES_PER_STAGE = 2


def _progress_reporter(total_steps, log_every, first_step=0):
    """A Keras progress bar on a terminal; otherwise a few log lines per
    stage with the time it still needs at the rate measured so far."""
    if sys.stderr.isatty():
        bar = keras.utils.Progbar(total_steps, stateful_metrics=["loss", "acc", "img/s", "lr"])
        return lambda step, values: bar.update(step, list(values.items()))
    started = time.monotonic()
    every = max(log_every, -(-(total_steps - first_step) // STEP_LINES_PER_STAGE))

    def log(step, values):
        if (step - first_step) % every == 0 or step == total_steps:
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            done = step - first_step
            left = (time.monotonic() - started) / max(done, 1) * (total_steps - step)
            logging.info("step %d/%d %s eta %s", step, total_steps, text, format_duration(left))
    return log


def format_duration(seconds: float) -> str:
    """'42 s', '3.4 min' or '1.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


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
            update (gradient and weight decay), i.e. its learning rate, as a
            PyTorch parameter group would (None: all 1).
        held: variables whose learning rate stays at (stage rate x
            multiplier) for the whole stage instead of following its decay.
        eval_split: the split `fit` evaluates after each epoch ('val' or
            'test'); the test accuracy is measured once at the end.
        indexed: hand `loss_fn` each image's position in the training split
            (to look up targets computed once, e.g. a frozen teacher's).
    """

    def __init__(self, strategy, model, loss_fn: LossFn, trainable, decayed, schedule: Schedule,
                 checkpoint_dir: str, summary_dir: str | None = None, jit_compile: bool = False,
                 checkpoint_every: int = 200, log_every: int = 20, predict_fn=None,
                 lr_multipliers=None, held=(), eval_split: str = "val", indexed: bool = False):
        self.strategy = strategy
        self.predict_fn = predict_fn or (lambda images: model(images, training=False)[0])
        self.model = model
        self.loss_fn = loss_fn
        self.trainable = list(trainable)
        decayed_ids = {id(v) for v in decayed}
        self.decay_mask = [id(v) in decayed_ids for v in self.trainable]
        self.lr_multipliers = list(lr_multipliers or [1.0] * len(self.trainable))
        if len(self.lr_multipliers) != len(self.trainable):
            raise ValueError("lr_multipliers needs one factor per trainable variable")
        held_ids = {id(v) for v in held}
        self.held_mask = [id(v) in held_ids for v in self.trainable]
        self.eval_split = eval_split
        self.indexed = indexed
        self._evaluator = None
        self._stage = None  # the schedule `fit` built its steps for
        self.schedule = schedule
        self.checkpoint_dir = checkpoint_dir
        self.summary_dir = summary_dir
        self.jit_compile = jit_compile
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        replicas = strategy.num_replicas_in_sync
        if schedule.batch_size % replicas:
            raise ValueError(f"batch size {schedule.batch_size} is not divisible by the "
                             f"{replicas} replicas")

    # --- update step ---------------------------------------------------------

    def build_steps(self, steps_per_epoch: int) -> StagePlan:
        """Creates the optimizer and the compiled train and eval steps for a
        task of `steps_per_epoch` batches; returns the resolved schedule."""
        schedule, replicas = self.schedule, self.strategy.num_replicas_in_sync
        stage = schedule.plan(steps_per_epoch)
        # float16 compute (--mixed_precision) needs loss scaling, or small
        # gradients underflow to zero; bfloat16 and float32 do not.
        loss_scaling = keras.mixed_precision.global_policy().compute_dtype == "float16"
        with self.strategy.scope():
            learning_rate = learning_rate_schedule(stage, schedule)
            self.optimizer = keras.optimizers.SGD(learning_rate, momentum=schedule.momentum)
            if loss_scaling:
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            # Keras 3 optimizers must create their slots inside the scope
            # before the first distributed step (measured on 2 CPU cores).
            self.optimizer.build(self.trainable)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
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
            # Per-variable rates ride on the update: SGD's step is lr x update.
            undo_decay = schedule.learning_rate / learning_rate(self.step)
            grads = [g if g is None else
                     g * tf.cast(k * undo_decay, g.dtype) if h else
                     g * tf.cast(k, g.dtype) if k != 1.0 else g
                     for g, k, h in zip(grads, self.lr_multipliers, self.held_mask)]
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
                 split: str = "test") -> float:
        if self._evaluator is None:
            self._evaluator = make_evaluator(self.strategy, self.predict_fn)
        return self._evaluator(task, image_size, batch_size, split)

    # --- the loop ------------------------------------------------------------

    def fit(self, task: data_lib.TaskData, image_size: int, seed: int,
            eval_batch_size: int | None = None, max_steps: int | None = None,
            evaluate_test: bool = True) -> TrainResult:
        """Trains to the end of the schedule, resuming from the last checkpoint.

        After each epoch the model is evaluated on the task's validation split
        (the test split when the task has none); the test split is evaluated
        once, at the end (unless `evaluate_test` is false: the result's
        test accuracy is then NaN).  `max_steps` stops early (after a
        checkpoint), as an interruption would.
        """
        schedule = self.schedule
        steps_per_epoch = data_lib.steps_per_epoch(task, schedule.batch_size)
        if self._stage is None or self._stage.steps_per_epoch != steps_per_epoch:
            self._stage = self.build_steps(steps_per_epoch)
        # A later call (training resumed in the same process, as the prune
        # search does halfway) keeps the optimizer and the traced step, which
        # the checkpoint then restores to the same values: building and
        # tracing them again cost 5 s a call on the quickstart.
        stage = self._stage
        total_steps = stage.total_steps
        logging.info("%s: %s", task.name, stage.describe(schedule))
        checkpoints = TrainingCheckpoints(self.checkpoint_dir, self.model, self.optimizer,
                                          self.step, task.name)
        restored = checkpoints.restore()
        if restored:
            logging.info("%s: resuming from %s (step %d of %d)", task.name, restored,
                         int(self.step.numpy()), total_steps)
        resumed_from = int(self.step.numpy())
        writer = (tf.summary.create_file_writer(self.summary_dir) if self.summary_dir
                  else tf.summary.create_noop_writer())
        report = _progress_reporter(total_steps, self.log_every, resumed_from)
        eval_batch_size = eval_batch_size or schedule.batch_size
        eval_split = "val" if task.num_val and self.eval_split == "val" else "test"
        step, images_seen, train_time = resumed_from, 0, 0.0
        stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
        eval_accuracy, evaluated_at = float("nan"), None
        # A small data set's many short epochs are evaluated about ten times
        # per stage, not after each one (digits' 13 student epochs, a
        # 150-image folder's 38): each evaluation costs a pipeline and a pass.
        evaluate_every = -(-stage.epochs // _EVALUATIONS_PER_STAGE)

        while step < stop_at:
            epoch, skip = divmod(step, steps_per_epoch)
            dataset = self.strategy.experimental_distribute_dataset(data_lib.train_pipeline(
                task, image_size, schedule.batch_size, epoch, seed, skip_batches=skip,
                with_index=self.indexed))
            sums, count, tic = {}, 0, time.perf_counter()
            for batch in dataset:
                stats = {k: float(v) for k, v in self.train_step(batch).items()}
                step += 1
                # Per replica: the reduced loss is the sum over replicas.
                checkpoints.observe(stats["loss"] / self.strategy.num_replicas_in_sync, step)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                elapsed = time.perf_counter() - tic
                values = {"loss": sums["loss"] / (count * self.strategy.num_replicas_in_sync),
                          "acc": sums["correct"] / (count * schedule.batch_size),
                          "img/s": count * schedule.batch_size / max(elapsed, 1e-9),
                          "lr": float(self.optimizer.learning_rate)}
                if "loss_scale" in stats:
                    values["loss_scale"] = stats["loss_scale"]
                report(step, values)
                if step % self.log_every == 0:
                    with writer.as_default(step=step):
                        for k, v in values.items():
                            tf.summary.scalar(f"train/{k.replace('/', '_per_')}", v)
                        for k, v in sums.items():
                            if k not in ("loss", "correct", "loss_scale"):
                                tf.summary.scalar(f"train/{k}", v / count / self.strategy.num_replicas_in_sync)
                end_of_epoch = step % steps_per_epoch == 0
                if step % self.checkpoint_every == 0 or end_of_epoch or step == stop_at:
                    checkpoints.save(step, final=step == total_steps)
                if end_of_epoch or step == stop_at:
                    break
            train_time += time.perf_counter() - tic
            images_seen += count * schedule.batch_size
            epochs_done = step // steps_per_epoch
            if step % steps_per_epoch == 0 and (epochs_done % evaluate_every == 0
                                                or epochs_done == stage.epochs):
                eval_accuracy = self.evaluate(task, image_size, eval_batch_size, eval_split)
                evaluated_at = step
                logging.debug("%s: epoch %d/%d %s accuracy %.4f", task.name,
                             step // steps_per_epoch, stage.epochs,
                             "validation" if eval_split == "val" else "test", eval_accuracy)
                with writer.as_default(step=step):
                    tf.summary.scalar(f"{eval_split}/accuracy", eval_accuracy)
        writer.flush()
        complete = step >= total_steps
        test_accuracy = val_accuracy = float("nan")
        if complete:
            if not math.isfinite(eval_accuracy):
                # Resumed after the last epoch ended: evaluate what was restored.
                eval_accuracy = self.evaluate(task, image_size, eval_batch_size, eval_split)
            if eval_split == "val":
                val_accuracy = eval_accuracy
                if evaluate_test:
                    test_accuracy = self.evaluate(task, image_size, eval_batch_size, "test")
            else:
                test_accuracy = eval_accuracy
        elif evaluated_at == step and eval_split == "val":
            # Stopped early at an epoch's end (the prune search's halfway
            # check): that epoch's evaluation is the caller's answer too.
            val_accuracy = eval_accuracy
        return TrainResult(step, test_accuracy, images_seen / max(train_time, 1e-9), resumed_from,
                           val_accuracy=val_accuracy, total_steps=total_steps,
                           epochs=stage.epochs)

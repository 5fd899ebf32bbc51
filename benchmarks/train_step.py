"""Median milliseconds of a teacher and a student training step, as one JSON line.

    python benchmarks/train_step.py --backbone=efficientnet_lite0 --image_size=96 --batch_size=32

Times the real `Trainer` step (forward, backward, coupled weight decay, SGD
update) on a fixed random batch, so that the figure is the model's cost and not
the input pipeline's (benchmarks/input_pipeline.py sets the pipeline's own
figure next to it).  Weights are random: speed does not depend on their values.

The three steps (teacher, student, student with cached targets) take turns in
rounds of a few steps each, and each figure is the median over all rounds: a
change in the machine's load then touches all three alike, so their ratios
hold on a shared machine where timing one after the other swung them 2-4x.
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nettailor_tf  # noqa: E402,F401  (before TensorFlow: it chooses the CPU kernels)

from absl import app, flags

flags.DEFINE_string("backbone", "efficientnet_lite0", "Backbone to time.")
flags.DEFINE_integer("image_size", 96, "Input size in pixels.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (tracing and caches).")
flags.DEFINE_integer("steps", 15, "Timed steps (>= 10).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the step.")
flags.DEFINE_integer("max_skip", 3, "Proxies per block of the student.")
FLAGS = flags.FLAGS


# Steps of one trainer in a row before the next one's turn.
STEPS_PER_TURN = 3


def timed_step_ms(trainer, batch) -> float:
    tic = time.perf_counter()
    stats = trainer.train_step(batch)
    float(stats["loss"])  # wait for the step to finish
    return 1000 * (time.perf_counter() - tic)


def interleaved_step_ms(runs: dict, warmup: int, steps: int) -> dict:
    """{name: median ms} of `runs` ({name: (trainer, batch)}) after `warmup`
    untimed steps each, timed in turns of STEPS_PER_TURN steps until each
    has `steps`."""
    for trainer, batch in runs.values():
        for _ in range(warmup):
            trainer.train_step(batch)
    times = {name: [] for name in runs}
    while any(len(t) < steps for t in times.values()):
        for name, (trainer, batch) in runs.items():
            for _ in range(min(STEPS_PER_TURN, steps - len(times[name]))):
                times[name].append(timed_step_ms(trainer, batch))
    return {name: statistics.median(t) for name, t in times.items()}


def synthetic_batch(batch_size, image_size, num_classes, seed=0):
    """A fixed random batch: float32 pixels in 0..255 and int32 labels."""
    import numpy as np
    import tensorflow as tf

    images = np.random.RandomState(seed).uniform(0, 255, (batch_size, image_size, image_size, 3))
    # tf.identity places the batch on the default device (the GPU if there is
    # one), so that no step pays a host-to-device copy.
    return (tf.identity(tf.constant(images, tf.float32)),
            tf.identity(tf.constant(np.arange(batch_size) % num_classes, tf.int32)))


def measure_steps(backbone_name, image_size, batch_size, num_classes=10, warmup=3, steps=15,
                  jit_compile=False, max_skip=3):
    """Median teacher and student step times on a synthetic batch (the student with the
    teacher run at every step, and with its targets looked up), as a dict.

    Shared with benchmarks/input_pipeline.py, which sets them next to the
    input pipeline's own throughput.
    """
    import keras
    import tensorflow as tf

    from nettailor_tf.model import backbones, complexity, losses, student_network
    from nettailor_tf.stages import nettailor
    from nettailor_tf.training import train

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    batch = synthetic_batch(batch_size, image_size, num_classes)
    schedule = train.Schedule(1, batch_size, 0.01, 1)

    teacher_backbone = backbones.build_backbone(backbone_name)
    teacher = backbones.classifier_model(teacher_backbone, num_classes)

    def teacher_loss(images, labels, training):
        logits, _ = teacher(images, training=training)
        return losses.cross_entropy(logits, labels), logits, {}

    trainer = train.Trainer(strategy, teacher, teacher_loss, teacher.trainable_variables,
                            teacher.trainable_variables, schedule, checkpoint_dir="",
                            jit_compile=jit_compile)
    trainer.build_steps(steps_per_epoch=1_000_000)
    result = {
        "backbone": backbone_name, "image_size": image_size,
        "batch_size": batch_size, "jit_compile": jit_compile,
        "devices": [d.name for d in tf.config.list_logical_devices()],
    }

    # The student step exactly as the student stage runs it: BN-folded frozen
    # teacher for the targets, BN-folded frozen universal blocks, proxies and
    # gates trained with CE + complexity + mimic.
    backbone = backbones.build_backbone(backbone_name)
    frozen_teacher = backbones.folded_classifier(teacher_backbone, teacher)
    plan = student_network.Plan.full(len(backbone.blocks), max_skip)
    student = student_network.build_student(backbone, num_classes, plan, "frozen", image_size)
    norm = complexity.universal_network_flops(backbone, image_size)
    costs = [[c / norm for c in row]
             for row in complexity.branch_flops(backbone, plan, image_size)]
    loss_fn = nettailor.nettailor_loss(student, frozen_teacher, costs, 0.3, 10.0, True)
    trainable, decayed = student.task_variables()
    student_trainer = train.Trainer(strategy, student, loss_fn, trainable, decayed, schedule,
                                    checkpoint_dir="", jit_compile=jit_compile)
    student_trainer.build_steps(steps_per_epoch=1_000_000)

    # The same step with the teacher's targets looked up instead of computed
    # (what the stages do for tasks without augmentation): a table of the
    # batch's own targets, indexed by position.
    from nettailor_tf.training import teacher_cache

    images, _ = batch
    logits, endpoints = frozen_teacher(images, training=False)
    targets = teacher_cache.TeacherTargets(
        tf.Variable(logits, trainable=False), [tf.Variable(e, trainable=False) for e in endpoints])
    cached_loss = nettailor.nettailor_loss(student, frozen_teacher, costs, 0.3, 10.0, True,
                                        targets=targets)
    cached_trainer = train.Trainer(strategy, student, cached_loss, trainable, decayed, schedule,
                                   checkpoint_dir="", jit_compile=jit_compile, indexed=True)
    cached_trainer.build_steps(steps_per_epoch=1_000_000)
    indexed_batch = (*batch, tf.range(batch_size, dtype=tf.int64))
    medians = interleaved_step_ms({"teacher": (trainer, batch),
                                   "student": (student_trainer, batch),
                                   "student_cached": (cached_trainer, indexed_batch)},
                                  warmup, steps)
    for name, ms in medians.items():
        result[f"{name}_step_ms"] = round(ms, 2)
    for name in ("teacher", "student"):
        result[f"{name}_images_per_second"] = round(1000 * batch_size / medians[name], 1)
    for name in ("student", "student_cached"):
        result[f"{name}_over_teacher"] = round(medians[name] / medians["teacher"], 3)
    return result


def main(argv):
    if FLAGS.steps < 10:
        raise app.UsageError("--steps must be >= 10")
    print(json.dumps(measure_steps(FLAGS.backbone, FLAGS.image_size, FLAGS.batch_size,
                                   FLAGS.num_classes, FLAGS.warmup, FLAGS.steps,
                                   FLAGS.jit_compile, FLAGS.max_skip)))


if __name__ == "__main__":
    app.run(main)

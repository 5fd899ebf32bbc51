"""Input-pipeline images/s next to the training step's, as one JSON line.

    python benchmarks/input_pipeline.py --task=mnist5k --backbone=efficientnet_lite0 \\
        --image_size=64 --batch_size=32

Answers one question: can the input pipeline feed the training step, or does
the accelerator wait for data?  Two figures, each measured alone:

* the pipeline: `data.train_pipeline` of the task (the exact datasets the
  trainer reads, one per epoch, with the task's augmentation or `--augment`)
  iterated without any model; the first `--pipeline_warmup` batches (tracing,
  prefetch fill) are not timed, then `--pipeline_epochs` epochs or
  `--pipeline_batches` batches are, dataset construction at each new epoch
  included (the trainer pays it too);
* the step: the teacher and student steps of `--backbone` at the same image
  size and batch, on a synthetic batch (benchmarks/train_step.py's code), so
  the pipeline does not limit them; or read from `--step_json`, a line that
  train_step.py printed for the same backbone, size and batch.

`"pipeline_bound": true` when the pipeline delivers fewer images/s than the
faster of the two steps needs: training would then wait for data.  On a
CPU-only machine the pipeline and the step share the same cores, so the
end-to-end rate is below both figures; the verdict is meant for an
accelerator, where the step does not take the pipeline's cores.

Task specs: anything `data.load_task` accepts (mnist5k, digits,
tfds:NAME[/CONFIG] prepared in --data_dir, folder:PATH).  The step's
classifier has the task's number of classes.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

from absl import app, flags, logging

# Defines --backbone, --image_size, --batch_size, --warmup, --steps,
# --jit_compile and --max_skip (its --num_classes is ignored here: the task
# decides).
import train_step  # noqa: E402

flags.DEFINE_string("task", "mnist5k", "Task spec (mnist5k, digits, tfds:NAME[/CONFIG], "
                    "folder:PATH).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data dir for tfds: tasks.")
flags.DEFINE_enum("augment", "task", ["task", "none", "crop", "crop_flip"],
                  "Augmentation policy; 'task' uses the task's own.")
flags.DEFINE_integer("seed", 0, "Seed of the data order and augmentation.")
flags.DEFINE_integer("pipeline_warmup", 5, "Untimed batches at the start of the pipeline.")
flags.DEFINE_integer("pipeline_epochs", 2, "Timed epochs of the pipeline (when "
                     "--pipeline_batches is 0).")
flags.DEFINE_integer("pipeline_batches", 0, "Timed batches of the pipeline (over as many "
                     "epochs as needed); 0: --pipeline_epochs whole epochs.")
flags.DEFINE_string("step_json", None, "Read the step figures from this file (the JSON line "
                    "benchmarks/train_step.py printed) instead of measuring them.")
FLAGS = flags.FLAGS
# The quickstart's size (train_step.py's own default is 96).
FLAGS.set_default("image_size", 64)


def pipeline_throughput(task, image_size, batch_size, augment=None, seed=0, warmup=5,
                        epochs=2, batches=0):
    """Images/s of `data.train_pipeline` alone, as a dict.

    Iterates epoch 0, 1, ... (a fresh dataset each, as the trainer builds
    them); the first `warmup` batches are untimed; then times `batches`
    batches, or (batches=0) whatever is left of `epochs` whole epochs after
    the warm-up.
    """
    from nettailor_tf import data

    steps = data.steps_per_epoch(task, batch_size)
    if steps < 1:
        raise app.UsageError(f"task {task.spec!r} has {task.num_train} training images: "
                             f"fewer than one batch of {batch_size}")
    target = batches if batches > 0 else max(epochs * steps - warmup, 1)
    seen = timed = images = 0
    epoch, tic = 0, None
    if warmup == 0:
        tic = time.perf_counter()
    while timed < target:
        for images_batch, _ in data.train_pipeline(task, image_size, batch_size, epoch, seed,
                                                   augment=augment):
            seen += 1
            if tic is None:
                if seen >= warmup:
                    tic = time.perf_counter()
                continue
            timed += 1
            images += int(images_batch.shape[0])
            if timed >= target:
                break
        epoch += 1
    seconds = time.perf_counter() - tic
    return {
        "pipeline_images_per_second": round(images / max(seconds, 1e-9), 1),
        "pipeline_timed_batches": timed,
        "pipeline_timed_seconds": round(seconds, 3),
        "pipeline_epochs_read": epoch,
        "pipeline_warmup_batches": warmup,
    }


def _read_step_json(path, backbone, image_size, batch_size):
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip().startswith("{")]
    if not lines:
        raise app.UsageError(f"--step_json={path}: no JSON line in it")
    step = json.loads(lines[-1])
    wanted = {"backbone": backbone, "image_size": image_size, "batch_size": batch_size}
    for key, value in wanted.items():
        if step.get(key) != value:
            raise app.UsageError(f"--step_json={path} has {key}={step.get(key)!r}, "
                                 f"not {value!r}")
    for model in ("teacher", "student"):
        if f"{model}_images_per_second" not in step:
            step[f"{model}_images_per_second"] = round(
                1000 * batch_size / step[f"{model}_step_ms"], 1)
    return step


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.steps < 10:
        raise app.UsageError("--steps must be >= 10")
    if FLAGS.pipeline_warmup < 0 or FLAGS.pipeline_epochs < 1 or FLAGS.pipeline_batches < 0:
        raise app.UsageError("--pipeline_warmup >= 0, --pipeline_epochs >= 1 and "
                             "--pipeline_batches >= 0, please")
    from nettailor_tf import data

    try:
        task = data.load_task(FLAGS.task, data_dir=FLAGS.data_dir)
    except data.DataError as err:
        sys.exit(f"input_pipeline.py: error: {err}")
    augment = task.augment if FLAGS.augment == "task" else FLAGS.augment
    logging.info("task %s: %d training images, %d classes, augmentation %s", task.spec,
                 task.num_train, task.num_classes, augment)
    pipeline = pipeline_throughput(task, FLAGS.image_size, FLAGS.batch_size, augment,
                                   FLAGS.seed, FLAGS.pipeline_warmup, FLAGS.pipeline_epochs,
                                   FLAGS.pipeline_batches)
    logging.info("pipeline alone: %.1f images/s", pipeline["pipeline_images_per_second"])

    if FLAGS.step_json:
        step = _read_step_json(FLAGS.step_json, FLAGS.backbone, FLAGS.image_size,
                               FLAGS.batch_size)
        step_source = FLAGS.step_json
    else:
        step = train_step.measure_steps(FLAGS.backbone, FLAGS.image_size, FLAGS.batch_size,
                                        task.num_classes, FLAGS.warmup, FLAGS.steps,
                                        FLAGS.jit_compile, FLAGS.max_skip)
        step_source = "measured"
    logging.info("step alone: teacher %.1f, student %.1f images/s",
                 step["teacher_images_per_second"], step["student_images_per_second"])

    needed = max(step["teacher_images_per_second"], step["student_images_per_second"])
    result = {
        "task": task.spec, "num_train": task.num_train, "augment": augment,
        "backbone": FLAGS.backbone, "image_size": FLAGS.image_size,
        "batch_size": FLAGS.batch_size,
        **pipeline,
        "teacher_step_ms": step["teacher_step_ms"],
        "teacher_images_per_second": step["teacher_images_per_second"],
        "student_step_ms": step["student_step_ms"],
        "student_images_per_second": step["student_images_per_second"],
        "step_source": step_source,
        "devices": step.get("devices"),
        # > 1: the pipeline outruns the faster step by this factor.
        "pipeline_over_step": round(pipeline["pipeline_images_per_second"] / needed, 3),
        "pipeline_bound": pipeline["pipeline_images_per_second"] < needed,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)

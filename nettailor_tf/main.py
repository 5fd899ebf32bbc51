"""Command line: python -m nettailor_tf.main --flagfile=flags/quickstart.cfg

Flags -> Config -> strategy -> stages.  Every user error ends in one line on
stderr naming the flag, file or value, and exit code 2.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Folder for everything the run writes (checkpoints, "
                    "report.json, exports). Re-running the same command resumes.")
flags.DEFINE_list("tasks", None, "Task specs: mnist5k, digits, tfds:NAME[/CONFIG], folder:PATH.")
flags.DEFINE_list("stages", ["teacher", "student", "prune", "finetune", "export", "benchmark"],
                  "Stages to run, in order: teacher, student, prune, finetune, export "
                  "(SavedModel + TFLite files, parity-checked), benchmark (LiteRT latency), "
                  "submission (Visual Decathlon test predictions; not run by default).")
flags.DEFINE_string("backbone", "efficientnet_lite0", "Backbone: efficientnet_lite0, "
                    "mobilenet_v2, resnet18, resnet34, resnet50, wrn26, tiny.")
flags.DEFINE_string("backbone_weights", "imagenet", "'imagenet' (packaged weights), 'random', "
                    "or a torchvision .pth / .weights.h5 file.")
flags.DEFINE_integer("image_size", 64, "Square input size of the network, in pixels.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data dir (default: TFDS_DATA_DIR "
                    "or ~/tensorflow_datasets).")
flags.DEFINE_bool("download", False, "Let tfds download and prepare datasets (needs internet).")


def _define_schedule_flags(stage: str, what: str, schedule) -> None:
    """--<stage>_epochs, _batch_size, _lr, _decay_every, _decay_epochs,
    _min_steps: one schedule per stage."""
    flags.DEFINE_integer(f"{stage}_epochs", schedule.epochs, f"Epochs of {what}.")
    flags.DEFINE_integer(f"{stage}_batch_size", schedule.batch_size,
                         f"Global batch size of {what}.")
    flags.DEFINE_float(f"{stage}_lr", schedule.learning_rate, f"Learning rate of {what}.")
    flags.DEFINE_float(f"{stage}_decay_every", schedule.decay_every,
                       f"Learning rate x0.1 at every this fraction of {what} (the paper: 0.4).")
    flags.DEFINE_integer(f"{stage}_decay_epochs", schedule.decay_epochs,
                         f"If set: learning rate x0.1 every this many epochs of {what} instead "
                         f"of --{stage}_decay_every.")
    flags.DEFINE_integer(f"{stage}_min_steps", schedule.min_steps,
                         f"Fewest optimiser steps of {what}: a small data set gets more epochs "
                         f"(whole epochs, derived and logged).")


def _define_all_schedule_flags():
    from nettailor_tf.schedules import DEFAULT_SCHEDULES  # no TensorFlow import
    for stage, what in (("teacher", "teacher fine-tuning"),
                        ("student", "NetTailor student training"),
                        ("finetune", "fine-tuning the pruned network")):
        _define_schedule_flags(stage, what, DEFAULT_SCHEDULES[stage])


_define_all_schedule_flags()
flags.DEFINE_float("weight_decay", 5e-4, "Coupled (PyTorch-style) weight decay.")
flags.DEFINE_string("max_skip", "3", "Proxies per block read the last max_skip nodes; "
                    "'dense' reads every earlier node.")
flags.DEFINE_enum("universal_bn", "frozen", ["frozen", "task"], "Universal BN statistics: "
                  "'frozen' (pretrained; universal weights stay shareable across tasks) or "
                  "'task' (re-estimated per task, as the published code does).")
flags.DEFINE_float("gate_lr_multiplier", 10.0, "Learning rate of the gate logits relative to "
                   "the stage's (student and finetune): gates need large steps to become "
                   "decisive, proxies small ones to stay stable.")
flags.DEFINE_bool("gate_lr_decay", False, "Whether the gate logits' learning rate follows the "
                  "stage's decay; off, it holds at --gate_lr_multiplier x the stage's initial "
                  "rate, so gates keep choosing once the proxies have settled.")
flags.DEFINE_bool("cache_teacher_targets", True, "For tasks without augmentation, run the "
                  "frozen teacher once over the training split per stage and look its "
                  "mimic targets up at each step (exact; skipped above 2 GB of targets).")
flags.DEFINE_float("validation_fraction", 0.1, "Fraction of each task's training data held out "
                   "(stratified, seeded by --seed) as the validation split every choice is "
                   "made on.")
flags.DEFINE_enum("selection_split", "validation", ["validation", "test"], "Where choices "
                  "(prune search, tolerance checks) are made: 'validation' (held out of "
                  "training), or 'test', the paper's protocol (trains on the whole training "
                  "split; test accuracy then selects and reports).")
flags.DEFINE_float("complexity_coeff", None, "Weight of the expected-complexity loss. "
                   "Default: what the backbone declares (the paper's 0.3 with the plain mimic "
                   "loss; 3.0 with the normalised one, see --mimic_normalized).")
flags.DEFINE_float("teacher_coeff", 10.0, "Weight of the mimic (distillation) loss.")
flags.DEFINE_bool("mimic_normalized", None, "Divide each mimic term by the teacher "
                  "output's mean square (scale-free). Default: what the backbone declares "
                  "(on for linear-bottleneck backbones such as efficientnet_lite0 and "
                  "mobilenet_v2, off for ReLU ResNets, the paper's plain MSE).")
flags.DEFINE_enum("complexity_p_in", "exact", ["exact", "published"], "p_in of the complexity "
                  "loss: of the node each branch reads (exact) or block l-1's for every branch.")
flags.DEFINE_integer("prune_universal", None, "Universal blocks to remove (smallest gates). "
                     "Unset: the prune search chooses (see --prune_search).")
flags.DEFINE_float("prune_proxy_threshold", 0.05, "Remove proxies whose gate is <= this.")
flags.DEFINE_float("prune_universal_threshold", 0.01, "Also remove every universal block whose "
                   "gate is <= this, whatever --prune_universal says: it adds at most that "
                   "share to its block's output and costs a whole block.")
flags.DEFINE_bool("prune_search", None, "Choose --prune_universal automatically: the leanest "
                  "network whose accuracy on the selection split (--selection_split) is within "
                  "--prune_tolerance of the teacher's (the paper's sweep). On by default unless "
                  "--prune_universal is given; --noprune_search cuts no universal block.")
flags.DEFINE_float("prune_tolerance", 0.005, "Accuracy the prune search may give up against "
                   "the teacher.")
flags.DEFINE_integer("prune_search_steps", 0, "Steps of the fine-tuning stage each prune-search "
                     "candidate runs before it is scored (0: scored as pruning leaves it, "
                     "with its BN statistics re-estimated; seconds per candidate).")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, data order and augmentation.")
flags.DEFINE_string("strategy", "default", "tf.distribute strategy: default, mirrored, "
                    "multi_worker (TF_CONFIG), tpu.")
flags.DEFINE_integer("num_cpu_devices", 1, "Split the CPU into this many logical devices "
                     "(to run --strategy=mirrored without GPUs).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step (slower on CPU).")
flags.DEFINE_bool("mixed_precision", False, "Train with float16 compute and float32 weights "
                  "(for GPUs; loss scaling on; gates, losses and updates stay float32). "
                  "Exports are always float32 graphs.")
flags.DEFINE_integer("checkpoint_every", 200, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", 20, "Steps between log lines and TensorBoard summaries.")
flags.DEFINE_integer("eval_batch_size", 128, "Batch size of evaluation.")
flags.DEFINE_integer("max_steps", None, "Stop each stage after this many steps "
                     "(an interruption on purpose; re-run to resume).")
flags.DEFINE_list("export_variants", ["float32", "float16", "dynamic", "int8"],
                  "TFLite variants of each NetTailor network and of the bundle.")
flags.DEFINE_list("teacher_variants", ["float32"], "TFLite variants of each teacher.")
flags.DEFINE_list("bundle_variants", ["float32", "int8"], "TFLite variants of the multi-task "
                  "bundle.")
flags.DEFINE_integer("calibration_images", 256, "Training images (per task) that calibrate "
                     "the int8 variant.")
flags.DEFINE_float("parity_min_agreement", 0.995, "An export whose float32 top-1 agreement "
                   "with its Keras model is below this fails and is discarded.")
flags.DEFINE_integer("parity_max_images", 0, "Test images each parity check runs (0: all).")
flags.DEFINE_integer("benchmark_runs", 100, "Timed runs per latency (median; >= 50).")
flags.DEFINE_integer("benchmark_warmup", 10, "Untimed runs before each latency.")
flags.DEFINE_string("decathlon_annotations", None, "The Visual Decathlon devkit's annotations "
                    "folder (<domain>_test_stripped.json); needed by --stages=submission.")


def config_from_flags():
    from nettailor_tf.config import Config
    from nettailor_tf.train import Schedule

    def schedule(stage: str) -> Schedule:
        flag = lambda name: FLAGS[f"{stage}_{name}"].value
        return Schedule(flag("epochs"), flag("batch_size"), flag("lr"), flag("decay_epochs"),
                        FLAGS.weight_decay, decay_every=flag("decay_every"),
                        min_steps=flag("min_steps"))

    return Config(
        workdir=FLAGS.workdir, tasks=tuple(FLAGS.tasks or ()), stages=tuple(FLAGS.stages),
        backbone=FLAGS.backbone, backbone_weights=FLAGS.backbone_weights,
        image_size=FLAGS.image_size,
        teacher=schedule("teacher"), student=schedule("student"),
        finetune=schedule("finetune"),
        max_skip=_max_skip(FLAGS.max_skip), universal_bn=FLAGS.universal_bn,
        complexity_coeff=FLAGS.complexity_coeff, teacher_coeff=FLAGS.teacher_coeff,
        complexity_exact=FLAGS.complexity_p_in == "exact",
        mimic_normalized=FLAGS.mimic_normalized, gate_lr_multiplier=FLAGS.gate_lr_multiplier,
        gate_lr_decay=FLAGS.gate_lr_decay, cache_teacher_targets=FLAGS.cache_teacher_targets,
        validation_fraction=FLAGS.validation_fraction, selection_split=FLAGS.selection_split,
        prune_universal=FLAGS.prune_universal,
        prune_proxy_threshold=FLAGS.prune_proxy_threshold,
        prune_universal_threshold=FLAGS.prune_universal_threshold, prune_search=FLAGS.prune_search,
        prune_tolerance=FLAGS.prune_tolerance, prune_search_steps=FLAGS.prune_search_steps,
        data_dir=FLAGS.data_dir, download=FLAGS.download, seed=FLAGS.seed,
        strategy=FLAGS.strategy, num_cpu_devices=FLAGS.num_cpu_devices,
        jit_compile=FLAGS.jit_compile, mixed_precision=FLAGS.mixed_precision,
        checkpoint_every=FLAGS.checkpoint_every,
        log_every=FLAGS.log_every, eval_batch_size=FLAGS.eval_batch_size,
        max_steps=FLAGS.max_steps, export_variants=tuple(FLAGS.export_variants),
        teacher_variants=tuple(FLAGS.teacher_variants),
        bundle_variants=tuple(FLAGS.bundle_variants),
        calibration_images=FLAGS.calibration_images,
        parity_min_agreement=FLAGS.parity_min_agreement,
        parity_max_images=FLAGS.parity_max_images, benchmark_runs=FLAGS.benchmark_runs,
        benchmark_warmup=FLAGS.benchmark_warmup,
        decathlon_annotations=FLAGS.decathlon_annotations)


def _max_skip(value: str) -> int | None:
    if value == "dense":
        return None
    try:
        return int(value)
    except ValueError:
        _fail(f"--max_skip={value!r} must be a positive integer or 'dense'")


def _fail(message: str) -> None:
    print(f"nettailor_tf: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag")
    # Imported here so that --help and flag errors answer without loading TF.
    import tensorflow as tf

    from nettailor_tf import stages, train
    from nettailor_tf.config import ConfigError
    from nettailor_tf.errors import NetTailorError

    config = config_from_flags()
    try:
        # The strategy first: splitting the CPU into logical devices must
        # happen before anything (validation included) touches TensorFlow.
        try:
            strategy = train.make_strategy(config.strategy, config.num_cpu_devices)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        config.validate()
        logging.info("strategy %s with replicas=%d", config.strategy,
                     strategy.num_replicas_in_sync)
        report = stages.run(config, strategy)
    except NetTailorError as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"cannot write to --workdir={config.workdir}: {err.strerror or err} "
              f"({err.filename or 'a file in it'})")
    except tf.errors.InvalidArgumentError as err:
        # The data pipeline's checks (e.g. a label outside [0, num_classes)).
        _fail(err.message.strip().splitlines()[0])
    logging.info("done: %s", report.json_path)


def run():
    # A missing flagfile would otherwise end in absl's multi-line usage dump.
    for arg in sys.argv[1:]:
        if arg.startswith("--flagfile="):
            path = arg.split("=", 1)[1]
            if not os.path.isfile(path):
                _fail(f"--flagfile={path}: no such file")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)


if __name__ == "__main__":
    run()

"""A run's whole configuration: every setting declared once, checked before any work.

Each field of `Config` carries its default, help text and accepted values
(`options.option`); the command-line flags, their absl validators and
`Config.validate` are generated from it, so changing a default is a one-line
edit here.  Library code takes a `Config` (or pieces of it), never absl FLAGS.
Pure Python at import time: `--help` and flag errors answer without loading
TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
import re

from absl import flags

from nettailor_tf import decathlon
from nettailor_tf.common.errors import NetTailorError
from nettailor_tf.settings.options import (OneOf, Range, check_value, max_skip_check, option,
                                           parse_max_skip, parse_search_steps, search_steps_check)
from nettailor_tf.settings.schedules import Schedule

STAGES = ("teacher", "student", "prune", "finetune", "export", "benchmark", "submission")
# What a run does unless --stages says otherwise: `submission` only applies to
# Visual Decathlon tasks and needs the challenge's annotation files.
DEFAULT_STAGES = STAGES[:6]
TFLITE_VARIANTS = ("float32", "float16", "dynamic", "int8", "int8_weights", "int4_weights",
                   "mixed")
# `mixed` is chosen per network on its own validation data: a bundle's
# signatures would each want other layers kept.
BUNDLE_VARIANTS = TFLITE_VARIANTS[:-1]
# Exported unless --export_variants says otherwise: the variants that can be
# worth shipping.  `int4_weights` and `mixed` are left out: on the quickstart
# (EfficientNet-Lite0, 64 px, 2-core x86, an earlier version of the code)
# both were slower than float32, since XNNPACK has no int4 convolution and
# LiteRT's fallback unpacks the int4 weights at every call, and int4_weights
# lost much accuracy (docs/platform_notes.md, L9).
DEFAULT_EXPORT_VARIANTS = ("float32", "float16", "dynamic", "int8", "int8_weights")
# The bundle's own word for the variant `stages.recommend.bundle_variant`
# picks from the tasks' recommended files.
RECOMMENDED = "recommended"
# The backbones `backbones.build_backbone` knows, named here so that the
# command line can list them without importing TensorFlow.
BACKBONES = ("efficientnet_lite0", "mobilenet_v2", "resnet18", "resnet34", "resnet50",
             "resnet50_keras", "wrn26", "tiny")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
UNIVERSAL_BN_MODES = ("frozen", "task")


class ConfigError(NetTailorError, ValueError):
    """A bad flag value: one line naming the flag and what it accepts."""


_PROBABILITY = Range(0, 1, open_high=True)

# Which stages a setting changes (`option(stages=...)`).  The training
# stages in order: a stage redone is followed by every stage that reads its
# output (the stage ledger fingerprints those files).
TRAINING = ("teacher", "student", "prune", "finetune")
NETTAILOR = ("student", "prune", "finetune")  # the stages of the NetTailor network
PRUNE = ("prune",)


def _finetune_readers(config: "Config") -> tuple[str, ...]:
    """The fine-tune's schedule also shapes the prune search's choice where
    each candidate runs the first steps of the fine-tune."""
    searches_with_steps = config.searches_prune and config.prune_search_steps != 0
    return ("prune", "finetune") if searches_with_steps else ("finetune",)


def _trained_stages(config: "Config") -> tuple[str, ...]:
    """The stages that run the optimiser (float16 compute changes their results)."""
    return ("teacher", "student") + _finetune_readers(config)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run.  Field order is the order of `--helpfull`."""
    workdir: str | None = option(None, "Folder for everything the run writes (checkpoints, "
                                 "report.json, exports). Re-running the same command resumes.",
                                 stages=())
    tasks: tuple[str, ...] = option((), "Task specs: mnist5k, digits, tfds:NAME[/CONFIG], "
                                    "folder:PATH.", stages=())
    stages: tuple[str, ...] = option(
        DEFAULT_STAGES, "Stages to run, in order: teacher, student, prune, finetune, export "
        "(SavedModel + TFLite files, parity-checked), benchmark (LiteRT latency), submission "
        "(Visual Decathlon test predictions; not run by default).", check=OneOf(STAGES, "stage"),
        stages=())
    backbone: str = option("efficientnet_lite0", "The pretrained network whose blocks become "
                           "the universal blocks.", choices=BACKBONES, stages=TRAINING)
    backbone_weights: str = option("imagenet", "'imagenet' (packaged weights), 'random', or a "
                                   "torchvision .pth / .weights.h5 file.", stages=TRAINING)
    image_size: int = option(64, "Square input size of the network, in pixels.",
                             check=Range(1), stages=TRAINING)
    data_dir: str | None = option(None, "tensorflow-datasets data dir (default: TFDS_DATA_DIR "
                                  "or ~/tensorflow_datasets).", stages=())
    download: bool = option(False, "Let tfds download and prepare datasets (needs internet).",
    stages=())
    # The defaults of every stage.  Minimum steps: the quickstart's
    # 1,293-image digits gives 40 steps an epoch, too few for its student
    # in a few epochs (on an earlier version of the code it had not
    # converged at 200 steps).  The teacher trains until its
    # validation loss and accuracy stop improving (the plateau rule), within
    # the paper's 20 epochs and at most 2,000 steps' worth of a small task:
    # its fixed 200 steps left a 450-image folder task's teacher 15.6 test
    # points below a 5x longer schedule (docs/results/teacher_plateau.json,
    # rendered in docs/method.md, "Training to convergence").
    teacher: Schedule = option(Schedule(epochs=20, batch_size=32, learning_rate=0.01,
                                        min_steps=2000, plateau=True), "teacher fine-tuning",
                                        stages=("teacher",))
    student: Schedule = option(Schedule(epochs=3, batch_size=32, learning_rate=0.01,
                                        min_steps=500), "NetTailor student training",
                                        stages=("student",))
    # The fine-tune trains by the plateau rule too: on the development tasks
    # (mnist5k and digits, seeds 0 and 1) the fixed 200-224 steps left the
    # pruned networks 0.67 validation points below their teachers on
    # average, the rule (480-720 steps) 0.52 above (docs/results/
    # finetune_shorter.json, rendered in docs/method.md, "The fine-tune").
    finetune: Schedule = option(Schedule(epochs=20, batch_size=32, learning_rate=0.01,
                                         min_steps=2000, plateau=True),
                                "fine-tuning the pruned network", stages=_finetune_readers)
    max_skip: int | None = option(3, "Proxies per block read the last max_skip nodes; 'dense' "
                                  "reads every earlier node.", parse=parse_max_skip,
                                  check=max_skip_check, stages=NETTAILOR)
    universal_bn: str = option("frozen", "Universal BN statistics: 'frozen' (pretrained; "
                               "universal weights stay shareable across tasks) or 'task' "
                               "(re-estimated per task, as the published code does).",
                               choices=UNIVERSAL_BN_MODES, stages=NETTAILOR)
    gate_lr_multiplier: float = option(
        10.0, "Learning rate of the gate logits relative to the stage's (student and "
        "finetune): gates need large steps to become decisive, proxies small ones to stay "
        "stable.", check=Range(0, 1000, open_low=True), stages=("student", "finetune"))
    gate_lr_decay: bool = option(False, "Whether the gate logits' learning rate follows the "
                                 "stage's decay; off, it holds at --gate_lr_multiplier x the "
                                 "stage's initial rate, so gates keep choosing once the proxies "
                                 "have settled.", stages=("student", "finetune"))
    cache_teacher_targets: bool = option(True, "For tasks without augmentation, run the frozen "
                                         "teacher once over the training split per stage and "
                                         "look its mimic targets up at each step (exact; "
                                         "skipped above 2 GB of targets).", stages=())
    validation_fraction: float = option(0.1, "Fraction of each task's training data held out "
                                        "(stratified, seeded by --seed) as the validation "
                                        "split every choice is made on.", stages=TRAINING)
    selection_split: str = option("validation", "Where choices (prune search, tolerance "
                                  "checks) are made: 'validation' (held out of training), or "
                                  "'test', the paper's protocol (trains on the whole training "
                                  "split; test accuracy then selects and reports).",
                                  choices=("validation", "test"), stages=TRAINING)
    complexity_coeff: float | None = option(
        None, "Weight of the expected-complexity loss. Default: what the backbone declares "
        "(the paper's 0.3 with the plain mimic loss; 3.0 with the normalised one, see "
        "--mimic_normalized).", check=Range(0, 100), stages=("student",))
    teacher_coeff: float = option(10.0, "Weight of the mimic (distillation) loss.",
                                  check=Range(0, 1000), stages=("student", "finetune"))
    mimic_normalized: bool | None = option(
        None, "Divide each mimic term by the teacher output's mean square (scale-free). "
        "Default: what the backbone declares (on for linear-bottleneck backbones such as "
        "efficientnet_lite0 and mobilenet_v2, off for ReLU ResNets, the paper's plain MSE).",
        stages=("student", "finetune"))
    complexity_p_in: str = option("exact", "p_in of the complexity loss: of the node each "
                                  "branch reads (exact) or block l-1's for every branch "
                                  "(published).", choices=("exact", "published"),
                                  stages=("student",))
    complexity_cost: str = option(
        "flops", "What a branch costs in the complexity loss and the pruning report: its "
        "multiply-adds (flops, the paper's) or its measured latency (latency: a table of "
        "every branch timed as its own small .tflite with LiteRT, or --latency_table).",
        choices=("flops", "latency"), stages=("student",))
    latency_table: str | None = option(
        None, "A latency table (JSON) measured on the target device, e.g. a phone, with "
        "benchmarks/latency_table.py (BUILD.md); unset: measured on this machine once per "
        "backbone, image size and thread count, and cached in --latency_cache_dir.", stages=())
    latency_threads: int = option(1, "Interpreter threads the latency table is measured with.",
                                  check=Range(1, 64), stages=())
    latency_cache_dir: str | None = option(
        None, "Where measured latency tables are kept (default: $XDG_CACHE_HOME or "
        "~/.cache, under nettailor_tf/latency_tables).", stages=())
    prune_universal: int | None = option(None, "Universal blocks to remove (smallest gates). "
                                         "Unset: the prune search chooses (see "
                                         "--prune_search).", check=Range(0), stages=PRUNE)
    prune_proxy_threshold: float = option(0.05, "Remove proxies whose gate is <= this.",
                                          check=_PROBABILITY, stages=PRUNE)
    prune_universal_threshold: float = option(
        0.01, "Also remove every universal block whose gate is <= this, whatever "
        "--prune_universal says: it adds at most that share to its block's output and costs a "
        "whole block.", check=_PROBABILITY, stages=PRUNE)
    prune_search: bool | None = option(
        None, "Choose --prune_universal automatically: the leanest network whose accuracy on "
        "the selection split (--selection_split) is within --prune_tolerance of the teacher's "
        "(the paper's sweep). On by default unless --prune_universal is given; "
        "--noprune_search cuts no universal block.", stages=PRUNE)
    prune_tolerance: float = option(0.005, "Accuracy a fine-tuned prune-search candidate "
                                    "(--prune_search_steps) may give up against the teacher "
                                    "on the selection split; also where the report calls a "
                                    "pruned network out.", check=_PROBABILITY, stages=PRUNE)
    # 0.25: on the development tasks' students (mnist5k and digits, seeds 0
    # and 1, benchmarks/prune_signals.py: docs/results/prune_signals.json,
    # rendered in docs/prune_signals.md) the damage of
    # successive cuts jumps from at most 16 points to at least 37 (mnist5k)
    # and from at most 13 to at least 76 (digits); a threshold inside both
    # gaps is not moved by a few images or another CPU's rounding.
    prune_allowance: float = option(
        0.25, "Without a budget, the prune search keeps the leanest network whose accuracy, "
        "as pruning leaves it (before fine-tuning), is at most this much below the unpruned "
        "student's on the same images: the training split (evaluation transform) and the "
        "selection split, compared image by image. The fine-tune wins most of it back.",
        check=_PROBABILITY, stages=PRUNE)
    flops_budget: float | None = option(
        None, "Prune to at most this share of the teacher's multiply-adds (e.g. 0.5): the "
        "fewest cuts that fit, i.e. the most accurate network within the budget, instead of "
        "the leanest within --prune_allowance. Out of reach: the leanest network is kept and "
        "the report says what it costs.", check=Range(0, 1, open_low=True), stages=PRUNE)
    latency_budget_ms: float | None = option(
        None, "Prune to at most this many milliseconds per image for the float32 network, as "
        "the latency table predicts it (this machine's, measured once and cached, or a "
        "device's through --latency_table). Combines with --flops_budget.",
        check=Range(0, open_low=True), stages=PRUNE)
    prune_search_steps: int | str = option(
        0, "Steps of the fine-tuning stage that each prune-search candidate past the zero-shot "
        "boundary runs before it is scored against the teacher: a number, or 'finetune' for "
        "the whole stage (the chosen candidate's fine-tune is then done). 0: every candidate "
        "is scored as pruning leaves it, with its BN statistics re-estimated (seconds per "
        "candidate).", parse=parse_search_steps, check=search_steps_check, stages=PRUNE)
    prune_search_max_tuned: int = option(
        0, "At most this many candidates past the zero-shot boundary are fine-tuned and "
        "scored (--prune_search_steps > 0); 0: no limit, until one misses. Each costs "
        "--prune_search_steps steps, and one that misses is not used.", check=Range(0),
        stages=PRUNE)
    seed: int = option(0, "Seed of initialisation, data order and augmentation.",
                       check=Range(0, 2**31 - 1), stages=TRAINING + ("export",))
    strategy: str = option("default", "tf.distribute strategy (multi_worker reads TF_CONFIG).",
                           choices=STRATEGIES, stages=())
    num_cpu_devices: int = option(1, "Split the CPU into this many logical devices (to run "
                                  "--strategy=mirrored without GPUs).", check=Range(1), stages=())
    jit_compile: bool = option(False, "XLA-compile the train step (slower on CPU).", stages=())
    mixed_precision: bool = option(False, "Train with float16 compute and float32 weights (for "
                                   "GPUs; loss scaling on; gates, losses and updates stay "
                                   "float32). Exports are always float32 graphs.",
                                   stages=_trained_stages)
    checkpoint_every: int = option(200, "Steps between checkpoints.", check=Range(1), stages=())
    log_every: int = option(20, "Steps between log lines and TensorBoard summaries.",
                            check=Range(1), stages=())
    eval_batch_size: int = option(128, "Batch size of evaluation.", check=Range(1), stages=())
    max_steps: int | None = option(None, "Stop each stage after this many steps (an "
                                   "interruption on purpose; re-run to resume).",
                                   check=Range(1), stages=())
    restart_from: str | None = option(
        None, "Redo this stage and every later one for every task, instead of refusing a "
        "workdir whose data changed or skipping finished stages: teacher, student, prune, "
        "finetune, export or benchmark (times the files again, e.g. on a quieter machine). "
        "Every run given it starts them over: drop it to resume.",
        choices=("teacher", "student", "prune", "finetune", "export", "benchmark"), stages=())
    export_variants: tuple[str, ...] = option(
        DEFAULT_EXPORT_VARIANTS, "TFLite variants of each NetTailor network (also "
        "int4_weights, and mixed: int4 with the layers that cost accuracy in int8; both "
        "slower than float32 on x86 CPUs).", check=OneOf(TFLITE_VARIANTS, "TFLite variant"),
        stages=("export",))
    teacher_variants: tuple[str, ...] = option(("float32",), "TFLite variants of each teacher.",
                                               check=OneOf(TFLITE_VARIANTS, "TFLite variant"),
                                               stages=("export",))
    bundle_variants: tuple[str, ...] = option(
        ("float32", RECOMMENDED), "TFLite variants of the multi-task bundle (mixed is per task "
        "only); recommended: the fastest variant within half a point of float32's accuracy "
        "on every task's selection split.",
        check=OneOf(BUNDLE_VARIANTS + (RECOMMENDED,), "TFLite variant"), stages=("bundle",))
    mixed_accuracy_budget: float = option(
        0.005, "The mixed variant's budget: accuracy on the selection split it may lose "
        "against its float32 file (layers leave int4 until it is met).", check=_PROBABILITY,
        stages=("export",))
    mixed_kept_as: str = option(
        "int8", "What the mixed variant stores the layers that int4 would cost accuracy in: "
        "int8 weights (smaller) or float32.", choices=("int8", "float32"), stages=("export",))
    calibration_images: int = option(256, "Training images (per task) that calibrate the int8 "
                                     "variant.", check=Range(1), stages=("export",))
    parity_min_agreement: float = option(0.995, "An export whose float32 top-1 agreement with "
                                         "its Keras model is below this fails and is "
                                         "discarded.", check=Range(0, 1), stages=("export",))
    parity_max_images: int = option(0, "Test images each parity check runs (0: all).",
                                    check=Range(0), stages=("export",))
    benchmark_runs: int = option(100, "Timed runs per latency (median; >= 50: a median of "
                                 "fewer runs is noise).", check=Range(50), stages=())
    benchmark_warmup: int = option(10, "Untimed runs before each latency.", check=Range(0),
    stages=())
    decathlon_annotations: str | None = option(
        None, "The Visual Decathlon devkit's annotations folder (<domain>_test_stripped.json); "
        "needed by --stages=submission.", stages=())

    @property
    def complexity_exact(self) -> bool:
        """Whether the complexity loss uses each branch's own p_in."""
        return self.complexity_p_in == "exact"

    @property
    def searches_prune(self) -> bool:
        """Whether the prune stage searches for the number of universal blocks to cut."""
        return self.prune_universal is None and self.prune_search is not False

    def validate(self) -> None:
        """Raises ConfigError on the first bad value; cheap, runs before any work.

        What needs the backbone itself (its smallest image, its packaged
        weights) is checked by `artifacts.check_backbone_settings`.
        """
        for name, field, value in _settings(self):
            problem = check_value(field, value)
            if problem:
                raise ConfigError(f"--{name}={_shown(value)}: {problem}", flag=name)
        for stage in ("teacher", "student", "finetune"):
            schedule = getattr(self, stage)
            problem = schedule.plateau_problem()
            if problem:
                raise ConfigError(f"--{stage}_stop_patience={schedule.stop_patience}: "
                                  f"{problem}", flag=f"{stage}_stop_patience")
        if not self.workdir:
            raise ConfigError("--workdir is required: the folder every output of the run goes "
                              "to", flag="workdir")
        if not self.tasks:
            raise ConfigError("--tasks is required: e.g. --tasks=mnist5k,digits", flag="tasks")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"--tasks lists a task twice: {','.join(self.tasks)}", flag="tasks")
        if self.backbone_weights not in ("imagenet", "random") and not os.path.isfile(
                self.backbone_weights):
            raise ConfigError(f"--backbone_weights={self.backbone_weights!r}: no such file "
                              f"(accepted: imagenet, random, or a .pth / .weights.h5 file)",
                              flag="backbone_weights", path=self.backbone_weights)
        if self.num_cpu_devices > 1 and self.strategy not in ("mirrored", "multi_worker"):
            raise ConfigError(f"--num_cpu_devices={self.num_cpu_devices} splits the CPU for a "
                              f"multi-replica strategy; use --strategy=mirrored (or drop it)",
                              flag="num_cpu_devices")
        if self.selection_split == "validation" and not 0 < self.validation_fraction < 1:
            raise ConfigError(f"--validation_fraction={self.validation_fraction} must be in "
                              f"(0, 1) (or choose on the test split, the paper's protocol: "
                              f"--selection_split=test)", flag="validation_fraction")
        for flag in ("export_variants", "teacher_variants", "bundle_variants"):
            if "float32" not in getattr(self, flag):
                raise ConfigError(f"--{flag} must include float32: the parity check and the "
                                  f"size and latency comparisons read it", flag=flag)
        if self.latency_table is not None and not os.path.isfile(self.latency_table):
            raise ConfigError(f"--latency_table={self.latency_table!r}: no such file (a JSON "
                              f"table from benchmarks/latency_table.py, or leave it unset to "
                              f"measure one here)", flag="latency_table", path=self.latency_table)
        budget = next((f for f in ("flops_budget", "latency_budget_ms")
                       if getattr(self, f) is not None), None)
        if budget and (self.prune_universal is not None or self.prune_search is False):
            given = ("--noprune_search" if self.prune_search is False
                     else f"--prune_universal={self.prune_universal}")
            raise ConfigError(f"--{budget} lets the prune search choose what to cut; drop "
                              f"{given} or --{budget}", flag=budget)
        if self.prune_search and self.prune_universal is not None:
            raise ConfigError(f"--prune_search chooses the number of universal blocks to remove; "
                              f"drop --prune_universal={self.prune_universal} or --prune_search",
                              flag="prune_search")
        if "submission" in self.stages:
            self._validate_submission()

    def _validate_submission(self) -> None:
        for spec in self.tasks:
            if decathlon.task_domain(spec) is None:
                raise ConfigError(
                    f"--stages=submission: task {spec!r} is not a Visual Decathlon task; the "
                    f"stage predicts the challenge's test split of "
                    f"tfds:visual_domain_decathlon/<domain> tasks only", flag="stages")
        if not self.decathlon_annotations:
            raise ConfigError("--stages=submission needs --decathlon_annotations: the devkit's "
                              "annotations folder (decathlon-1.0/annotations, with "
                              "<domain>_test_stripped.json)", flag="decathlon_annotations")
        for spec in self.tasks:
            path = decathlon.stripped_test_annotations(self.decathlon_annotations,
                                                       decathlon.task_domain(spec))
            if not os.path.isfile(path):
                raise ConfigError(f"--decathlon_annotations={self.decathlon_annotations}: no "
                                  f"{os.path.basename(path)} in it (the devkit's "
                                  f"decathlon-1.0/annotations folder has one per domain)",
                                  flag="decathlon_annotations", path=path)


# --- the command line, generated from the fields above -------------------------

def is_schedule(field: dataclasses.Field) -> bool:
    return isinstance(field.default, Schedule)


def flag_name(prefix: str, field: dataclasses.Field) -> str:
    suffix = field.metadata["flag"]
    name = field.name if suffix == "auto" else suffix
    return name if field.metadata["shared"] or not prefix else f"{prefix}_{name}"


def _settings(config: Config):
    """(flag name, field, value) of every setting that has a flag; a shared
    schedule field is listed once, from the first stage."""
    seen = set()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not is_schedule(field):
            yield field.name, field, value
            continue
        for sub in dataclasses.fields(Schedule):
            if sub.metadata["flag"] is None:
                continue
            name = flag_name(field.name, sub)
            if name not in seen:
                seen.add(name)
                yield name, sub, getattr(value, sub.name)


def _shown(value) -> str:
    """A value as absl shows it in its errors."""
    return str(list(value)) if isinstance(value, tuple) else str(value)


_KINDS = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer,
          "float": flags.DEFINE_float, "bool": flags.DEFINE_bool}


def _define(name: str, field: dataclasses.Field, default, help_text: str,
            flag_values: flags.FlagValues) -> None:
    meta = field.metadata
    kind = re.sub(r" \| None$", "", str(field.type))
    if meta["parse"] is not None:
        flags.DEFINE_string(name, None if default is None else str(default), help_text,
                            flag_values=flag_values)
    elif meta["choices"] is not None:
        flags.DEFINE_enum(name, default, list(meta["choices"]), help_text,
                          flag_values=flag_values)
    elif kind.startswith("tuple"):
        flags.DEFINE_list(name, list(default), help_text, flag_values=flag_values)
    else:
        _KINDS[kind](name, default, help_text, flag_values=flag_values)

    def checker(value, field=field):
        if meta["parse"] is not None and value is not None:
            try:
                value = meta["parse"](value)
            except ValueError as error:
                raise flags.ValidationError(str(error)) from None
        problem = check_value(field, value)
        if problem:
            raise flags.ValidationError(problem)
        return True

    if meta["parse"] is not None or meta["check"] is not None:
        flags.register_validator(name, checker, flag_values=flag_values)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one flag per setting of `Config`, with its default, help and checks."""
    defaults = Config()
    for field in dataclasses.fields(Config):
        if not is_schedule(field):
            _define(field.name, field, field.default, field.metadata["help"], flag_values)
            continue
        what = field.metadata["help"]
        for sub in dataclasses.fields(Schedule):
            if sub.metadata["flag"] is None:
                continue
            name = flag_name(field.name, sub)
            if name in flag_values:
                continue  # a shared field, defined by the first stage
            help_text = sub.metadata["help"].format(what=what, stage=field.name)
            _define(name, sub, getattr(getattr(defaults, field.name), sub.name), help_text,
                    flag_values)


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Config:
    """The Config that parsed flags describe (`define_flags` defined them)."""
    values = {}
    for field in dataclasses.fields(Config):
        if is_schedule(field):
            values[field.name] = Schedule(**{
                sub.name: flag_values[flag_name(field.name, sub)].value
                for sub in dataclasses.fields(Schedule) if sub.metadata["flag"] is not None})
            continue
        value = flag_values[field.name].value
        if field.metadata["parse"] is not None and value is not None:
            value = field.metadata["parse"](value)
        elif isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    return Config(**values)

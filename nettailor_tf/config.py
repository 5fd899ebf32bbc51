"""A run's whole configuration, read once from the flags and checked before any work.

Library code takes a `Config` (or pieces of it), never absl FLAGS.
"""
from __future__ import annotations

import dataclasses
import os

from nettailor_tf.errors import NetTailorError
from nettailor_tf import decathlon
from nettailor_tf.backbones import (BACKBONES, DOWNLOADED_IMAGENET, PACKAGED_IMAGENET,
                                   build_backbone)
from nettailor_tf.student import UNIVERSAL_BN_MODES
from nettailor_tf.schedules import DEFAULT_SCHEDULES, Schedule
from nettailor_tf.train import STRATEGIES

STAGES = ("teacher", "student", "prune", "finetune", "export", "benchmark", "submission")
# What a run does unless --stages says otherwise: `submission` only applies to
# Visual Decathlon tasks and needs the challenge's annotation files.
DEFAULT_STAGES = STAGES[:6]
TFLITE_VARIANTS = ("float32", "float16", "dynamic", "int8")


class ConfigError(NetTailorError, ValueError):
    """A bad flag value: one line naming the flag and what it accepts."""


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str
    tasks: tuple[str, ...]
    stages: tuple[str, ...] = DEFAULT_STAGES
    backbone: str = "efficientnet_lite0"
    backbone_weights: str = "imagenet"  # 'imagenet', 'random', or a weights file
    image_size: int = 64
    teacher: Schedule = DEFAULT_SCHEDULES["teacher"]
    student: Schedule = DEFAULT_SCHEDULES["student"]
    finetune: Schedule = DEFAULT_SCHEDULES["finetune"]
    gate_lr_multiplier: float = 10.0   # gate logits' lr relative to the stage's
    gate_lr_decay: bool = False        # True: the gates' lr decays with the stage's
    cache_teacher_targets: bool = True  # compute the teacher's targets once per stage
    validation_fraction: float = 0.1   # of the training data, held out for every choice
    selection_split: str = "validation"  # 'test': the paper's protocol
    max_skip: int | None = 3           # None: dense connectivity
    universal_bn: str = "frozen"
    complexity_coeff: float | None = None  # None: what the backbone declares
    teacher_coeff: float = 10.0
    complexity_exact: bool = True      # False: the published p_in approximation
    mimic_normalized: bool | None = None  # None: what the backbone declares
    prune_universal: int | None = None  # None: chosen by the prune search
    prune_proxy_threshold: float = 0.05
    prune_universal_threshold: float = 0.01
    prune_search: bool | None = None    # None: search unless --prune_universal is set
    prune_tolerance: float = 0.005
    prune_search_steps: int = 0         # 0: score candidates as pruning leaves them
    data_dir: str | None = None
    download: bool = False
    seed: int = 0
    strategy: str = "default"
    num_cpu_devices: int = 1
    jit_compile: bool = False
    mixed_precision: bool = False  # float16 compute in the training stages (GPUs)
    checkpoint_every: int = 200
    log_every: int = 20
    eval_batch_size: int = 128
    max_steps: int | None = None  # stop each stage early, as an interruption would
    export_variants: tuple[str, ...] = TFLITE_VARIANTS
    teacher_variants: tuple[str, ...] = ("float32",)
    bundle_variants: tuple[str, ...] = ("float32", "int8")
    calibration_images: int = 256
    parity_min_agreement: float = 0.995
    parity_max_images: int = 0    # 0: the whole test split
    benchmark_runs: int = 100
    benchmark_warmup: int = 10
    decathlon_annotations: str | None = None  # the devkit's annotations folder

    @property
    def searches_prune(self) -> bool:
        """Whether the prune stage searches for the number of universal blocks to cut."""
        return self.prune_universal is None and self.prune_search is not False

    def validate(self) -> None:
        """Raises ConfigError on the first bad value; cheap, runs before any work."""
        if not self.workdir:
            raise ConfigError("--workdir is required: the folder every output of the run goes to")
        if not self.tasks:
            raise ConfigError("--tasks is required: e.g. --tasks=mnist5k,digits")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"--tasks lists a task twice: {','.join(self.tasks)}")
        for stage in self.stages:
            if stage not in STAGES:
                raise ConfigError(f"--stages: unknown stage {stage!r}; accepted: {', '.join(STAGES)}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"--backbone={self.backbone!r} is not one of {', '.join(BACKBONES)}")
        if (self.backbone_weights == "imagenet"
                and self.backbone not in PACKAGED_IMAGENET + DOWNLOADED_IMAGENET):
            raise ConfigError(
                f"--backbone_weights=imagenet: no packaged ImageNet weights for {self.backbone} "
                f"(packaged: {', '.join(PACKAGED_IMAGENET)}); pass a weights file or 'random'")
        if self.backbone_weights not in ("imagenet", "random") and not os.path.isfile(
                self.backbone_weights):
            raise ConfigError(f"--backbone_weights={self.backbone_weights!r}: no such file "
                              f"(accepted: imagenet, random, or a .pth / .weights.h5 file)")
        backbone = build_backbone(self.backbone)
        minimum = backbone.min_image_size
        if self.image_size < minimum:
            raise ConfigError(f"--image_size={self.image_size} is too small for {self.backbone}: "
                              f"its blocks reduce the image {minimum}x, so use >= {minimum}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.num_cpu_devices < 1:
            raise ConfigError(f"--num_cpu_devices={self.num_cpu_devices} must be >= 1")
        for stage in ("teacher", "student", "finetune"):
            _check_schedule(stage, getattr(self, stage))
        if self.max_skip is not None and self.max_skip < 1:
            raise ConfigError(f"--max_skip={self.max_skip} must be >= 1 or 'dense'")
        if self.universal_bn not in UNIVERSAL_BN_MODES:
            raise ConfigError(f"--universal_bn={self.universal_bn!r} is not one of "
                              f"{', '.join(UNIVERSAL_BN_MODES)}")
        if not 0 < self.gate_lr_multiplier <= 1000:
            raise ConfigError(f"--gate_lr_multiplier={self.gate_lr_multiplier} must be in "
                              f"(0, 1000]")
        if self.selection_split not in ("validation", "test"):
            raise ConfigError(f"--selection_split={self.selection_split!r} is not one of "
                              f"validation, test")
        if self.selection_split == "validation" and not 0 < self.validation_fraction < 1:
            raise ConfigError(f"--validation_fraction={self.validation_fraction} must be in "
                              f"(0, 1) (or choose on the test split, the paper's protocol: "
                              f"--selection_split=test)")
        if self.complexity_coeff is not None and not 0 <= self.complexity_coeff <= 100:
            raise ConfigError(f"--complexity_coeff={self.complexity_coeff} must be in [0, 100]")
        if not 0 <= self.teacher_coeff <= 1000:
            raise ConfigError(f"--teacher_coeff={self.teacher_coeff} must be in [0, 1000]")
        if not 0 <= self.prune_proxy_threshold < 1:
            raise ConfigError(f"--prune_proxy_threshold={self.prune_proxy_threshold} must be "
                              f"in [0, 1)")
        if not 0 <= self.prune_universal_threshold < 1:
            raise ConfigError(f"--prune_universal_threshold={self.prune_universal_threshold} "
                              f"must be in [0, 1)")
        if not 0 <= self.prune_tolerance < 1:
            raise ConfigError(f"--prune_tolerance={self.prune_tolerance} must be in [0, 1)")
        if self.prune_search_steps < 0:
            raise ConfigError(f"--prune_search_steps={self.prune_search_steps} must be >= 0 "
                              f"(0: score candidates without fine-tuning)")
        num_blocks = len(backbone.blocks)
        if self.prune_universal is not None and not 0 <= self.prune_universal <= num_blocks:
            raise ConfigError(f"--prune_universal={self.prune_universal} must be in "
                              f"[0, {num_blocks}] for {self.backbone}")
        for flag, value in (("checkpoint_every", self.checkpoint_every),
                            ("log_every", self.log_every), ("eval_batch_size", self.eval_batch_size)):
            if value < 1:
                raise ConfigError(f"--{flag}={value} must be >= 1")
        for flag, variants in (("export_variants", self.export_variants),
                               ("teacher_variants", self.teacher_variants),
                               ("bundle_variants", self.bundle_variants)):
            for variant in variants:
                if variant not in TFLITE_VARIANTS:
                    raise ConfigError(f"--{flag}: unknown TFLite variant {variant!r}; accepted: "
                                      f"{', '.join(TFLITE_VARIANTS)}")
        for flag, variants in (("export_variants", self.export_variants),
                               ("teacher_variants", self.teacher_variants),
                               ("bundle_variants", self.bundle_variants)):
            if "float32" not in variants:
                raise ConfigError(f"--{flag} must include float32: the parity check and the "
                                  f"size and latency comparisons read it")
        if self.calibration_images < 1:
            raise ConfigError(f"--calibration_images={self.calibration_images} must be >= 1")
        if not 0 <= self.parity_min_agreement <= 1:
            raise ConfigError(f"--parity_min_agreement={self.parity_min_agreement} must be "
                              f"in [0, 1]")
        if self.parity_max_images < 0:
            raise ConfigError(f"--parity_max_images={self.parity_max_images} must be >= 0 "
                              f"(0: the whole test split)")
        if self.benchmark_runs < 50:
            raise ConfigError(f"--benchmark_runs={self.benchmark_runs} must be >= 50: a median "
                              f"of fewer runs is noise")
        if self.benchmark_warmup < 0:
            raise ConfigError(f"--benchmark_warmup={self.benchmark_warmup} must be >= 0")
        if self.prune_search and self.prune_universal is not None:
            raise ConfigError(f"--prune_search chooses the number of universal blocks to remove; "
                              f"drop --prune_universal={self.prune_universal} or --prune_search")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max_steps={self.max_steps} must be >= 1 (or unset)")
        if "submission" in self.stages:
            self._validate_submission()

    def _validate_submission(self) -> None:
        for spec in self.tasks:
            if decathlon.task_domain(spec) is None:
                raise ConfigError(
                    f"--stages=submission: task {spec!r} is not a Visual Decathlon task; the "
                    f"stage predicts the challenge's test split of "
                    f"tfds:visual_domain_decathlon/<domain> tasks only")
        if not self.decathlon_annotations:
            raise ConfigError("--stages=submission needs --decathlon_annotations: the devkit's "
                              "annotations folder (decathlon-1.0/annotations, with "
                              "<domain>_test_stripped.json)")
        for spec in self.tasks:
            path = decathlon.stripped_test_annotations(self.decathlon_annotations,
                                                       decathlon.task_domain(spec))
            if not os.path.isfile(path):
                raise ConfigError(f"--decathlon_annotations={self.decathlon_annotations}: no "
                                  f"{os.path.basename(path)} in it (the devkit's "
                                  f"decathlon-1.0/annotations folder has one per domain)")


def _check_schedule(stage: str, s: Schedule) -> None:
    if s.epochs < 1:
        raise ConfigError(f"--{stage}_epochs={s.epochs} must be >= 1")
    if s.batch_size < 1:
        raise ConfigError(f"--{stage}_batch_size={s.batch_size} must be >= 1")
    if not 0 < s.learning_rate <= 10:
        raise ConfigError(f"--{stage}_lr={s.learning_rate} must be in (0, 10]")
    if s.decay_epochs is not None and s.decay_epochs < 1:
        raise ConfigError(f"--{stage}_decay_epochs={s.decay_epochs} must be >= 1 (or unset: "
                          f"--{stage}_decay_every)")
    if not 0 < s.decay_every <= 1:
        raise ConfigError(f"--{stage}_decay_every={s.decay_every} must be in (0, 1]: a "
                          f"fraction of the stage (1: no decay)")
    if s.min_steps < 0:
        raise ConfigError(f"--{stage}_min_steps={s.min_steps} must be >= 0")
    if not 0 <= s.weight_decay < 1:
        raise ConfigError(f"--weight_decay={s.weight_decay} must be in [0, 1)")

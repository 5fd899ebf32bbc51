"""One definition per setting: flags, defaults, validators and Config.validate agree."""
import dataclasses

import pytest
from absl import flags

from nettailor_tf.settings import stage_settings
from nettailor_tf.settings import config as config_lib
from nettailor_tf.settings.config import Config, ConfigError
from nettailor_tf.settings.options import declared_stages
from nettailor_tf.settings.schedules import Schedule


@pytest.fixture()
def flag_values():
    values = flags.FlagValues()
    config_lib.define_flags(values)
    return values


def test_every_flag_default_is_the_configs_default(flag_values):
    flag_values(["prog"])
    assert config_lib.from_flags(flag_values) == Config()
    # And each flag by name, so that a flag the Config ignored would show.
    defaults = Config()
    for field in dataclasses.fields(Config):
        value = getattr(defaults, field.name)
        if isinstance(value, Schedule):
            assert flag_values[f"{field.name}_epochs"].default == value.epochs
            assert flag_values[f"{field.name}_lr"].default == value.learning_rate
            assert flag_values[f"{field.name}_min_steps"].default == value.min_steps
            assert flag_values["weight_decay"].default == value.weight_decay
        elif field.metadata["parse"] is not None:  # a string flag parsed into the value
            assert flag_values[field.name].default == str(value), field.name
        elif isinstance(value, tuple):
            assert tuple(flag_values[field.name].default) == value, field.name
        else:
            assert flag_values[field.name].default == value, field.name


def test_flags_set_the_config(flag_values):
    flag_values(["prog", "--workdir=w", "--tasks=digits,mnist5k", "--student_lr=0.5",
                 "--weight_decay=0.001", "--max_skip=dense", "--nogate_lr_decay",
                 "--export_variants=float32,int8", "--prune_universal=3",
                 "--prune_search_steps=finetune"])
    config = config_lib.from_flags(flag_values)
    assert config.prune_search_steps == "finetune"
    assert config.tasks == ("digits", "mnist5k")
    assert config.student.learning_rate == 0.5 and config.teacher.learning_rate == 0.01
    assert {config.teacher.weight_decay, config.student.weight_decay,
            config.finetune.weight_decay} == {0.001}
    assert config.max_skip is None and config.prune_universal == 3
    assert config.export_variants == ("float32", "int8")


@pytest.mark.parametrize("args,message", [
    (["--teacher_lr=0"], "--teacher_lr=0.0: must be in (0, 10]"),
    (["--finetune_decay_every=1.5"], "must be in (0, 1]"),
    (["--student_batch_size=0"], "must be >= 1"),
    (["--prune_tolerance=1"], "must be in [0, 1)"),
    (["--benchmark_runs=10"], "must be >= 50"),
    (["--universal_bn=global"], "value should be one of <frozen|task>"),
    (["--export_variants=float32,int4"], "unknown TFLite variant 'int4'"),
    (["--max_skip=0"], "must be >= 1 or 'dense'"),
    (["--prune_search_steps=whole"], "must be an integer >= 0 or 'finetune'"),
    (["--prune_search_steps=-3"], "must be >= 0 or 'finetune'"),
])
def test_absl_validators_reject_out_of_range_values(flag_values, args, message):
    with pytest.raises(flags.IllegalFlagValueError) as error:
        flag_values(["prog", *args])
    assert message in str(error.value)


@pytest.mark.parametrize("changes,message", [
    ({"teacher": Schedule(1, 32, 0.0)}, "--teacher_lr=0.0: must be in (0, 10]"),
    ({"prune_tolerance": 1.0}, "--prune_tolerance=1.0: must be in [0, 1)"),
    ({"stages": ("teacher", "distill")}, "unknown stage 'distill'"),
    ({"strategy": "horovod"}, "--strategy=horovod: is not one of default"),
    ({"workdir": None}, "--workdir is required"),
    ({"tasks": ("digits", "digits")}, "--tasks lists a task twice"),
    ({"prune_search": True, "prune_universal": 2}, "--prune_search chooses"),
    ({"export_variants": ("int8",)}, "--export_variants must include float32"),
    ({"num_cpu_devices": 2}, "--num_cpu_devices=2 splits the CPU"),
])
def test_validate_applies_the_same_checks_to_a_config_built_in_code(changes, message):
    config = dataclasses.replace(Config(workdir="w", tasks=("digits",)), **changes)
    with pytest.raises(ConfigError) as error:
        config.validate()
    assert message in str(error.value)


def test_config_errors_name_their_flag():
    with pytest.raises(ConfigError) as error:
        Config(workdir="w", tasks=("digits",), image_size=0).validate()
    assert error.value.flag == "image_size"


def test_config_imports_without_tensorflow():
    import subprocess
    import sys

    code = ("import sys; import nettailor_tf.settings.config, nettailor_tf.main; "
            "print(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_backbone_names_match_the_builders():
    from nettailor_tf.model import backbones

    assert backbones.BACKBONES == config_lib.BACKBONES
    for name in config_lib.BACKBONES:
        assert backbones.build_backbone(name).name == name


# A value other than the default for each setting, where the generic rule
# below would not give one.
_OTHER_VALUES = {"tasks": ("digits",), "stages": ("teacher",), "workdir": "elsewhere",
                 "backbone_weights": "random", "max_skip": None, "selection_split": "test",
                 "complexity_cost": "latency", "complexity_p_in": "published",
                 "universal_bn": "task", "strategy": "mirrored", "restart_from": "teacher",
                 "export_variants": ("float32",), "teacher_variants": ("float32", "int8"),
                 "bundle_variants": ("float32",), "mixed_kept_as": "float32",
                 "prune_search_steps": 5, "backbone": "tiny"}


def _other(field, value):
    if field.name in _OTHER_VALUES:
        return _OTHER_VALUES[field.name]
    if isinstance(value, Schedule):
        return dataclasses.replace(value, learning_rate=value.learning_rate / 2)
    if isinstance(value, bool):
        return not value
    if value is None:
        return {"str": "x", "int": 3, "float": 0.5, "bool": True}.get(
            field.type.split(" | ")[0], 0.5)
    if isinstance(value, (int, float)):
        return value + 1 if isinstance(value, int) else value / 2
    if isinstance(value, str):
        return value + "_other"
    raise AssertionError(f"no other value for {field.name}")


@pytest.mark.parametrize("field", dataclasses.fields(Config), ids=lambda f: f.name)
def test_every_setting_says_which_stages_it_changes_and_their_records_follow(field):
    """A setting either changes the record of each stage it declares (which
    then redoes the stage: tests/test_stages_provenance.py) and of no other,
    or is declared as changing no result."""
    base = Config(workdir="w", tasks=("mnist5k",), prune_search_steps=0)
    other = dataclasses.replace(base, **{field.name: _other(field, getattr(base, field.name))})
    stages = config_lib.STAGES + ("bundle",)
    declared = set(declared_stages(field, base)) | set(
        declared_stages(field, other))
    assert declared <= set(stages), declared
    for stage in stages:
        before = stage_settings.stage_settings(base, stage)
        after = stage_settings.stage_settings(other, stage)
        if stage in declared:
            assert before != after, f"--{field.name} is declared for {stage} but not recorded"
        else:
            assert {k: v for k, v in before.items() if k != field.name} == \
                {k: v for k, v in after.items() if k != field.name}


def test_a_changed_schedule_is_named_by_its_own_flag():
    base = Config(workdir="w", tasks=("mnist5k",))
    slower = dataclasses.replace(base, teacher=dataclasses.replace(base.teacher,
                                                                   learning_rate=0.001,
                                                                   plateau=False))
    assert stage_settings.changed_settings(stage_settings.stage_settings(base, "teacher"),
                                       stage_settings.stage_settings(slower, "teacher")) == \
        ["--teacher_lr", "--teacher_plateau"]


def test_the_fine_tune_schedule_counts_for_the_prune_search_that_runs_it():
    base = Config(workdir="w", tasks=("mnist5k",))
    assert "finetune" not in stage_settings.stage_settings(base, "prune")
    tuned = dataclasses.replace(base, prune_search_steps=20)
    assert "finetune" in stage_settings.stage_settings(tuned, "prune")

"""The networks stages hand each other, and what a missing one says."""
import dataclasses

import numpy as np
import pytest

from nettailor_tf.run import artifacts
from nettailor_tf.settings.config import Config, ConfigError


def _config(tmp_path, **changes):
    return dataclasses.replace(
        Config(workdir=str(tmp_path), tasks=("digits",), backbone="tiny",
               backbone_weights="random", image_size=16), **changes)


TASK = type("Task", (), {"name": "digits", "num_classes": 10})()


@pytest.mark.parametrize("build,stage", [
    (artifacts.frozen_teacher, "--stages=teacher"),
    (artifacts.trained_student, "--stages=student"),
    (artifacts.fine_tuned_network, "finetune stages first"),
])
def test_a_missing_artifact_names_the_stage_that_makes_it(tmp_path, build, stage):
    with pytest.raises(artifacts.StageError) as error:
        build(_config(tmp_path), TASK)
    assert stage in str(error.value) and str(tmp_path) in error.value.path


def test_random_universal_weights_are_drawn_once_per_workdir(tmp_path):
    config = _config(tmp_path)
    first = artifacts.universal_backbone(config)
    second = artifacts.universal_backbone(dataclasses.replace(config, seed=7))
    assert (tmp_path / "random_backbone.weights.h5").exists()
    for a, b in zip(first.blocks[1].weights, second.blocks[1].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_full_student_follows_max_skip(tmp_path):
    student = artifacts.full_student(_config(tmp_path, max_skip=2), 10)
    # 4 blocks, each reading the last 2 nodes: 1 + 2 + 2 + 2 proxies.
    assert student.plan.counts()["proxies_kept"] == 7
    dense = artifacts.full_student(_config(tmp_path, max_skip=None), 10)
    assert dense.plan.counts()["proxies_kept"] == 1 + 2 + 3 + 4


@pytest.mark.parametrize("changes,message", [
    ({"image_size": 2}, "--image_size=2 is too small for tiny"),
    ({"backbone": "resnet34", "backbone_weights": "imagenet"}, "no packaged ImageNet weights"),
    ({"prune_universal": 9}, "--prune_universal=9 must be in [0, 4] for tiny"),
])
def test_settings_the_backbone_cannot_take_are_config_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError) as error:
        artifacts.check_backbone_settings(_config(tmp_path, **changes))
    assert message in str(error.value)


def test_architecture_settings_name_dense_connectivity(tmp_path):
    settings = artifacts.architecture_settings(_config(tmp_path, max_skip=None))
    assert settings["max_skip"] == "dense" and settings["backbone"] == "tiny"

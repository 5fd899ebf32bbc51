"""All stages end to end, in process, on the tiny backbone and mocked tfds data."""
import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nettailor_tf import prune, stages
from nettailor_tf import student as student_lib
from nettailor_tf.config import Config
from nettailor_tf.train import Schedule

ONE_EPOCH = Schedule(epochs=1, batch_size=16, learning_rate=0.05, decay_epochs=1)


def _config(workdir, **overrides):
    values = dict(workdir=str(workdir), tasks=("tfds:svhn_cropped",),
                  stages=("teacher", "student", "prune", "finetune"), backbone="tiny",
                  backbone_weights="random", image_size=16, teacher=ONE_EPOCH, student=ONE_EPOCH,
                  finetune=ONE_EPOCH, prune_universal=1, prune_proxy_threshold=0.0,
                  log_every=1, checkpoint_every=1)
    values.update(overrides)
    config = Config(**values)
    config.validate()
    return config


@pytest.fixture
def mocked_svhn():
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_all_stages_fill_the_report_and_are_skipped_when_done(tmp_path, mocked_svhn, caplog):
    config = _config(tmp_path)
    strategy = tf.distribute.get_strategy()
    stages.run(config, strategy)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["backbone"] == "tiny" and report["image_size"] == 16
    task = report["tasks"]["svhn_cropped"]
    assert task["num_classes"] == 10
    assert set(task["teacher"]) >= {"accuracy", "params", "flops"}
    assert set(task["student"]) >= {"accuracy", "gates"}
    # 4 blocks, max_skip 3: gates of 2, 3, 4, 4 branches, each a distribution.
    assert [len(g) for g in task["student"]["gates"]] == [2, 3, 4, 4]
    for gates in task["student"]["gates"]:
        assert sum(gates) == pytest.approx(1.0, abs=1e-4)
    pruned = task["pruned"]
    assert set(pruned) >= {"accuracy", "flops", "params_total", "params_task_specific",
                           "universal_blocks_kept", "proxies_kept"}
    assert pruned["universal_blocks_kept"] == 3  # --prune_universal=1 of 4
    assert pruned["flops"] < task["teacher"]["flops"] + 1e5
    assert pruned["params_task_specific"] < pruned["params_total"]
    task_dir = tmp_path / "svhn_cropped"
    for name in ("teacher.weights.h5", "student.npz", "plan.json", "nettailor.npz",
                 "architecture.png"):
        assert (task_dir / name).exists(), name
    assert "architecture.png" in (tmp_path / "report.md").read_text()

    # The plan names the universal blocks it uses; the task file holds no universal weight.
    plan, info = prune.load_plan(str(task_dir / "plan.json"))
    assert info["universal_blocks"] == [l for l, b in enumerate(plan.blocks) if b.universal]
    with np.load(task_dir / "nettailor.npz") as stored:
        assert not any(key.startswith(("stem", "block")) for key in stored.files)

    # The pruned network rebuilt from the plan and the task file is the one the
    # report describes, and its static form gives the same predictions.
    backbone = stages._universal_backbone(config)
    rebuilt = student_lib.build_student(backbone, 10, plan, "frozen", 16)
    prune.load_task_state(rebuilt, str(task_dir / "nettailor.npz"))
    images = tf.random.uniform((4, 16, 16, 3), 0, 255)
    static = prune.static_model(rebuilt)
    np.testing.assert_allclose(static(images), rebuilt(images, training=False, mimic=False)[0],
                               atol=1e-4)

    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        stages.run(config, strategy)
    skipped = [r.getMessage() for r in caplog.records if "already done" in r.getMessage()]
    assert len(skipped) == 4

    # A kill between the plan (the prune stage's commit point) and its drawing:
    # the next run keeps the plan and draws what is missing.
    plan_before = (task_dir / "plan.json").read_bytes()
    (task_dir / "architecture.png").unlink()
    data = json.loads((tmp_path / "report.json").read_text())
    del data["tasks"]["svhn_cropped"]["architecture_png"]
    (tmp_path / "report.json").write_text(json.dumps(data))
    stages.run(dataclasses.replace(config, stages=("prune",)), strategy)
    assert (task_dir / "plan.json").read_bytes() == plan_before
    assert (task_dir / "architecture.png").stat().st_size > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tasks"]["svhn_cropped"]["architecture_png"] == "svhn_cropped/architecture.png"


def test_prune_search_picks_the_leanest_candidate_within_tolerance(tmp_path, mocked_svhn):
    # A tolerance of 1 accepts any accuracy: the search must go to the largest
    # N that still leaves a path to the classifier.
    config = _config(tmp_path, prune_search=True, prune_universal=0, prune_tolerance=0.99,
                     stages=("teacher", "student", "prune"))
    stages.run(config, tf.distribute.get_strategy())
    _, info = prune.load_plan(str(tmp_path / "svhn_cropped" / "plan.json"))
    searched = json.loads((tmp_path / "svhn_cropped" / "prune_search.json").read_text())
    assert info["prune_search"] is True
    assert info["prune_universal"] == max(int(n) for n in searched) == 4


def test_student_stage_without_a_teacher_is_a_clear_error(tmp_path, mocked_svhn):
    config = _config(tmp_path, stages=("student",))
    with pytest.raises(stages.StageError, match="run --stages=teacher first"):
        stages.run(config, tf.distribute.get_strategy())

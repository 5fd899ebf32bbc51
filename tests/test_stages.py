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
    assert set(task["student"]) >= {"accuracy", "val_accuracy", "gates", "gate_entropy"}
    assert 0 <= task["student"]["gate_entropy"] <= 1
    assert 0 <= task["teacher"]["val_accuracy"] <= 1
    # 4 blocks, max_skip 3: gates of 2, 3, 4, 4 branches, each a distribution.
    assert [len(g) for g in task["student"]["gates"]] == [2, 3, 4, 4]
    for gates in task["student"]["gates"]:
        assert sum(gates) == pytest.approx(1.0, abs=1e-4)
    # 48 mocked images, 10% held out per class (one of each of the 10 classes).
    split = json.loads((tmp_path / "svhn_cropped" / "validation_split.json").read_text())
    assert split["num_val"] == 10 and split["num_train"] == 38
    pruned = task["pruned"]
    assert set(pruned) >= {"accuracy", "flops", "params_total", "params_task_specific",
                           "universal_blocks_kept", "proxies_kept", "accuracy_before_finetune",
                           "val_accuracy_before_finetune"}
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


def _fake_search(tmp_path, monkeypatch, accuracies, teacher_val, tolerance, student_val=1.0,
                 fine_tuned=None, steps=0):
    """Runs the prune search over 4 blocks with candidate scores given by N
    (`fine_tuned`: after a brief fine-tune)."""
    scored = []

    def score(config, strategy, task, student, plan, teacher, n, split, target, steps):
        scored.append((n, steps) if steps else n)
        accuracy = fine_tuned[n] if steps else accuracies[n]
        extra = {"steps": steps} if steps else {}
        return {"accuracy": accuracy, "zero_shot_accuracy": accuracies[n], **extra,
                **plan.counts()}

    monkeypatch.setattr(stages, "_score_candidate", score)
    monkeypatch.setattr(stages, "_frozen_teacher", lambda config, task: None)
    monkeypatch.setattr(stages, "_teacher_targets", lambda *args: None)
    config = _config(tmp_path, prune_universal=None, prune_tolerance=tolerance,
                     prune_search_steps=steps)
    report = stages.Report(str(tmp_path), "tiny", 16)
    report.set("t", "teacher", {"accuracy": 0.5, "val_accuracy": teacher_val})
    report.set("t", "student", {"accuracy": 0.5, "val_accuracy": student_val})
    task = type("Task", (), {"name": "t", "num_val": 1000, "num_test": 1000})()
    student = student_lib.build_student(stages._universal_backbone(config), 3,
                                        student_lib.Plan.full(4, 3), "frozen", 16)
    # Two universal gates under one half: the search tries N=2 first.
    alphas = [np.array([0.9, 0.1]), np.array([0.8, 0.1, 0.1]), np.array([0.4, 0.4, 0.1, 0.1]),
              np.array([0.3, 0.5, 0.1, 0.1])]
    result = stages._search_prune_universal(config, None, task, report, student, alphas)
    return result, scored


def test_prune_search_picks_the_leanest_candidate_within_tolerance(tmp_path, monkeypatch):
    # Target 0.82 - 0.03 = 0.79: N=2 (0.80) passes, N=3 (0.60) does not.
    result, scored = _fake_search(tmp_path, monkeypatch, {0: .9, 1: .85, 2: .8, 3: .6, 4: .5},
                                  teacher_val=0.82, tolerance=0.03)
    assert result["chosen"] == 2 and result["met_tolerance"]
    assert result["target"] == pytest.approx(0.79)
    # N=0 first, then the gates' answer 2 (accepted), then 3 (rejected); 4 never needed.
    assert scored == [0, 2, 3]
    saved = json.loads((tmp_path / "t" / "prune_search.json").read_text())
    assert sorted(saved) == ["0", "2", "3"] and saved["3"]["accuracy"] == 0.6


def test_prune_search_brief_fine_tunes_go_past_the_zero_shot_boundary(tmp_path, monkeypatch):
    # As pruned, N=3 misses the target 0.79; fine-tuned briefly it reaches
    # 0.81 and is kept, N=4 (0.7 after its fine-tune) is rejected.
    zero_shot = {0: .9, 1: .85, 2: .8, 3: .6, 4: .5}
    result, scored = _fake_search(tmp_path, monkeypatch, zero_shot, teacher_val=0.82,
                                  tolerance=0.03, fine_tuned={3: .81, 4: .7}, steps=10)
    assert result["chosen"] == 3 and result["met_tolerance"]
    assert scored == [0, 2, 3, (3, 10), (4, 10)]
    candidates = result["candidates"]
    assert candidates["3"]["steps"] == 10 and candidates["3"]["zero_shot_accuracy"] == .6
    # Resuming replays the bisection from the saved zero-shot scores and
    # redoes nothing.
    result, scored = _fake_search(tmp_path, monkeypatch, zero_shot, teacher_val=0.82,
                                  tolerance=0.03, fine_tuned={3: .81, 4: .7}, steps=10)
    assert result["chosen"] == 3 and scored == []


def test_prune_search_brief_fine_tunes_stop_at_the_first_miss(tmp_path, monkeypatch):
    result, scored = _fake_search(tmp_path, monkeypatch, {0: .9, 1: .85, 2: .8, 3: .6, 4: .5},
                                  teacher_val=0.82, tolerance=0.03,
                                  fine_tuned={3: .75, 4: .95}, steps=10)
    assert result["chosen"] == 2 and scored == [0, 2, 3, (3, 10)]


def test_prune_search_aims_at_a_weaker_student_and_at_least_one_image(tmp_path, monkeypatch):
    # The student (0.86) is below the teacher (0.9): pruning keeps the student's.
    result, _ = _fake_search(tmp_path, monkeypatch, {0: .9, 1: .85, 2: .8, 3: .6, 4: .5},
                             teacher_val=0.9, tolerance=0.0, student_val=0.86)
    # 1,000 validation images: the tolerance is at least one of them.
    assert result["tolerance"] == pytest.approx(0.001)
    assert result["target"] == pytest.approx(0.859) and result["chosen"] == 0


def test_prune_search_that_finds_nothing_says_so(tmp_path, monkeypatch):
    result, scored = _fake_search(tmp_path, monkeypatch, {0: .7, 1: .6, 2: .5, 3: .4, 4: .3},
                                  teacher_val=0.9, tolerance=0.005, fine_tuned={}, steps=10)
    assert result["chosen"] == 0 and not result["met_tolerance"]
    # Nothing passed as pruned: no brief fine-tune is spent past a failed N=0.
    assert all(isinstance(n, int) for n in scored)


def test_prune_search_with_brief_fine_tunes_hands_its_checkpoint_to_the_fine_tune(
        tmp_path, mocked_svhn, caplog, monkeypatch):
    config = _config(tmp_path, prune_universal=None, prune_tolerance=0.99,
                     prune_search_steps=2, finetune=Schedule(2, 16, 0.05))
    prepared = stages._prepared_pruned

    def only_the_unpruned_passes_as_pruned(config, strategy, task, student, plan, splits,
                                           raw_test=False):
        # Zero-shot, every cut misses the (lenient) target, so only brief
        # fine-tunes can go past N=0.
        network, accuracies = prepared(config, strategy, task, student, plan, splits, raw_test)
        if not raw_test and plan.counts()["universal_blocks_kept"] < len(plan.blocks):
            accuracies = {split: -1.0 for split in accuracies}
        return network, accuracies

    monkeypatch.setattr(stages, "_prepared_pruned", only_the_unpruned_passes_as_pruned)
    with caplog.at_level("INFO", logger="absl"):
        stages.run(config, tf.distribute.get_strategy())
    _, info = prune.load_plan(str(tmp_path / "svhn_cropped" / "plan.json"))
    search = info["prune_search"]
    assert search["met_tolerance"] and search["steps_per_candidate"] == 2
    assert search["chosen"] > 0
    chosen = search["candidates"][str(search["chosen"])]
    assert chosen["steps"] == 2 and chosen["zero_shot_accuracy"] == -1.0
    messages = [r.getMessage() for r in caplog.records]
    assert any("resumes from the prune search's brief fine-tune" in m for m in messages)
    assert any("resuming from" in m and "finetune_ckpt" in m and "(step 2 of 4)" in m
               for m in messages)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tasks"]["svhn_cropped"]["pruned"]["steps"] == 4


def test_student_stage_without_a_teacher_is_a_clear_error(tmp_path, mocked_svhn):
    config = _config(tmp_path, stages=("student",))
    with pytest.raises(stages.StageError, match="run --stages=teacher first"):
        stages.run(config, tf.distribute.get_strategy())


def test_a_workdir_split_with_another_seed_is_refused(tmp_path, mocked_svhn):
    strategy = tf.distribute.get_strategy()
    stages.run(_config(tmp_path, stages=()), strategy)
    record = json.loads((tmp_path / "svhn_cropped" / "validation_split.json").read_text())
    assert record == {"selection_split": "validation", "validation_fraction": 0.1, "seed": 0,
                      "num_train": 38, "num_val": 10, "num_test": 48}
    stages.run(_config(tmp_path, stages=()), strategy)  # the same split: fine
    with pytest.raises(stages.StageError, match=r"split differently \(seed 0 -> 1\).*new --workdir"):
        stages.run(_config(tmp_path, stages=(), seed=1), strategy)
    with pytest.raises(stages.StageError, match=r"selection_split validation -> test"):
        stages.run(_config(tmp_path, stages=(), selection_split="test"), strategy)

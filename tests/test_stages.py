"""A whole run in process: every training stage on the tiny backbone and
mocked tfds data, resumed and skipped, and the workdir's records."""
import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from helpers import stage_config as _config

from nettailor_tf import stages
from nettailor_tf.model import backbones, complexity, pruning, static_graph, student_network
from nettailor_tf.run import artifacts
from nettailor_tf.run import workdir as workdir_lib
from nettailor_tf.run.workdir import WorkdirError


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
    split = json.loads((tmp_path / "tasks" / "svhn_cropped" / "data.json").read_text())
    assert split["num_val"] == 10 and split["num_train"] == 38
    pruned = task["pruned"]
    assert set(pruned) >= {"accuracy", "flops", "params_total", "params_task_specific",
                           "universal_blocks_kept", "proxies_kept", "accuracy_before_finetune",
                           "val_accuracy_before_finetune"}
    assert pruned["universal_blocks_kept"] == 3  # --prune_universal=1 of 4
    # Multiply-adds: the teacher's, less the cut universal block's, plus the
    # kept proxies', counted here from the plan independently of the stage.
    plan, _ = pruning.load_plan(str(tmp_path / "tasks" / "svhn_cropped" / "plan.json"))
    tiny = backbones.build_backbone("tiny")
    block_flops = complexity.backbone_flops(tiny, 16)["blocks"]
    proxy_flops = sum(sum(row[1:] if b.universal else row)
                      for b, row in zip(plan.blocks, complexity.branch_flops(tiny, plan, 16)))
    cut = [l for l, b in enumerate(plan.blocks) if not b.universal]
    assert len(cut) == 1
    assert pruned["flops"] == (task["teacher"]["flops"] - block_flops[cut[0]] + proxy_flops)
    assert pruned["params_task_specific"] < pruned["params_total"]
    task_dir = tmp_path / "tasks" / "svhn_cropped"
    for name in ("teacher.weights.h5", "student.npz", "plan.json", "nettailor.npz",
                 "architecture.png"):
        assert (task_dir / name).exists(), name
    assert "architecture.png" in (tmp_path / "report.md").read_text()

    # The plan names the universal blocks it uses; the task file holds no universal weight.
    plan, info = pruning.load_plan(str(task_dir / "plan.json"))
    assert info["universal_blocks"] == [l for l, b in enumerate(plan.blocks) if b.universal]
    with np.load(task_dir / "nettailor.npz") as stored:
        assert not any(key.startswith(("stem", "block")) for key in stored.files)

    # The pruned network rebuilt from the plan and the task file is the one the
    # report describes, and its static form gives the same predictions.
    backbone = artifacts.universal_backbone(config)
    rebuilt = student_network.build_student(backbone, 10, plan, "frozen", 16)
    pruning.load_task_state(rebuilt, str(task_dir / "nettailor.npz"))
    images = tf.random.uniform((4, 16, 16, 3), 0, 255)
    static = static_graph.static_model(rebuilt)
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
    assert report["tasks"]["svhn_cropped"]["architecture_png"] == "tasks/svhn_cropped/architecture.png"


def test_a_workdir_split_with_another_seed_is_refused(tmp_path, mocked_svhn):
    strategy = tf.distribute.get_strategy()
    stages.run(_config(tmp_path, stages=()), strategy)
    record = json.loads((tmp_path / "tasks" / "svhn_cropped" / "data.json").read_text())
    fingerprint = record.pop("fingerprint")
    assert len(fingerprint) == 64
    assert record == {"selection_split": "validation", "validation_fraction": 0.1, "seed": 0,
                      "spec": "tfds:svhn_cropped", "num_classes": 10, "num_train": 38,
                      "num_val": 10, "num_test": 48}
    stages.run(_config(tmp_path, stages=()), strategy)  # the same split: fine
    # Another seed draws other validation images: the content differs too.
    with pytest.raises(stages.StageError,
                       match=r"data differs \(seed 0 -> 1, fingerprint \w{12} -> \w{12}\).*"
                             r"new --workdir.*--restart_from=teacher"):
        stages.run(_config(tmp_path, stages=(), seed=1), strategy)
    with pytest.raises(stages.StageError, match=r"selection_split validation -> test"):
        stages.run(_config(tmp_path, stages=(), selection_split="test"), strategy)


def test_a_workdir_made_with_another_architecture_is_refused(tmp_path, mocked_svhn):
    strategy = tf.distribute.get_strategy()
    stages.run(_config(tmp_path, stages=()), strategy)
    settings = json.loads((tmp_path / "settings.json").read_text())
    # The random universal weights drawn for this workdir, by content.
    assert settings.pop("universal_weights_sha256") == workdir_lib.fingerprint(
        str(tmp_path / "random_backbone.weights.h5"))
    assert settings == {"backbone": "tiny", "backbone_weights": "random", "image_size": 16,
                        "max_skip": 3, "universal_bn": "frozen"}
    for changes, said in (({"image_size": 32}, "--image_size=16 (now 32)"),
                          ({"max_skip": None}, "--max_skip=3 (now dense)"),
                          ({"universal_bn": "task"}, "--universal_bn=frozen (now task)")):
        with pytest.raises(WorkdirError, match=said.replace("(", r"\(").replace(")", r"\)")):
            stages.run(_config(tmp_path, stages=(), **changes), strategy)


def test_a_changed_upstream_output_makes_the_downstream_stages_stale(tmp_path, mocked_svhn,
                                                                      caplog):
    strategy = tf.distribute.get_strategy()
    stages.run(_config(tmp_path), strategy)
    task_dir = tmp_path / "tasks" / "svhn_cropped"
    ledger = json.loads((task_dir / "ledger.json").read_text())
    assert set(ledger) == {"teacher", "student", "prune", "finetune", "started"}
    assert set(ledger["started"]) == {"teacher", "student", "prune", "finetune"}
    # Re-prune with other flags: the old fine-tuned weights must not survive.
    (task_dir / "plan.json").unlink()
    with caplog.at_level("WARNING", logger="absl"):
        stages.run(_config(tmp_path, prune_universal=2), strategy)
    assert any("finetune stage's plan changed since it ran; redoing it" in r.getMessage()
               for r in caplog.records)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tasks"]["svhn_cropped"]["pruned"]["universal_blocks_kept"] == 2
    plan, _ = pruning.load_plan(str(task_dir / "plan.json"))
    rebuilt = student_network.build_student(artifacts.universal_backbone(_config(tmp_path)), 10,
                                            plan, "frozen", 16)
    pruning.load_task_state(rebuilt, str(task_dir / "nettailor.npz"))  # fits the new plan


def test_a_capped_stage_still_improving_is_a_finding_and_a_changed_plateau_flag_redoes_it(
        tmp_path, mocked_svhn, caplog):
    strategy = tf.distribute.get_strategy()
    # 38 training images, batch 16: 2 steps an epoch, an evaluation each
    # step; a stop patience beyond the 6 evaluations cannot stop before the cap.
    capped = dataclasses.replace(_config(tmp_path).teacher, epochs=3, plateau=True,
                                 eval_steps=1, plateau_patience=7, stop_patience=8)
    config = _config(tmp_path, stages=("teacher",), teacher=capped)
    with caplog.at_level("WARNING", logger="absl"):
        stages.run(config, strategy)
    assert any("reached the cap of 6 steps" in r.getMessage() for r in caplog.records)
    assert any("the teacher stage reached its cap of 6 steps" in r.getMessage()
               for r in caplog.records)  # the findings of the run, at its end
    entry = json.loads((tmp_path / "report.json").read_text())["tasks"]["svhn_cropped"]["teacher"]
    assert entry["stopped"] == "cap" and entry["converged"] is False
    assert entry["steps"] == entry["cap_steps"] == 6 and entry["lr_reductions"] == 0
    assert 1 <= entry["best_step"] <= 6 and entry["val_loss"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "**Finding:** the teacher stage reached its cap of 6 steps" in markdown
    assert "**not converged**" in markdown

    weights = tmp_path / "tasks" / "svhn_cropped" / "teacher.weights.h5"
    made = weights.stat().st_mtime_ns
    stages.run(config, strategy)  # the same settings: done, skipped
    assert weights.stat().st_mtime_ns == made
    caplog.clear()
    changed = dataclasses.replace(capped, plateau_min_delta=0.5)
    with caplog.at_level("WARNING", logger="absl"):
        stages.run(_config(tmp_path, stages=("teacher",), teacher=changed), strategy)
    assert any("teacher stage's --teacher_plateau_min_delta changed since it ran; redoing it"
               in r.getMessage() for r in caplog.records)
    assert weights.stat().st_mtime_ns != made
    ledger = json.loads((tmp_path / "tasks" / "svhn_cropped" / "ledger.json").read_text())
    assert json.loads(ledger["teacher"]["settings"])["teacher"]["plateau_min_delta"] == 0.5


def test_other_data_under_the_same_name_is_refused_until_restarted(tmp_path):
    import tensorflow_datasets as tfds

    strategy = tf.distribute.get_strategy()
    config = _config(tmp_path, stages=("teacher",))
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        stages.run(config, strategy)
    first = (tmp_path / "tasks" / "svhn_cropped" / "teacher.weights.h5").read_bytes()
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(stages.StageError, match=r"svhn_cropped: this workdir's data differs "
                                                    r"\(num_train 38 -> 30, num_test 48 -> 40"):
            stages.run(config, strategy)
        stages.run(dataclasses.replace(config, restart_from="teacher"), strategy)
    record = json.loads((tmp_path / "tasks" / "svhn_cropped" / "data.json").read_text())
    assert record["num_train"] == 30
    assert (tmp_path / "tasks" / "svhn_cropped" / "teacher.weights.h5").read_bytes() != first


def test_two_specs_that_share_a_folder_are_refused(tmp_path):
    from nettailor_tf import data as data_lib

    one = data_lib.load_task("digits")
    other = dataclasses.replace(one, spec="folder:/elsewhere/digits")
    with pytest.raises(data_lib.DataError, match="would share the task folder tasks/digits"):
        stages.check_task_folders([one, other])


def test_the_time_left_follows_the_pace_of_the_stages_done():
    # A fresh quickstart on a quiet 2-core machine: teacher 82 s, then the
    # rest of the run 445 s (student 167 s, fine-tune 119 s, export 59 s).
    left = stages.run_time_left(82.0, ("teacher",), ("student", "prune", "finetune", "export",
                                                     "benchmark"))
    student, finetune, export = (stages.run_time_left(82.0, ("teacher",), (s,))
                                 for s in ("student", "finetune", "export"))
    assert 0.9 * 445 < left < 1.1 * 445
    assert 0.9 * 167 < student < 1.1 * 167 and 0.9 * 119 < finetune < 1.1 * 119
    assert 0.9 * 59 < export < 1.1 * 59
    # Twice the pace, twice the time left.
    assert stages.run_time_left(312.0, ("teacher",), ("student",)) == pytest.approx(
        2 * stages.run_time_left(156.0, ("teacher",), ("student",)))
    # Nothing to go by: the first stage, or stages that were skipped (already done).
    assert stages.run_time_left(0.0, (), ("teacher",)) is None
    assert stages.run_time_left(0.4, ("teacher", "student"), ("prune",)) is None


def test_restarting_from_export_forgets_the_latency_predictions(tmp_path, mocked_svhn):
    """They were timed beside the files a restart from export removes: left
    in the report, the next benchmark stage took them as done and never
    measured a table beside the new files."""
    strategy = tf.distribute.get_strategy()
    config = _config(tmp_path, stages=())
    stages.run(config, strategy)
    path = tmp_path / "report.json"
    report = json.loads(path.read_text())
    report["tasks"]["svhn_cropped"]["teacher"] = {"accuracy": 0.5, "predicted_latency_ms": 1.0,
                                                  "predicted_latency_error": 0.1}
    path.write_text(json.dumps(report))
    stages.run(dataclasses.replace(config, restart_from="export"), strategy)
    teacher = json.loads(path.read_text())["tasks"]["svhn_cropped"]["teacher"]
    assert teacher == {"accuracy": 0.5}

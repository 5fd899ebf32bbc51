"""The prune stage's search for how many universal blocks to cut."""
import json

import numpy as np
import pytest
import tensorflow as tf
from helpers import stage_config as _config
from report_keys import documented, key_paths

from nettailor_tf import stages
from nettailor_tf.model import pruning, student_network
from nettailor_tf.run import artifacts
from nettailor_tf.run.report import Report
from nettailor_tf.settings.schedules import Schedule
from nettailor_tf.stages import prune_search


POOL, VAL = 1000, 100  # the fake pool: 900 training images, then 100 validation images


def _correct(damage: float) -> np.ndarray:
    """Per-image correctness of a candidate `damage` below the reference,
    which gets the first 900 of the pool's images right."""
    right = int(round(900 - POOL * damage))
    return np.arange(POOL) < right


def _fake_search(tmp_path, monkeypatch, damages, teacher_val=0.9, tolerance=0.03,
                 allowance=0.02, fine_tuned=None, steps=0, max_tuned=0, **budgets):
    """Runs the prune search over the tiny backbone's 4 blocks with zero-shot
    damages given by N (`fine_tuned`: accuracies after a brief fine-tune)."""
    scored = []

    def score(config, strategy, task, student, plan, teacher, n, split, target, steps,
              zero_shot=None):
        # A candidate the walk scored as pruned hands its score over.
        assert zero_shot == (float(np.mean(_correct(damages[n])[-VAL:])) if n in scored
                             else None)
        scored.append((n, steps))
        return {"accuracy": fine_tuned[n], "zero_shot_accuracy": zero_shot, "steps": steps,
                **plan.counts()}

    class Scorer:  # zero-shot answers by the number of universal blocks cut
        def __init__(self, config, task, student, splits):
            assert splits == ("train", "val")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __call__(self, plan):
            if plan is None:
                scored.append("reference")
                return _correct(0.0)
            n = 4 - plan.counts()["universal_blocks_kept"]
            scored.append(n)
            return _correct(damages[n])

    monkeypatch.setattr(prune_search, "score_candidate", score)
    monkeypatch.setattr(prune_search, "ZeroShotScorer", Scorer)
    monkeypatch.setattr(artifacts, "frozen_teacher", lambda config, task: None)
    monkeypatch.setattr(prune_search, "teacher_targets", lambda *args: None)
    config = _config(tmp_path, prune_universal=None, prune_tolerance=tolerance,
                     prune_allowance=allowance, prune_search_steps=steps,
                     prune_search_max_tuned=max_tuned, **budgets)
    report = Report(str(tmp_path), "tiny", 16)
    report.set("t", "teacher", {"accuracy": 0.5, "val_accuracy": teacher_val})
    report.set("t", "student", {"accuracy": 0.5, "val_accuracy": 0.88})
    task = type("Task", (), {"name": "t", "num_val": VAL, "num_test": 1000,
                             "num_classes": 3})()
    backbone = artifacts.universal_backbone(config)
    student = student_network.build_student(backbone, 3, student_network.Plan.full(4, 3), "frozen", 16)
    # Two universal gates under 0.05 (the gates' own answer): the search tries N=2 first.
    alphas = [np.array([0.9, 0.1]), np.array([0.8, 0.1, 0.1]), np.array([0.04, 0.46, 0.4, 0.1]),
              np.array([0.03, 0.77, 0.1, 0.1])]
    search = prune_search.PruneSearch(config, None, task, report, student, alphas, backbone)
    return search.run(), scored


def test_prune_search_keeps_the_leanest_candidate_within_the_allowance(tmp_path, monkeypatch):
    # Allowance 0.02: N=2 (0.015 below the student) passes, N=3 (0.05) does not.
    result, scored = _fake_search(tmp_path, monkeypatch,
                                  {0: 0.0, 1: 0.01, 2: 0.015, 3: 0.05, 4: 0.2})
    assert result["chosen"] == 2 and result["met"] and result["rule"] == "allowance"
    # The unpruned student once, N=0, then the gates' answer 2 (accepted) and
    # 3 (rejected, also the margin past the choice); 4 never needed.
    assert scored == ["reference", 0, 2, 3]
    chosen = result["candidates"]["2"]["damage"]
    assert chosen["difference"] == pytest.approx(0.015) and chosen["images"] == POOL
    # Paired: 15 images only the reference gets right, none the other way.
    assert (chosen["a_only"], chosen["b_only"]) == (15, 0)
    assert chosen["standard_error"] == pytest.approx(np.sqrt((0.015 - 0.015 ** 2) / POOL),
                                                     abs=1e-6)  # rounded for the record
    # The selection split (the pool's last 100 images) gives the zero-shot accuracy.
    assert result["candidates"]["3"]["zero_shot_accuracy"] == pytest.approx(
        np.mean(_correct(0.05)[-VAL:]))
    # From a start below the boundary the walk upwards grows its steps, and a
    # miss is followed by bisection: 1, 2, then 4 (missed), then 3.
    assert [n for n in _walk(1, 4, boundary=2)] == [1, 2, 4, 3]
    saved = json.loads((tmp_path / "tasks" / "t" / "prune_search.json").read_text())
    assert sorted(saved) == ["0", "2", "3"]
    line = prune_search.describe("t", result)
    assert "chose N=2" in line and "damage 1.50 +- 0.38 points on 1000 images" in line
    assert "N=3 would be damage 5.00" in line


def test_prune_search_resumes_from_saved_scores_and_redoes_old_point_scores(tmp_path,
                                                                           monkeypatch):
    damages = {0: 0.0, 1: 0.01, 2: 0.015, 3: 0.05, 4: 0.2}
    _fake_search(tmp_path, monkeypatch, damages)
    result, scored = _fake_search(tmp_path, monkeypatch, damages)
    assert result["chosen"] == 2 and scored == []
    # A search file from before paired scores (a point accuracy only) is scored again.
    path = tmp_path / "tasks" / "t" / "prune_search.json"
    path.write_text(json.dumps({"0": {"accuracy": 0.9, "zero_shot_accuracy": 0.9}}))
    result, scored = _fake_search(tmp_path, monkeypatch, damages)
    assert result["chosen"] == 2 and scored == ["reference", 0, 2, 3]


def _walk(start, limit, boundary):
    tried = []

    def passes(n):
        tried.append(n)
        return n <= boundary

    assert prune_search.search_boundary(passes, start, limit) == boundary
    return tried


@pytest.mark.parametrize("limit", [1, 2, 5, 16])
def test_search_boundary_finds_every_boundary_from_every_start(limit):
    for boundary in range(limit + 1):
        for start in range(1, limit + 1):
            tried = _walk(start, limit, boundary)
            assert len(set(tried)) == len(tried) and all(1 <= n <= limit for n in tried)
            # A walk plus a bisection, each about log2(limit): never a sweep.
            assert len(tried) <= 2 * limit.bit_length() + 1


def test_prune_search_brief_fine_tunes_go_past_the_zero_shot_boundary(tmp_path, monkeypatch):
    # As pruned, N=3 is past the allowance; fine-tuned briefly it reaches
    # 0.88 >= 0.9 - 0.03 and is kept, N=4 (0.7 after its fine-tune) is rejected.
    damages = {0: 0.0, 1: 0.01, 2: 0.015, 3: 0.05, 4: 0.2}
    result, scored = _fake_search(tmp_path, monkeypatch, damages,
                                  fine_tuned={3: .88, 4: .7}, steps=10)
    assert result["chosen"] == 3 and result["met"]
    assert scored == ["reference", 0, 2, 3, (3, 10), (4, 10)]
    candidates = result["candidates"]
    assert candidates["3"]["steps"] == 10 and "damage" in candidates["3"]
    # Resuming redoes nothing.
    result, scored = _fake_search(tmp_path, monkeypatch, damages,
                                  fine_tuned={3: .88, 4: .7}, steps=10)
    assert result["chosen"] == 3 and scored == []
    line = prune_search.describe("t", result)
    assert "fine-tuned validation accuracy 0.8800 against the target 0.8700" in line


def test_prune_search_fine_tunes_at_most_max_tuned_candidates(tmp_path, monkeypatch):
    damages = {0: 0.0, 1: 0.01, 2: 0.015, 3: 0.05, 4: 0.2}
    result, scored = _fake_search(tmp_path, monkeypatch, damages, fine_tuned={3: .88, 4: .88},
                                  steps=10, max_tuned=1)
    assert result["chosen"] == 3 and result["max_tuned"] == 1
    assert scored[-1] == (3, 10)
    result, scored = _fake_search(tmp_path / "unlimited", monkeypatch, damages,
                                  fine_tuned={3: .88, 4: .88}, steps=10)
    assert result["chosen"] == 4 and scored[-2:] == [(3, 10), (4, 10)]


def test_prune_search_whose_n0_loses_more_than_the_allowance_cuts_nothing(tmp_path,
                                                                          monkeypatch):
    result, scored = _fake_search(tmp_path, monkeypatch,
                                  {0: 0.03, 1: 0.04, 2: 0.05, 3: 0.1, 4: 0.2},
                                  fine_tuned={}, steps=10)
    assert result["chosen"] == 0 and not result["met"]
    # Nothing passed as pruned: no fine-tune is spent past a failed N=0.
    assert all(not isinstance(n, tuple) for n in scored)


def _costs(tmp_path):
    """Multiply-add shares of the fake search's candidates N=0..4."""
    config = _config(tmp_path / "costs", prune_universal=None)
    backbone = artifacts.universal_backbone(config)
    task = type("Task", (), {"num_classes": 3})()
    costs = prune_search.CandidateCosts(config, task, backbone)
    student = student_network.build_student(backbone, 3, student_network.Plan.full(4, 3), "frozen", 16)
    alphas = [np.array([0.9, 0.1]), np.array([0.8, 0.1, 0.1]), np.array([0.04, 0.46, 0.4, 0.1]),
              np.array([0.03, 0.77, 0.1, 0.1])]
    return [costs(pruning.prune_plan(student.plan, alphas, n, 0.0, 0.01))["flops_fraction"]
            for n in range(5)]


def test_a_flops_budget_keeps_the_fewest_cuts_that_fit(tmp_path, monkeypatch):
    costs = _costs(tmp_path)
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[2] > costs[4]
    budget = (costs[1] + costs[2]) / 2  # N=2 is the first candidate within it
    damages = {0: 0.0, 1: 0.01, 2: 0.015, 3: 0.05, 4: 0.2}
    result, scored = _fake_search(tmp_path, monkeypatch, damages, flops_budget=budget,
                                  fine_tuned={}, steps=10)
    assert result["chosen"] == 2 and result["met"] and result["rule"] == "budget"
    assert result["candidates"]["2"]["flops_fraction"] == pytest.approx(costs[2], abs=1e-6)
    # Costs are analytic: only the chosen candidate is scored (for the report),
    # and no candidate is fine-tuned whatever --prune_search_steps says.
    assert scored == ["reference", 2]
    assert "N=2 is the fewest cuts within --flops_budget" in prune_search.describe("t", result)


def test_a_budget_out_of_reach_keeps_the_leanest_network_and_says_so(tmp_path, monkeypatch):
    costs = _costs(tmp_path)
    result, _ = _fake_search(tmp_path, monkeypatch, {4: 0.2}, flops_budget=costs[4] / 2)
    assert result["chosen"] == 4 and not result["met"]
    line = prune_search.describe("t", result)
    assert "is out of reach; the leanest network, N=4, costs" in line
    assert f"{costs[4]:.3f} of the teacher's multiply-adds" in line


@pytest.mark.parametrize("search_steps,steps", [(2, 2), ("finetune", 4)])
def test_prune_search_with_brief_fine_tunes_hands_its_checkpoint_to_the_fine_tune(
        tmp_path, mocked_svhn, caplog, monkeypatch, search_steps, steps):
    """A candidate's fine-tune (`steps` of the stage's 4) is where the
    fine-tuning stage resumes: with 'finetune' it has nothing left to train."""
    config = _config(tmp_path, prune_universal=None, prune_tolerance=0.99, prune_allowance=0.0,
                     prune_search_steps=search_steps, finetune=Schedule(2, 16, 0.05))
    score = prune_search.ZeroShotScorer.__call__

    def only_the_unpruned_pass_as_pruned(self, plan):
        # As pruned, every candidate answers as the unpruned student does
        # (damage 0) but the one that cuts every universal block, which gets
        # every image wrong: only a brief fine-tune can take the search there.
        reference = score(self, None)
        if plan is not None and plan.counts()["universal_blocks_kept"] == 0:
            return np.zeros_like(reference)
        return reference

    monkeypatch.setattr(prune_search.ZeroShotScorer, "__call__", only_the_unpruned_pass_as_pruned)
    with caplog.at_level("INFO", logger="absl"):
        stages.run(config, tf.distribute.get_strategy())
    _, info = pruning.load_plan(str(tmp_path / "tasks" / "svhn_cropped" / "plan.json"))
    search = info["prune_search"]
    assert search["met"] and search["steps_per_candidate"] == steps
    # The tiny backbone's 4 blocks: 0 and the gates' answer pass as pruned,
    # the bisection stops at 3, and only N=4 gets a brief fine-tune.
    assert search["chosen"] == 4
    chosen = search["candidates"]["4"]
    assert chosen["steps"] == steps and chosen["zero_shot_accuracy"] == 0.0
    assert all("steps" not in c for n, c in search["candidates"].items() if n != "4")
    messages = [r.getMessage() for r in caplog.records]
    assert any("resumes from the prune search's brief fine-tune" in m for m in messages)
    assert any("resuming from" in m and "finetune_ckpt" in m and f"(step {steps} of 4)" in m
               for m in messages)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tasks"]["svhn_cropped"]["pruned"]["steps"] == 4




def test_zero_shot_scorer_scores_what_the_pruned_network_scores(tmp_path, mocked_svhn):
    """The masked student, its statistics re-estimated on the masked stream,
    reads the accuracy of the pruned network built for the fine-tune, candidate
    after candidate, and the student leaves with its own gates and statistics."""
    from helpers import randomize_weights, task_layers

    from nettailor_tf import data as data_lib
    from nettailor_tf.stages import nettailor

    config = _config(tmp_path)
    strategy = tf.distribute.get_strategy()
    task = data_lib.with_validation_split(data_lib.load_task("tfds:svhn_cropped"), 0.1, 0)
    student = artifacts.full_student(config, task.num_classes)
    randomize_weights(task_layers(student), 2)
    alphas = [a.numpy() for a in student.alphas()]
    before = [v.numpy() for v in student.non_trainable_variables]
    images = tf.random.uniform((4, 16, 16, 3), 0, 255, seed=1)
    logits = student(images, training=False)[0].numpy()
    order = (2, 0, 4, 1, 3)  # out of order: each starts from the student's own gates
    plans = {n: pruning.prune_plan(student.plan, alphas, n, 0.0) for n in order}
    expected = {}
    for n, plan in plans.items():
        pruned, accuracy = nettailor.prepared_pruned(config, strategy, task, student, plan,
                                                     ["val"])
        expected[n] = (pruned(images, training=False)[0].numpy(), accuracy["val"])
    outputs = {}
    with prune_search.ZeroShotScorer(config, task, student, ("val",)) as scorer:
        reference = scorer(None)
        assert reference.shape == (task.num_val,) and reference.dtype == bool
        for n in order:
            correct = scorer(plans[n])
            outputs[n] = student(images, training=False)[0].numpy()
            np.testing.assert_allclose(outputs[n], expected[n][0], rtol=1e-4, atol=1e-4)
            assert np.mean(correct) == pytest.approx(expected[n][1], abs=1.5 / task.num_val)
        # The unpruned student, asked again after the candidates, answers as at first.
        np.testing.assert_array_equal(scorer(None), reference)
    assert not np.allclose(outputs[0], outputs[4], atol=1e-3)  # the candidates differ
    for a, b in zip(before, [v.numpy() for v in student.non_trainable_variables]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(logits, student(images, training=False)[0].numpy())


def test_every_decision_setting_is_in_the_prune_stages_record(tmp_path):
    from nettailor_tf.settings.stage_settings import stage_settings

    config = _config(tmp_path, prune_universal=None)
    decisions = {"prune_universal", "prune_proxy_threshold", "prune_universal_threshold",
                 "prune_search", "prune_tolerance", "prune_allowance", "flops_budget",
                 "latency_budget_ms", "prune_search_steps", "prune_search_max_tuned",
                 "selection_split"}
    assert decisions <= set(stage_settings(config, "prune"))
    # Settings that do not change the choice are not in it.
    assert "log_every" not in stage_settings(config, "prune")


def test_a_changed_allowance_or_a_budget_redoes_the_prune_stage(tmp_path, mocked_svhn, caplog):
    """Real stages on the tiny backbone: the plan follows the settings it was
    made with, and a budget is met by the network the fine-tune trains."""
    config = _config(tmp_path, prune_universal=None, prune_allowance=0.99)
    strategy = tf.distribute.get_strategy()
    stages.run(config, strategy)
    _, info = pruning.load_plan(str(tmp_path / "tasks" / "svhn_cropped" / "plan.json"))
    assert info["prune_search"]["rule"] == "allowance"
    # Allowance 0.99 lets every cut pass: the leanest network the rules allow.
    assert info["prune_search"]["chosen"] == 4
    report = json.loads((tmp_path / "report.json").read_text())
    pruned = report["tasks"]["svhn_cropped"]["pruned"]
    assert pruned["vs_teacher"]["test"]["images"] == 48
    # The report of a run with a prune search: every key is documented (the
    # deploy tests check a run's other keys, without a search).
    assert "tasks.<task>.pruned.prune_search.damage.<key>" in key_paths(report)
    missing = sorted(key_paths(report) - documented())
    assert not missing, f"docs/report_json.md does not document: {missing}"
    from nettailor_tf import data as data_lib

    task = data_lib.with_validation_split(data_lib.load_task("tfds:svhn_cropped"),
                                          config.validation_fraction, config.seed)
    # Damage is measured on the training and validation images together.
    assert pruned["prune_search"]["damage"]["images"] == task.num_train + task.num_val
    import dataclasses

    budget = dataclasses.replace(config, flops_budget=0.8)
    with caplog.at_level("INFO", logger="absl"):
        stages.run(budget, strategy)
    assert any("prune stage's --flops_budget changed since it ran; redoing it" in r.getMessage()
               for r in caplog.records)
    _, info = pruning.load_plan(str(tmp_path / "tasks" / "svhn_cropped" / "plan.json"))
    search = info["prune_search"]
    assert search["rule"] == "budget" and search["flops_budget"] == 0.8
    report = json.loads((tmp_path / "report.json").read_text())
    entry = report["tasks"]["svhn_cropped"]
    fraction = entry["pruned"]["flops"] / entry["teacher"]["flops"]
    assert search["met"] and fraction <= 0.8
    assert fraction == pytest.approx(search["candidates"][str(search["chosen"])]["flops_fraction"],
                                     abs=1e-6)

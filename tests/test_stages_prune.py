"""The prune stage's search for how many universal blocks to cut."""
import json

import numpy as np
import pytest
import tensorflow as tf
from helpers import stage_config as _config

from nettailor_tf import artifacts, prune, stages
from nettailor_tf import student as student_lib
from nettailor_tf.report import Report
from nettailor_tf.schedules import Schedule
from nettailor_tf.stages import prune as prune_stage


def _fake_search(tmp_path, monkeypatch, accuracies, teacher_val, tolerance, student_val=1.0,
                 fine_tuned=None, steps=0, max_tuned=0):
    """Runs the prune search over 4 blocks with candidate scores given by N
    (`fine_tuned`: after a brief fine-tune)."""
    scored = []

    def score(config, strategy, task, student, plan, teacher, n, split, target, steps,
              zero_shot=None):
        scored.append((n, steps) if steps else n)
        # A candidate the walk scored as pruned hands its score over instead
        # of having it computed again.
        assert zero_shot == (accuracies[n] if n in scored else None)
        accuracy = fine_tuned[n] if steps else accuracies[n]
        extra = {"steps": steps} if steps else {}
        return {"accuracy": accuracy, "zero_shot_accuracy": accuracies[n], **extra,
                **plan.counts()}

    class Scorer:  # zero-shot scores by the number of universal blocks cut
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __call__(self, plan, split):
            n = 4 - plan.counts()["universal_blocks_kept"]
            scored.append(n)
            return accuracies[n]

    monkeypatch.setattr(prune_stage, "score_candidate", score)
    monkeypatch.setattr(prune_stage, "ZeroShotScorer", Scorer)
    monkeypatch.setattr(artifacts, "frozen_teacher", lambda config, task: None)
    monkeypatch.setattr(prune_stage, "teacher_targets", lambda *args: None)
    config = _config(tmp_path, prune_universal=None, prune_tolerance=tolerance,
                     prune_search_steps=steps, prune_search_max_tuned=max_tuned)
    report = Report(str(tmp_path), "tiny", 16)
    report.set("t", "teacher", {"accuracy": 0.5, "val_accuracy": teacher_val})
    report.set("t", "student", {"accuracy": 0.5, "val_accuracy": student_val})
    task = type("Task", (), {"name": "t", "num_val": 1000, "num_test": 1000})()
    student = student_lib.build_student(artifacts.universal_backbone(config), 3,
                                        student_lib.Plan.full(4, 3), "frozen", 16)
    # Two universal gates under 0.05 (the gates' own answer): the search tries N=2 first.
    alphas = [np.array([0.9, 0.1]), np.array([0.8, 0.1, 0.1]), np.array([0.04, 0.46, 0.4, 0.1]),
              np.array([0.03, 0.77, 0.1, 0.1])]
    result = prune_stage.search_prune_universal(config, None, task, report, student, alphas)
    return result, scored


def test_prune_search_picks_the_leanest_candidate_within_tolerance(tmp_path, monkeypatch):
    # Target 0.82 - 0.03 = 0.79: N=2 (0.80) passes, N=3 (0.60) does not.
    result, scored = _fake_search(tmp_path, monkeypatch, {0: .9, 1: .85, 2: .8, 3: .6, 4: .5},
                                  teacher_val=0.82, tolerance=0.03)
    assert result["chosen"] == 2 and result["met_tolerance"]
    assert result["target"] == pytest.approx(0.79)
    # N=0 first, then the gates' answer 2 (accepted), then 3 (rejected); 4 never needed.
    assert scored == [0, 2, 3]
    # From a start below the boundary the walk upwards grows its steps, and a
    # miss is followed by bisection: 1, 2, then 4 (missed), then 3.
    assert [n for n in _walk(1, 4, boundary=2)] == [1, 2, 4, 3]
    saved = json.loads((tmp_path / "tasks" / "t" / "prune_search.json").read_text())
    assert sorted(saved) == ["0", "2", "3"] and saved["3"]["accuracy"] == 0.6


def _walk(start, limit, boundary):
    tried = []

    def passes(n):
        tried.append(n)
        return n <= boundary

    assert prune_stage.search_boundary(passes, start, limit) == boundary
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


def test_prune_search_fine_tunes_at_most_max_tuned_candidates(tmp_path, monkeypatch):
    # N=3 and N=4 would both pass after fine-tuning; with one allowed the walk
    # stops at N=3 without paying N=4's fine-tune.
    zero_shot = {0: .9, 1: .85, 2: .8, 3: .6, 4: .5}
    result, scored = _fake_search(tmp_path, monkeypatch, zero_shot, teacher_val=0.82,
                                  tolerance=0.03, fine_tuned={3: .81, 4: .8}, steps=10,
                                  max_tuned=1)
    assert result["chosen"] == 3 and result["max_tuned"] == 1
    assert scored == [0, 2, 3, (3, 10)]
    # Without the limit the same search goes on to N=4.
    result, scored = _fake_search(tmp_path / "unlimited", monkeypatch, zero_shot,
                                  teacher_val=0.82, tolerance=0.03,
                                  fine_tuned={3: .81, 4: .8}, steps=10)
    assert result["chosen"] == 4 and scored[-2:] == [(3, 10), (4, 10)]


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


def test_brief_fine_tunes_are_held_to_the_teacher_not_to_a_weaker_student(tmp_path,
                                                                          monkeypatch):
    # As pruned, candidates are held to the weaker student (0.86 - 0.03); fine-tuned
    # ones to the teacher (0.9 - 0.03): N=3 at 0.88 passes, N=4 at 0.85 would have
    # passed the student's target but misses the teacher's.
    result, scored = _fake_search(tmp_path, monkeypatch, {0: .9, 1: .85, 2: .84, 3: .6, 4: .5},
                                  teacher_val=0.9, student_val=0.86, tolerance=0.03,
                                  fine_tuned={3: .88, 4: .85}, steps=10)
    assert result["target"] == pytest.approx(0.83)
    assert result["fine_tuned_target"] == pytest.approx(0.87)
    assert result["chosen"] == 3 and scored == [0, 2, 3, (3, 10), (4, 10)]


def test_prune_search_that_finds_nothing_says_so(tmp_path, monkeypatch):
    result, scored = _fake_search(tmp_path, monkeypatch, {0: .7, 1: .6, 2: .5, 3: .4, 4: .3},
                                  teacher_val=0.9, tolerance=0.005, fine_tuned={}, steps=10)
    assert result["chosen"] == 0 and not result["met_tolerance"]
    # Nothing passed as pruned: no brief fine-tune is spent past a failed N=0.
    assert all(isinstance(n, int) for n in scored)


@pytest.mark.parametrize("search_steps,steps", [(2, 2), ("finetune", 4)])
def test_prune_search_with_brief_fine_tunes_hands_its_checkpoint_to_the_fine_tune(
        tmp_path, mocked_svhn, caplog, monkeypatch, search_steps, steps):
    """A candidate's fine-tune (`steps` of the stage's 4) is where the
    fine-tuning stage resumes: with 'finetune' it has nothing left to train."""
    config = _config(tmp_path, prune_universal=None, prune_tolerance=0.99,
                     prune_search_steps=search_steps, finetune=Schedule(2, 16, 0.05))
    score = prune_stage.ZeroShotScorer.__call__

    def only_the_unpruned_passes_as_pruned(self, plan, split):
        # Zero-shot, cutting every universal block misses the (lenient)
        # target, so only a brief fine-tune can take the search there.
        accuracy = score(self, plan, split)
        return -1.0 if plan.counts()["universal_blocks_kept"] == 0 else accuracy

    monkeypatch.setattr(prune_stage.ZeroShotScorer, "__call__", only_the_unpruned_passes_as_pruned)
    with caplog.at_level("INFO", logger="absl"):
        stages.run(config, tf.distribute.get_strategy())
    _, info = prune.load_plan(str(tmp_path / "tasks" / "svhn_cropped" / "plan.json"))
    search = info["prune_search"]
    assert search["met_tolerance"] and search["steps_per_candidate"] == steps
    # The tiny backbone's 4 blocks: 0 and the gates' answer pass as pruned,
    # the bisection stops at 3, and only N=4 gets a brief fine-tune.
    assert search["chosen"] == 4
    chosen = search["candidates"]["4"]
    assert chosen["steps"] == steps and chosen["zero_shot_accuracy"] == -1.0
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
    plans = {n: prune.prune_plan(student.plan, alphas, n, 0.0) for n in order}
    expected = {}
    for n, plan in plans.items():
        pruned, accuracy = nettailor.prepared_pruned(config, strategy, task, student, plan,
                                                     ["val"])
        expected[n] = (pruned(images, training=False)[0].numpy(), accuracy["val"])
    outputs = {}
    with prune_stage.ZeroShotScorer(config, strategy, task, student) as scorer:
        for n in order:
            score = scorer(plans[n], "val")
            outputs[n] = student(images, training=False)[0].numpy()
            np.testing.assert_allclose(outputs[n], expected[n][0], rtol=1e-4, atol=1e-4)
            assert score == pytest.approx(expected[n][1], abs=1.5 / task.num_val)
    assert not np.allclose(outputs[0], outputs[4], atol=1e-3)  # the candidates differ
    for a, b in zip(before, [v.numpy() for v in student.non_trainable_variables]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(logits, student(images, training=False)[0].numpy())

"""The student stage."""
import pytest
import tensorflow as tf
from helpers import stage_config as _config

from nettailor_tf import stages


def test_student_stage_without_a_teacher_is_a_clear_error(tmp_path, mocked_svhn):
    config = _config(tmp_path, stages=("student",))
    with pytest.raises(stages.StageError, match="run --stages=teacher first"):
        stages.run(config, tf.distribute.get_strategy())


def test_a_student_priced_in_milliseconds_records_its_table_and_is_redone_without_it(
        tmp_path, mocked_svhn):
    """--complexity_cost=latency: the table's fingerprint is in the student's
    ledger (and in the pruned network's report entry); going back to
    multiply-adds makes the student stale, not the teacher."""
    import json
    import os

    from nettailor_tf.model import pruning
    from nettailor_tf.model.student_network import Plan
    from nettailor_tf.run.workdir import Workdir
    from nettailor_tf.stages.finetune import latency_cost

    cache = str(tmp_path / "cache")
    config = _config(tmp_path / "run", complexity_cost="latency", latency_cache_dir=cache,
                     stages=("teacher", "student"))
    stages.run(config, tf.distribute.get_strategy())
    paths = Workdir(config.workdir)
    task = "svhn_cropped"
    ledger = json.loads(open(paths.ledger(task).path).read())
    priced = ledger["student"]["complexity_cost"]
    assert priced.startswith("latency:") and "complexity_cost" not in ledger["teacher"]
    # One table (its converted files sit beside it, in converted/).
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 1
    # What the finetune stage reports of a pruned plan, from the same table.
    full = Plan.full(4, config.max_skip)
    plan = pruning.prune_plan(full, [[0.9] + [0.1 / len(b.proxy_sources)] * len(b.proxy_sources)
                                     for b in full.blocks], 1, 0.2, 0.01)
    cost = latency_cost(config, plan)
    assert priced == f"latency:{cost['table_fingerprint']}"
    assert 0 < cost["predicted_ms"] < cost["teacher_predicted_ms"] and cost["threads"] == 1
    assert cost["fraction_of_teacher"] == pytest.approx(
        cost["predicted_ms"] / cost["teacher_predicted_ms"], rel=1e-3)
    student = paths.student_state(task)
    before = os.stat(student).st_mtime_ns
    teacher_before = os.stat(paths.teacher_weights(task)).st_mtime_ns
    stages.run(_config(tmp_path / "run", stages=("teacher", "student")),
               tf.distribute.get_strategy())
    assert os.stat(student).st_mtime_ns != before  # trained again, on multiply-adds
    assert os.stat(paths.teacher_weights(task)).st_mtime_ns == teacher_before
    ledger = json.loads(open(paths.ledger(task).path).read())
    assert "complexity_cost" not in ledger["student"]

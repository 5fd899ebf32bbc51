"""The teacher stage: stopped, resumed, and recorded."""
import json

import tensorflow as tf
from helpers import stage_config

from nettailor_tf import data as data_lib
from nettailor_tf.run.report import Report
from nettailor_tf.stages import teacher


def test_a_stopped_teacher_resumes_and_is_then_recorded(tmp_path, mocked_svhn):
    strategy = tf.distribute.get_strategy()
    task = data_lib.with_validation_split(data_lib.load_task("tfds:svhn_cropped"), 0.1, 0)
    report = Report(str(tmp_path), "tiny", 16)
    stopped = stage_config(tmp_path, max_steps=1)
    assert not teacher.run_teacher(stopped, strategy, task, report)
    assert not (tmp_path / "tasks" / "svhn_cropped" / "teacher.weights.h5").exists()
    assert report.get(task.name, "teacher") is None

    assert teacher.run_teacher(stage_config(tmp_path), strategy, task, report)
    entry = json.loads((tmp_path / "report.json").read_text())["tasks"]["svhn_cropped"]["teacher"]
    # 38 training images, batch 16: 2 full batches, the first step from the checkpoint.
    assert entry["steps"] == 2 and entry["weights"] == "tasks/svhn_cropped/teacher.weights.h5"
    assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["val_accuracy"] <= 1
    assert (tmp_path / "tasks" / "svhn_cropped" / "teacher.weights.h5").stat().st_size > 0

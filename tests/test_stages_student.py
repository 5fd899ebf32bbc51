"""The student stage."""
import pytest
import tensorflow as tf
from helpers import stage_config as _config

from nettailor_tf import stages


def test_student_stage_without_a_teacher_is_a_clear_error(tmp_path, mocked_svhn):
    config = _config(tmp_path, stages=("student",))
    with pytest.raises(stages.StageError, match="run --stages=teacher first"):
        stages.run(config, tf.distribute.get_strategy())

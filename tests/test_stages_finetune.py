"""The finetune stage's inputs."""
import pytest
import tensorflow as tf
from helpers import stage_config

from nettailor_tf import stages
from nettailor_tf.run import artifacts


def test_finetune_before_prune_names_the_prune_stage(tmp_path, mocked_svhn):
    config = stage_config(tmp_path, stages=("finetune",))
    with pytest.raises(artifacts.StageError, match=r"no pruning plan at .*--stages=prune"):
        stages.run(config, tf.distribute.get_strategy())

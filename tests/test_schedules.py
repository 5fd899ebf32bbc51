"""A stage's schedule resolved against a task's size: length, decay points, the log line."""
import pytest

from nettailor_tf.settings.config import Config
from nettailor_tf.settings.schedules import Schedule


def test_decay_points_are_fractions_of_the_stage_like_the_paper():
    # The paper: 20 epochs, x0.1 at epochs 8 and 16 (40% and 80%).
    stage = Schedule(epochs=20, batch_size=32, learning_rate=0.1).plan(steps_per_epoch=100)
    assert stage.total_steps == 2000 and stage.decay_steps == [800, 1600]
    # A stage of 5 epochs still decays: at 40% and 80% of it.
    assert Schedule(5, 32, 0.1).plan(44).decay_steps == [88, 176]


def test_absolute_decay_epochs_keep_working():
    stage = Schedule(epochs=20, batch_size=32, learning_rate=0.1, decay_epochs=8).plan(10)
    assert stage.decay_steps == [80, 160]
    # Never decaying within the stage, as before.
    assert Schedule(2, 32, 0.01, decay_epochs=20).plan(10).decay_steps == []


def test_a_small_data_set_gets_whole_epochs_up_to_the_minimum_steps():
    schedule = Schedule(epochs=5, batch_size=32, learning_rate=0.1, min_steps=500)
    small = schedule.plan(steps_per_epoch=40)
    assert (small.epochs, small.total_steps) == (13, 520)
    assert small.decay_steps == [208, 416]
    # A large one is left alone.
    assert schedule.plan(steps_per_epoch=125).epochs == 5
    text = small.describe(schedule)
    assert "13 epochs of 40 steps = 520 steps" in text
    assert "5 requested epochs give 200 steps, under the minimum of 500" in text
    assert "x0.1 at step 208, 416" in text


@pytest.mark.parametrize("stage", ["teacher", "student", "finetune"])
def test_defaults_decay_at_the_papers_forty_percent(stage):
    assert getattr(Config(), stage).decay_every == pytest.approx(0.4)
    assert getattr(Config(), stage).decay_epochs is None

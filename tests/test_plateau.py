"""The plateau rule's decisions on scripted sequences of validation losses
(Keras' ReduceLROnPlateau + EarlyStopping arithmetic); pure Python."""
import math

import pytest

from nettailor_tf.settings.config import Config, ConfigError
from nettailor_tf.settings.schedules import Schedule
from nettailor_tf.training.plateau import IMPROVED, KEEP, PlateauState, REDUCE, STOP, decide


def _rule(**kw):
    settings = dict(epochs=1, batch_size=1, learning_rate=0.1, plateau=True,
                    plateau_patience=2, plateau_factor=0.1, plateau_min_delta=0.01,
                    plateau_cooldown=0, plateau_min_lr=0.0, stop_patience=4,
                    plateau_monitor="loss")
    settings.update(kw)
    return Schedule(**settings)


def _play(schedule, losses, rate=0.1, accuracies=None):
    """Every decision and the rate after it, evaluation by evaluation."""
    state, seen = PlateauState(), []
    accuracies = accuracies or [math.nan] * len(losses)
    for step, (loss, accuracy) in enumerate(zip(losses, accuracies), 1):
        decision, rate = decide(schedule, state, loss, step * 10, rate, accuracy)
        seen.append((decision, round(rate, 10)))
        if decision == STOP:
            break
    return seen, state


def test_reduce_after_patience_then_stop_after_stop_patience():
    seen, state = _play(_rule(), [1.0, 0.9, 0.95, 0.91, 0.92, 0.93, 0.5])
    assert seen == [(IMPROVED, 0.1), (IMPROVED, 0.1), (KEEP, 0.1), (REDUCE, 0.01),
                    (KEEP, 0.01), (STOP, 0.01)]
    assert state.stopped and state.best == 0.9 and state.best_step == 20
    assert state.reductions == 1 and state.stop_wait == 4


def test_an_improvement_resets_both_counts():
    seen, state = _play(_rule(), [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert [d for d, _ in seen] == [IMPROVED, KEEP, REDUCE, IMPROVED, KEEP, REDUCE, KEEP, STOP]
    assert seen[-1][1] == pytest.approx(0.001) and state.best_step == 40


def test_min_delta_a_drop_smaller_than_it_is_no_improvement():
    # 0.995 and 0.991 are below 1.0 but not by 0.01: they count as waiting.
    seen, state = _play(_rule(), [1.0, 0.995, 0.991, 0.989])
    assert [d for d, _ in seen] == [IMPROVED, KEEP, REDUCE, IMPROVED]
    assert state.best == 0.989
    # With min_delta 0, each of them improves.
    seen, _ = _play(_rule(plateau_min_delta=0.0), [1.0, 0.995, 0.991, 0.989])
    assert [d for d, _ in seen] == [IMPROVED] * 4


def test_cooldown_holds_the_wait_after_a_reduction():
    flat = [1.0] + [1.0] * 8
    without, _ = _play(_rule(stop_patience=8), flat)
    assert [d for d, _ in without] == [IMPROVED, KEEP, REDUCE, KEEP, REDUCE, KEEP, REDUCE,
                                       KEEP, STOP]
    cooled, state = _play(_rule(stop_patience=8, plateau_cooldown=2), flat)
    # As in Keras: the first evaluation after a reduction is in the cooldown,
    # the second ends it and counts again, so reductions come one evaluation later.
    assert [d for d, _ in cooled] == [IMPROVED, KEEP, REDUCE, KEEP, KEEP, REDUCE, KEEP,
                                      KEEP, STOP]
    assert state.reductions == 2


def test_min_lr_floors_the_rate_and_then_nothing_is_lowered():
    seen, state = _play(_rule(plateau_min_lr=0.05, stop_patience=6), [1.0] * 7)
    assert [r for _, r in seen] == [0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05]
    assert state.reductions == 1 and seen[-1][0] == STOP


def test_a_higher_accuracy_through_a_rising_loss_is_an_improvement_if_monitored():
    # Growing confident where it is wrong: the loss rises while the accuracy does.
    losses, accuracies = [2.9, 3.0, 3.6, 3.4, 3.5, 3.5], [0.1, 0.2, 0.3, 0.3, 0.3, 0.3]
    by_loss, _ = _play(_rule(), losses, accuracies=accuracies)
    assert [d for d, _ in by_loss] == [IMPROVED, KEEP, REDUCE, KEEP, STOP]
    both, state = _play(_rule(plateau_monitor="loss_or_accuracy"), losses,
                        accuracies=accuracies)
    assert [d for d, _ in both] == [IMPROVED, IMPROVED, IMPROVED, KEEP, REDUCE, KEEP]
    assert (state.best, state.best_accuracy, state.best_step) == (2.9, 0.3, 30)
    # An equal accuracy is no improvement: it takes one image more.
    assert state.wait == 1 and state.stop_wait == 3


def test_a_non_finite_loss_never_improves():
    seen, state = _play(_rule(), [1.0, math.nan, math.inf])
    assert [d for d, _ in seen] == [IMPROVED, KEEP, REDUCE] and state.best == 1.0


def test_state_round_trips_through_its_checkpointed_vector():
    _, state = _play(_rule(plateau_cooldown=1), [1.0, 0.9, 0.95, 0.96])
    again = PlateauState.from_vector(state.to_vector())
    assert again == state and isinstance(again.wait, int) and isinstance(again.stopped, bool)
    assert PlateauState.from_vector(PlateauState().to_vector()).best == math.inf


def test_stopping_before_a_lower_rate_was_tried_is_refused():
    config = Config(workdir="w", tasks=("digits",),
                    teacher=_rule(plateau_patience=3, stop_patience=3))
    with pytest.raises(ConfigError, match=r"^--teacher_stop_patience=3: must be more than"):
        config.validate()
    # A fixed schedule does not read them.
    Config(workdir="w", tasks=("digits",),
           teacher=_rule(plateau=False, plateau_patience=3, stop_patience=3)).validate()

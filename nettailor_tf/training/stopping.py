"""The plateau rule inside the training loop (the rule itself: `plateau`).

`PlateauTracker` keeps the rule's state in a variable and a copy of the
weights of its last improvement; both go into the stage's checkpoints
(`checkpoint_objects`), so a stage resumed in the middle of a wait decides
exactly as the uninterrupted one would.  The learning rate the rule lowers
is the optimizer's own variable, checkpointed with the optimizer: the
stage's rate, which every rate group that is not held follows at its
multiple (`rate_groups`).

Restoring the best weights is off by default (as in Keras): the last
weights were trained at the lowered rate, and on a small task the lowest
validation loss can come long before the best network (the development
folder task's was at step 40, at chance, while its accuracy rose through a
rising loss: docs/method.md, "Training to convergence").  One exception:
a stage that starts from a trained network (`keep_start`: the fine-tune's
pruned one, evaluated before the first step) and never improves on it ends
with it rather than with what its training made of it.
"""
from __future__ import annotations

import tensorflow as tf
from absl import logging

from nettailor_tf.settings.schedules import Schedule
from nettailor_tf.training.checkpoints import weights_by_path
from nettailor_tf.training.plateau import IMPROVED, KEEP, PlateauState, REDUCE, STOP, decide

__all__ = ["IMPROVED", "KEEP", "REDUCE", "STOP", "PlateauTracker"]


class PlateauTracker:
    """The plateau rule's state for one trainer; inert for a fixed schedule."""

    def __init__(self, model, schedule: Schedule, keep_start: bool = False):
        self.schedule = schedule
        self.enabled = schedule.plateau
        self.vector = tf.Variable(PlateauState().to_vector(), dtype=tf.float64,
                                  trainable=False, name="plateau_state")
        self._weights = weights_by_path(model) if model is not None else {}
        self.best_weights = {}
        if self.enabled and (schedule.restore_best or keep_start):
            self.best_weights = {key: tf.Variable(tf.convert_to_tensor(weight),
                                                  trainable=False, name=f"best_{i}")
                                 for i, (key, weight) in enumerate(self._weights.items())}

    def checkpoint_objects(self) -> dict:
        """What the stage's checkpoints keep besides the model and optimizer
        (nothing for a fixed schedule: its checkpoints stay as they were)."""
        if not self.enabled:
            return {}
        found = {"plateau_state": self.vector}
        if self.best_weights:
            found["best_weights"] = self.best_weights
        return found

    def state(self) -> PlateauState:
        return PlateauState.from_vector(self.vector.numpy())

    def observe(self, value: float, step: int, optimizer,
                accuracy: float = float("nan")) -> tuple[str, PlateauState]:
        """Takes the loss and accuracy at `step`; lowers the optimizer's rate
        or keeps the best weights as the rule decides."""
        state = self.state()
        decision, rate = decide(self.schedule, state, value, step,
                                float(optimizer.learning_rate), accuracy)
        if decision == REDUCE:
            optimizer.learning_rate = rate
        if decision == IMPROVED:
            for key, best in self.best_weights.items():
                best.assign(tf.convert_to_tensor(self._weights[key]))
        self.vector.assign(state.to_vector())
        return decision, state

    def restore_best(self, step: int, name: str = "", split: str = "val") -> bool:
        """Puts the kept best weights back into the model the tracker was
        built with, unless they are the current ones; whether it did (said
        in the log for `name`).  Without `restore_best` only the starting
        weights (`keep_start`), where no later evaluation improved on them
        (their evaluation at step 0 the best)."""
        state = self.state()
        wanted = self.schedule.restore_best or (state.best_step == 0 and state.evaluations)
        if not self.best_weights or not wanted or state.best_step == step:
            return False
        for key, best in self.best_weights.items():
            self._weights[key].assign(best)
        if state.best_step:
            logging.info("%s: keeping the weights of step %d (the last improvement on %s)",
                         name, state.best_step, split)
        else:
            logging.warning("%s: no evaluation improved on the starting weights (%s loss "
                            "%.4f): the stage ends with them", name, split, state.best)
        return True

    def verdict(self, name: str, step: int, split: str, decision: str, state: PlateauState,
                rate: float, new_rate: float, at_cap: bool) -> str:
        """How the stage ends after this evaluation ('plateau', 'cap' or '':
        it goes on), said in the log."""
        since = (f"no improvement since step {state.best_step} (lowest {split} loss "
                 f"{state.best:.4f}, highest accuracy {state.best_accuracy:.4f}) for "
                 f"{state.stop_wait} evaluations")
        if decision == REDUCE:
            logging.info("%s: step %d: %s; learning rate %.3g -> %.3g", name, step, since,
                         rate, new_rate)
        if decision == STOP:
            logging.info("%s: step %d: converged: %s, after %d lowering(s) of the rate; "
                         "stopping", name, step, since, state.reductions)
            return "plateau"
        if at_cap:
            logging.warning("%s: reached the cap of %d steps still improving (last at step "
                            "%d; lowest %s loss %.4f, highest accuracy %.4f; %d lowering(s) of "
                            "the rate): the stage has not converged; give it more steps", name,
                            step, state.best_step, split, state.best, state.best_accuracy,
                            state.reductions)
            return "cap"
        return ""

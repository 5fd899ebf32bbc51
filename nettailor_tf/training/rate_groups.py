"""Learning rates: the stage's schedule, and per-variable rates done by the
optimizer (one optimizer per rate group).

A stage trains its variables in groups, as PyTorch's parameter groups: a
group's rate is a multiplier k times the stage's, and either follows the
stage's decay (the schedule's steps, the plateau rule's lowerings) or is held
at k times the stage's initial rate.  Scaling a group's gradient by k (and a
held group's by lr0 / lr) gives that rate only for SGD, whose step is the
rate times the gradient; Adam, RMSprop and the like normalise the gradient,
so a scaled gradient moves them by the same step.  `GroupedOptimizer` gives
each group an optimizer of its own at the group's rate instead.

It is itself a Keras optimizer, so that float16 training wraps it in one
`LossScaleOptimizer`: the loss is scaled once, by one factor, before the
gradients of every group are taken, and a step with a non-finite gradient
anywhere must be skipped by every group; a loss-scale optimizer per group
would keep one scale per group and skip one group's step but not another's.

Its checkpointable state (`variables`) is laid out as a single optimizer's:
its own step counter and base rate, then every group's slots, named by the
weight they belong to.  The groups' own step counters are copies of the
shared one (set before each step), so a checkpoint written by the loop's
earlier single SGD, which scaled gradients, restores into the groups: Keras'
SGD folds the rate into its momentum, so that buffer is the same either way.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import keras
import tensorflow as tf

from nettailor_tf.settings.schedules import Schedule, StagePlan


@dataclasses.dataclass(frozen=True)
class RateGroup:
    """A group's rate: `multiplier` x the stage's rate, or x its initial
    rate for the whole stage when `held`."""
    multiplier: float = 1.0
    held: bool = False


class GroupRate(keras.optimizers.schedules.LearningRateSchedule):
    """`multiplier` x `base()`, read at every step (the stage's rate as it
    decays, or a constant)."""

    def __init__(self, base: Callable[[], object], multiplier: float):
        self.base = base
        self.multiplier = multiplier

    def __call__(self, step):
        del step  # the base reads the shared step counter itself
        return tf.cast(self.base(), tf.float32) * self.multiplier

    def get_config(self) -> dict:
        return {"multiplier": self.multiplier}


class GroupedOptimizer(keras.optimizers.Optimizer):
    """Applies each variable's gradient with its rate group's optimizer.

    Args:
        learning_rate: the stage's rate (a Keras schedule, or a float that
            the plateau rule lowers by assigning `learning_rate`); the
            base group's rate, and what `learning_rate` reads.
        initial_rate: the stage's rate at step 0 (what held groups keep).
        make_optimizer: learning rate -> a new Keras optimizer (e.g. SGD
            with momentum); called once per distinct group.
        rates: one `RateGroup` per variable `build` receives, in its order.
    """

    def __init__(self, learning_rate, initial_rate: float,
                 make_optimizer: Callable[[object], keras.optimizers.Optimizer],
                 rates: list[RateGroup], name: str = "grouped"):
        super().__init__(learning_rate, name=name)
        self.rates = list(rates)
        self.groups = list(dict.fromkeys(self.rates))  # distinct, in first-seen order
        self.group_optimizers = [
            make_optimizer(GroupRate((lambda r=initial_rate: r) if group.held
                                     else (lambda: self.learning_rate), group.multiplier))
            for group in self.groups]
        self._group_of = {}

    def build(self, variables):
        if self.built:
            return
        variables = list(variables)
        if len(variables) != len(self.rates):
            raise ValueError(f"{len(variables)} variables for {len(self.rates)} rate groups: "
                             f"give one RateGroup per variable")
        super().build(variables)
        self._group_of = {self._var_key(v): self.groups.index(rate)
                          for v, rate in zip(variables, self.rates)}
        for index, optimizer in enumerate(self.group_optimizers):
            optimizer.build([v for v, rate in zip(variables, self.rates)
                             if self.groups.index(rate) == index])

    @property
    def variables(self):
        """The state a checkpoint keeps: the shared step counter and base
        rate, and every group's slots (not the groups' step counters,
        which copy the shared one)."""
        found = list(self._variables)
        for optimizer in self.group_optimizers:
            found += [v for v in optimizer.variables if v is not optimizer.iterations]
        return found

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
        parts = [([], []) for _ in self.group_optimizers]
        for grad, variable in zip(grads, trainable_variables):
            group_grads, group_variables = parts[self._group_of[self._var_key(variable)]]
            group_grads.append(grad)
            group_variables.append(variable)
        for optimizer, (group_grads, group_variables) in zip(self.group_optimizers, parts):
            if group_variables:
                # Adam's bias correction counts the group's steps: they are
                # the stage's (restored with it).
                optimizer.iterations.assign(self.iterations)
                optimizer.apply(group_grads, group_variables)
        self.iterations.assign_add(1)

    def get_config(self) -> dict:
        config = super().get_config()
        config["rates"] = [dataclasses.asdict(rate) for rate in self.rates]
        return config


def learning_rate_schedule(stage: StagePlan, schedule: Schedule):
    """Keras' piecewise-constant schedule of a resolved stage; with the
    plateau rule the initial rate, which the optimizer keeps in a variable
    that the loop lowers (and the checkpoint restores)."""
    if schedule.plateau:
        return schedule.learning_rate
    values = [schedule.learning_rate * 0.1 ** k for k in range(len(stage.decay_steps) + 1)]
    if stage.decay_steps:
        # Keras switches to the next value after a boundary; the stage's
        # decay step is the first step with the lower rate.
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [s - 1 for s in stage.decay_steps], values)
    # The class needs a boundary: one past the end changes nothing.
    return keras.optimizers.schedules.PiecewiseConstantDecay([stage.total_steps + 1], values * 2)

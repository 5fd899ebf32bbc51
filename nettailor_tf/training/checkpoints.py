"""Training checkpoints that are safe to resume from.

A checkpoint is only worth resuming from if the network in it was healthy.
The loop hands every step's loss to `TrainingCheckpoints.observe`, which
keeps the mean of the last `WINDOW` losses and the best such mean of the
stage (kept in ``health.json`` beside the checkpoints, so it survives a
restart):

* a save is made only while that mean is finite and at most `SAVE_FACTOR`
  times the best: a loss on its way up is not frozen into a checkpoint.  The
  one exception is a stage's last step, which always saves (its network is
  the stage's result, judged by accuracy; a divergence raises before it);
* a non-finite loss, or a mean above `DIVERGED_FACTOR` times the best, is a
  divergence: the checkpoints saved after the last healthy one are dropped
  and `TrainingError` names the checkpoint a rerun (say with a lower learning
  rate) will resume from.

The optimizer's slots (momentum, the loss scale) are stored under the name
of the model weight they belong to, never by their position in the
optimizer's list: two weights of one shape swapped in order would otherwise
load each other's momentum without a word.  The loop's optimizer of rate
groups (`rate_groups`) lays its state out under the same names as one
optimizer's, so a checkpoint of the loop's earlier single SGD (which scaled
gradients for per-variable rates) restores into its groups exactly.

Restoring tries the newest checkpoint first and falls back to the one before
when a file is damaged (a full disk, a copy cut short), with a warning.  A
readable checkpoint that does not match the model (other weights or shapes:
another architecture or plan) is a `TrainingError` naming the checkpoint and
the first difference, never a fall-back.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re

import tensorflow as tf
from absl import logging

from nettailor_tf.common import atomic
from nettailor_tf.common.errors import TrainingError

WINDOW = 20          # steps in the mean loss that is judged
MIN_STEPS = 5        # a mean of fewer steps is too noisy to judge
SAVE_FACTOR = 3.0    # a save needs mean <= SAVE_FACTOR x best
DIVERGED_FACTOR = 10.0  # mean > DIVERGED_FACTOR x best stops the run
HEALTH_FILE = "health.json"
KEEP = 2             # checkpoints kept
# How tf.train.Checkpoint names a dict entry's value in the file.
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_CHECKPOINT_NAME = "weights/{}" + _VALUE_SUFFIX


def _escaped(key: str) -> str:
    """A dict key as the checkpoint's object graph spells it (TensorFlow's
    `escape_local_name`: "." doubled, "/" as ".S")."""
    return key.replace(".", "..").replace("/", ".S")


def _unescaped(name: str) -> str:
    return re.sub(r"\.([.S])", lambda m: "." if m.group(1) == "." else "/", name)


def weights_by_path(model) -> dict:
    """Every weight of `model` keyed by its Keras path.

    TensorFlow's object-graph tracking does not see layers that a subclassed
    Keras 3 model holds in lists, so a checkpoint of `model` itself would
    silently miss them (and restore nothing there); paths name them all.
    Layers built on their own (BN-folded copies) can share a path: those get
    a numbered suffix in `model.weights` order, which a rebuilt model repeats.
    """
    return _unique_keys((variable.path.replace("/", "."), variable)
                        for variable in model.weights)


def optimizer_state_by_name(optimizer) -> dict:
    """Every variable of a Keras 3 optimizer keyed by its name, which for a
    slot holds the path of the weight it belongs to (``<path>_momentum``).

    The optimizer's own prefix (``sgd``, ``sgd_1``, ...) depends on how many
    optimizers the process made, so it is replaced by ``outer``/``inner`` (the
    loss-scale optimizer wraps an inner one)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    inner_ids = {id(v) for v in inner.variables} if inner is not None else set()
    return _unique_keys((f"{'inner' if id(v) in inner_ids else 'outer'}.{v.name}", v)
                        for v in optimizer.variables)


def _unique_keys(pairs) -> dict:
    found, seen = {}, {}
    for key, variable in pairs:
        seen[key] = seen.get(key, 0) + 1
        found[key if seen[key] == 1 else f"{key}.{seen[key]}"] = variable
    return found


class LossHealth:
    """The mean of the last `WINDOW` losses against the best such mean."""

    def __init__(self, best: float = math.inf):
        self.best = best
        self.recent = collections.deque(maxlen=WINDOW)
        self.non_finite = None

    def add(self, loss: float) -> None:
        if not math.isfinite(loss):
            self.non_finite = loss
            return
        self.recent.append(loss)
        if len(self.recent) >= MIN_STEPS:
            self.best = min(self.best, self.mean)

    @property
    def mean(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else math.nan

    def ratio(self) -> float:
        """The recent mean over the best; 1 while there is nothing to judge."""
        if len(self.recent) < MIN_STEPS or not math.isfinite(self.best) or self.best <= 0:
            return 1.0
        return self.mean / self.best

    def diverged(self) -> bool:
        return self.non_finite is not None or self.ratio() > DIVERGED_FACTOR

    def healthy(self) -> bool:
        return self.non_finite is None and self.ratio() <= SAVE_FACTOR


class TrainingCheckpoints:
    """The checkpoints of one training stage, in `directory`.

    Args:
        directory: where the checkpoint files and ``health.json`` live.
        model: the Keras model whose weights are saved.
        optimizer: the built Keras optimizer.
        step: the loop's step counter (a tf.Variable).
        label: names the run in messages (the task).
        extra: more trackables to keep, by name (the plateau rule's state).
    """

    def __init__(self, directory: str, model, optimizer, step, label: str,
                 extra: dict | None = None):
        self.directory = directory
        self.label = label
        self.weights = weights_by_path(model)
        self.checkpoint = tf.train.Checkpoint(weights=self.weights,
                                              optimizer=optimizer_state_by_name(optimizer),
                                              step=step, **(extra or {}))
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=KEEP)
        self.losses = {}  # checkpoint path -> the mean loss when it was saved
        self.health = LossHealth()
        self._read_health()
        self._held_back_warned = False

    # --- health.json -----------------------------------------------------------

    def _health_path(self) -> str:
        return os.path.join(self.directory, HEALTH_FILE)

    def _read_health(self) -> None:
        try:
            with open(self._health_path(), encoding="utf-8") as f:
                stored = json.load(f)
            self.health.best = math.inf if stored["best"] is None else float(stored["best"])
            self.losses = {os.path.join(self.directory, name): float(loss)
                           for name, loss in stored["checkpoints"].items()}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError):
            logging.warning("%s: %s cannot be read; the loss history starts afresh",
                            self.label, self._health_path())

    def _write_health(self) -> None:
        kept = set(self.manager.checkpoints)
        atomic.write_text(self._health_path(), json.dumps({
            "best": self.health.best if math.isfinite(self.health.best) else None,
            "checkpoints": {os.path.basename(path): loss for path, loss in self.losses.items()
                            if path in kept}}, indent=1))

    # --- restore, save, roll back ------------------------------------------------

    def restore(self) -> str | None:
        """Restores the newest readable checkpoint; None when there is none.

        A damaged file (cut short, unreadable) falls back to the one before,
        with a warning.  A readable checkpoint whose weights do not match the
        model (another architecture or plan in the same folder) is an error
        naming both: an older checkpoint of the same folder would not match
        either, and quietly starting over would throw away its training."""
        for path in reversed(self.manager.checkpoints):
            try:  # the index: names and shapes, no tensor data
                stored = tf.train.load_checkpoint(path).get_variable_to_shape_map()
            except Exception as error:  # a damaged file raises many types (IndexError, ...)
                self._warn_damaged(path, error)
                continue
            self._check_matches(path, stored)
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except AssertionError as error:  # a trackable the model has that the file lacks
                raise self._mismatch(path, str(error).strip().splitlines()[0]) from None
            except Exception as error:  # the tensor data is damaged
                self._warn_damaged(path, error)
                continue
            return path
        if self.manager.checkpoints:
            raise TrainingError(f"{self.label}: no checkpoint in {self.directory} can be read; "
                                f"delete that folder to start the stage over",
                                path=self.directory)
        return None

    def _warn_damaged(self, path: str, error: Exception) -> None:
        logging.warning("%s: checkpoint %s cannot be read (%s); trying the one before",
                        self.label, path, type(error).__name__)

    def _check_matches(self, path: str, stored: dict) -> None:
        """Raises unless the checkpoint holds exactly the model's weights, by
        path and shape."""
        wanted = {_CHECKPOINT_NAME.format(_escaped(key)): (key, variable.shape.as_list())
                  for key, variable in self.weights.items()}
        held = {name: shape for name, shape in stored.items()
                if name.startswith("weights/") and name.endswith(_VALUE_SUFFIX)}
        for name, (key, shape) in wanted.items():
            if name not in held:
                raise self._mismatch(path, f"it lacks the model's weight {key!r} "
                                           f"({len(set(wanted) - set(held))} missing in all)")
            if list(held[name]) != shape:
                raise self._mismatch(path, f"weight {key!r} is {tuple(held[name])} in it and "
                                           f"{tuple(shape)} in the model")
        extra = sorted(set(held) - set(wanted))
        if extra:
            first = _unescaped(extra[0][len("weights/"):-len(_VALUE_SUFFIX)])
            raise self._mismatch(path, f"it holds {len(extra)} weight(s) the model lacks, "
                                       f"e.g. {first!r}")

    def _mismatch(self, path: str, what: str) -> TrainingError:
        return TrainingError(f"{self.label}: checkpoint {path} does not match the model: {what}; "
                             f"rerun with the settings it was made with, or delete "
                             f"{self.directory} to train this stage over", path=path)

    def observe(self, loss: float, step: int) -> None:
        """Takes one step's loss; on a divergence rolls back and raises."""
        self.health.add(loss)
        if self.health.diverged():
            self._roll_back(step)

    def save(self, step: int, final: bool = False) -> bool:
        """Saves at `step` if the recent loss is healthy (the last step of a
        stage always saves: its network is the result, judged by accuracy)."""
        if not final and not self.health.healthy():
            if not self._held_back_warned:
                logging.warning("%s: the loss (%.4g over the last %d steps) is %.1f times its "
                                "best; no checkpoint is saved until it comes back down",
                                self.label, self.health.mean, len(self.health.recent),
                                self.health.ratio())
                self._held_back_warned = True
            return False
        self._held_back_warned = False
        path = self.manager.save(checkpoint_number=step)
        self.losses[path] = self.health.mean
        self._write_health()
        return True

    def _roll_back(self, step: int) -> None:
        """Drops every checkpoint after the last healthy one and raises."""
        limit = SAVE_FACTOR * self.health.best
        saved = list(self.manager.checkpoints)
        healthy = [path for path in saved if self.losses.get(path, math.inf) <= limit]
        kept = saved[:saved.index(healthy[-1]) + 1] if healthy else []
        dropped = saved[len(kept):]
        if dropped:
            self._drop(dropped, kept)
        if self.health.non_finite is not None:
            what = f"the loss became {self.health.non_finite}"
        else:
            what = (f"the loss diverged to {self.health.mean:.4g} (mean of the last "
                    f"{len(self.health.recent)} steps; best {self.health.best:.4g})")
        if kept:
            where = (f"rolled back to the last healthy checkpoint, {os.path.basename(kept[-1])} "
                     f"in {self.directory}")
        else:
            where = f"no healthy checkpoint in {self.directory}; the stage starts over"
        if dropped:
            where += f" ({len(dropped)} later one(s) dropped)"
        advice = "Rerun with a lower learning rate" + (" to go on from there" if kept else "")
        raise TrainingError(f"{self.label}: {what} at step {step}; {where}. {advice}",
                            path=self.directory)

    def _drop(self, dropped: list[str], kept: list[str]) -> None:
        for path in dropped:
            for name in tf.io.gfile.glob(path + ".*"):
                tf.io.gfile.remove(name)
        if kept:
            tf.compat.v1.train.update_checkpoint_state(
                self.directory, kept[-1], all_model_checkpoint_paths=kept)
        else:  # nothing healthy: the stage starts over
            for name in ("checkpoint", HEALTH_FILE):
                if tf.io.gfile.exists(os.path.join(self.directory, name)):
                    tf.io.gfile.remove(os.path.join(self.directory, name))
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory,
                                                  max_to_keep=KEEP)
        if kept:
            self._write_health()

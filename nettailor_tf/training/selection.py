"""The evidence prune decisions rest on: every image's answer, and paired
comparisons of two networks on the same images with a confidence bound.

Two networks scored on the same images differ only where they disagree, so
the difference of their accuracies has a far smaller spread than either
accuracy: what counts is how many images only one of them gets right
(McNemar's view of a paired comparison).  A point comparison of two
accuracies on the quickstart's 145 digits validation images moves by one
image (0.69 points) with the CPU's rounding; a paired comparison says how
much of a difference the images can vouch for.
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np
import tensorflow as tf

from nettailor_tf import data as data_lib


def answer_function(predict_fn):
    """`predict_fn` (images -> logits) compiled once to images -> class:
    one trace serves every batch shape and every later call."""
    return tf.function(lambda images: tf.argmax(predict_fn(images), -1, output_type=tf.int32),
                       reduce_retracing=True)


def answers(answer_fn, task, image_size: int, batch_size: int, splits) -> tuple:
    """(predicted class, true label) of every image of `splits`, in the
    splits' stored order (`answer_fn` from `answer_function`)."""
    predicted, labels = [], []
    for split in splits:
        for images, batch_labels in data_lib.eval_pipeline(task, image_size, batch_size, split):
            predicted.append(answer_fn(images).numpy())
            labels.append(batch_labels.numpy())
    if not predicted:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(predicted), np.concatenate(labels)


def z_score(confidence: float) -> float:
    """The one-sided normal quantile of `confidence` (0.9 -> 1.28)."""
    return statistics.NormalDist().inv_cdf(confidence)


@dataclasses.dataclass(frozen=True)
class Paired:
    """Accuracy of A minus accuracy of B on the same `n` images."""
    n: int
    a_only: int      # images A gets right and B wrong
    b_only: int      # images B gets right and A wrong
    accuracy_b: float

    @property
    def difference(self) -> float:
        return (self.a_only - self.b_only) / max(self.n, 1)

    @property
    def standard_error(self) -> float:
        """Of `difference`: the discordant images' spread (paired proportions)."""
        if not self.n:
            return math.inf
        discordant = (self.a_only + self.b_only) / self.n
        return math.sqrt(max(discordant - self.difference ** 2, 0.0) / self.n)

    def lower(self, confidence: float) -> float:
        return self.difference - z_score(confidence) * self.standard_error

    def upper(self, confidence: float) -> float:
        return self.difference + z_score(confidence) * self.standard_error

    def as_dict(self, confidence: float) -> dict:
        return {"images": self.n, "difference": round(self.difference, 6),
                "standard_error": round(self.standard_error, 6),
                "lower": round(self.lower(confidence), 6),
                "upper": round(self.upper(confidence), 6),
                "a_only": self.a_only, "b_only": self.b_only}


def paired(correct_a: np.ndarray, correct_b: np.ndarray) -> Paired:
    """Compares two networks' per-image correctness (booleans, same images)."""
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"paired comparison of {correct_a.shape} and {correct_b.shape} answers")
    return Paired(int(correct_a.size), int(np.sum(correct_a & ~correct_b)),
                  int(np.sum(correct_b & ~correct_a)),
                  float(np.mean(correct_b)) if correct_b.size else math.nan)

"""The soft-attention gate of a NetTailor block (the paper)."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from nettailor_tf.model.layers import PACKAGE

UNIVERSAL_LOGIT = 2.0  # alpha_universal about 0.95 with 3 proxies at the start
PROXY_LOGIT = -2.0


@keras.saving.register_keras_serializable(package=PACKAGE)
class Gate(keras.layers.Layer):
    """One logit per branch; `alphas()` is the softmax over the kept branches,
    times the gate's `mass`.

    The keep-mask is a non-trainable variable rather than a Python constant so
    that pruning a branch changes a value, not the graph: a traced step keeps
    working (no retrace) and the mask is checkpointed with the logits.

    `mass` (1 in a student, where it is not trained) is the share of the
    student's gate that a pruned block's surviving branches held.  Keeping
    it means pruning only drops the removed branches' terms from the block's
    sum; a softmax renormalised to 1 over the survivors would also scale
    every surviving branch up, by 1 / mass, which on the quickstart's digits
    cost 4 points of validation accuracy before any fine-tuning even where no
    universal block was removed (95.2% against 99.3%).  The fine-tune of a
    pruned network trains it, so a block whose survivors held little (its
    dominant branch cut by a fixed --prune_universal) can grow back.

    Args:
        num_branches: number of branches the gate mixes.
        initial_logits: starting logits (default: +2 for the first branch,
            the universal block, and -2 for every proxy).

    Example:
        gate = Gate(4); gate.build(); gate.alphas()  # [0.95, 0.017, 0.017, 0.017]
    """

    def __init__(self, num_branches: int, initial_logits=None, **kwargs):
        # Always float32, also under a mixed-precision policy: a float16
        # softmax rounds small gates to 0 and -inf masking needs one dtype.
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        if initial_logits is None:
            initial_logits = [UNIVERSAL_LOGIT] + [PROXY_LOGIT] * (num_branches - 1)
        if len(initial_logits) != num_branches:
            raise ValueError(f"initial_logits has {len(initial_logits)} values for "
                             f"{num_branches} branches")
        self.num_branches = num_branches
        self.initial_logits = [float(v) for v in initial_logits]

    def build(self, input_shape=None):
        self.logits = self.add_weight(
            shape=(self.num_branches,), name="logits", trainable=True, autocast=False,
            initializer=keras.initializers.Constant(self.initial_logits))
        self.keep = self.add_weight(shape=(self.num_branches,), name="keep", trainable=False,
                                    initializer="ones", autocast=False)
        # Trainable so that a pruned network's fine-tune may rescale a block
        # whose survivors held little; the student stage never trains it.
        self.mass = self.add_weight(shape=(), name="mass", trainable=True, initializer="ones",
                                    autocast=False)


    def alphas(self):
        """Softmax over kept branches; pruned branches get exactly 0."""
        logits = tf.convert_to_tensor(self.logits)
        kept = tf.convert_to_tensor(self.keep) > 0.5
        masked = tf.where(kept, logits, tf.fill(tf.shape(logits), float("-inf")))
        return tf.where(kept, tf.nn.softmax(masked) * tf.convert_to_tensor(self.mass),
                        tf.zeros_like(logits))

    def call(self, inputs=None):
        return self.alphas()

    def get_config(self):
        return {**super().get_config(), "num_branches": self.num_branches,
                "initial_logits": self.initial_logits}


def sharpness(alphas) -> dict:
    """How decisive trained gates are: each block's gate entropy divided by
    the entropy of a uniform gate over its branches (0: one branch takes
    everything, 1: all equal).  Blocks with one branch are left out.

    A student whose gates stayed diffuse has not decided what to keep: the
    pruning step then cuts paths that still carry signal.
    """
    per_block = []
    for a in alphas:
        a = np.asarray(a, np.float64)
        a = a[a > 0]
        if len(a) < 2:
            per_block.append(None)
            continue
        per_block.append(float(-(a * np.log(a)).sum() / np.log(len(a))))
    values = [v for v in per_block if v is not None]
    return {"mean_normalized_entropy": float(np.mean(values)) if values else 0.0,
            "normalized_entropy": [None if v is None else round(v, 4) for v in per_block]}

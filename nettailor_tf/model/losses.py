"""NetTailor's training objective: CE + complexity_coeff * C + teacher_coeff * T (the paper)."""
from __future__ import annotations

import tensorflow as tf


def cross_entropy(logits, labels):
    """Mean cross-entropy over the (local) batch, computed in float32."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels, tf.cast(logits, tf.float32)))


def mse(a, b):
    return tf.reduce_mean(tf.square(tf.cast(a, tf.float32) - tf.cast(b, tf.float32)))


def mimic_loss(logits, block_outputs, teacher_logits, teacher_endpoints, live_blocks,
               num_blocks: int, normalized: bool = False):
    """T = [MSE(logits) + sum over live blocks l of MSE(h_l^s, h_l^t)] / L.

    `block_outputs[k]` is the mimic node of block `live_blocks[k]` (its output,
    whose gradient trains only that block's weights); `teacher_endpoints[l]`
    is the teacher's node l+1.
    L is `num_blocks`, the blocks compared (a pruned network's live ones, so
    that pruning keeps the balance between mimic and CE); the logits term is
    not counted.
    `normalized` divides each term by the teacher's mean square (a relative
    error): scale-free where block outputs are large linear bottlenecks.
    """
    def term(student, teacher):
        error = mse(student, teacher)
        if normalized:
            error /= tf.stop_gradient(tf.reduce_mean(tf.square(tf.cast(teacher, tf.float32))))
        return error

    total = term(logits, teacher_logits)
    for output, l in zip(block_outputs, live_blocks):
        total += term(output, teacher_endpoints[l])
    return total / num_blocks

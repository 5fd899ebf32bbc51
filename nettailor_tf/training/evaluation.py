"""Top-1 accuracy (and mean cross-entropy) of a network on one split of a task."""
from __future__ import annotations

import tensorflow as tf

from nettailor_tf import data as data_lib


def make_evaluator(strategy, predict_fn):
    """(task, image_size, batch_size, split, with_loss=False) -> top-1 accuracy
    of `predict_fn` (images -> logits), or (accuracy, mean cross-entropy) with
    `with_loss`, with one compiled step reused across calls."""
    def replica_eval(images, labels):
        logits = tf.cast(predict_fn(images), tf.float32)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                          tf.float32)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return (tf.reduce_sum(correct), tf.reduce_sum(losses),
                tf.cast(tf.size(labels), tf.float32))

    # The last batch is smaller: let one trace serve both shapes.
    @tf.function(reduce_retracing=True)
    def eval_step(batch):
        sums = strategy.run(replica_eval, args=batch)
        return tuple(strategy.reduce("SUM", v, axis=None) for v in sums)

    def evaluate(task: data_lib.TaskData, image_size: int, batch_size: int,
                 split: str = "test", with_loss: bool = False):
        correct = loss = total = 0.0
        dataset = strategy.experimental_distribute_dataset(
            data_lib.eval_pipeline(task, image_size, batch_size, split))
        for batch in dataset:
            c, l, n = eval_step(batch)
            correct, loss, total = correct + float(c), loss + float(l), total + float(n)
        accuracy = correct / max(total, 1.0)
        return (accuracy, loss / max(total, 1.0)) if with_loss else accuracy

    return evaluate

"""Which signal predicts a pruned network's accuracy after fine-tuning?

    python benchmarks/prune_signals.py --flagfile=flags/quickstart.cfg \\
        --workdir=runs/seeds/seed1 --candidates=0,6,7,8,9,10,11,12 --out=signals.json

For a workdir whose teacher and student stages are done, and for each
candidate N (the N universal blocks with the weakest gates cut, proxies under
--prune_proxy_threshold cut), it measures what the prune search could decide
on before fine-tuning, then fine-tunes the candidate with the finetune stage's
own schedule and measures what it ends at:

  zero-shot (as pruning leaves it, BN statistics re-estimated):
    val_accuracy              on the validation split (the old search's signal)
    pool_accuracy             on the training split (eval transform) + validation
    pool_damage               paired: the unpruned student minus the candidate, pool
    pool_teacher_correctness_agreement  share of pool images it gets right or wrong
                              as the teacher does
  fine-tuned:
    val_accuracy, test_accuracy, and the paired difference to the teacher on
    validation and on test.

One JSON object per task and candidate goes to --out (a JSON list).  The
candidates' fine-tunes are written under <workdir>/signals/, not where the
prune stage keeps its own.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nettailor_tf  # noqa: E402,F401  (before TensorFlow: it chooses the CPU kernels)

from absl import app, flags  # noqa: E402

import renderers  # noqa: E402
from nettailor_tf.settings import config as config_lib  # noqa: E402

config_lib.define_flags(flags.FLAGS)
flags.DEFINE_list("candidates", ["0", "6", "7", "8", "9", "10", "11", "12"],
                  "Numbers of universal blocks to cut.")
flags.DEFINE_string("out", None, "Where the JSON list goes.")
flags.DEFINE_string("render", None, "Render this results file (a JSON object whose 'rows' are "
                    "what --out wrote, with a 'seed' each) as markdown to --markdown instead of "
                    "measuring.")
flags.DEFINE_string("markdown", "docs/prune_signals.md", "Where --render writes.")
FLAGS = flags.FLAGS


def render_markdown(results: dict) -> str:
    """The study as a table, one row per task, seed and candidate (the renderer
    `benchmarks/render_docs.py` uses for docs/prune_signals.md)."""
    return renderers.prune_signals_page(results)


def _measure_task(config, strategy, task, candidates):
    import keras
    import numpy as np

    from nettailor_tf.model import complexity, pruning
    from nettailor_tf.run import artifacts
    from nettailor_tf.stages.nettailor import nettailor_trainer, prepared_pruned, teacher_targets
    from nettailor_tf.stages.prune_search import ZeroShotScorer
    from nettailor_tf.training import selection

    size, batch = config.image_size, config.eval_batch_size
    student, backbone = artifacts.trained_student(config, task)
    alphas = [a.numpy() for a in student.alphas()]
    teacher = artifacts.frozen_teacher(config, task)
    teacher_answer = selection.answer_function(lambda x: teacher(x, training=False)[0])
    teacher_pool, labels_pool = selection.answers(teacher_answer, task, size, batch,
                                                  ("train", "val"))
    teacher_eval, labels_eval = selection.answers(teacher_answer, task, size, batch,
                                                  ("val", "test"))
    num_val = task.num_val
    teacher_flops = complexity.classifier_flops(backbone, size, task.num_classes)
    rows = []
    targets = teacher_targets(config, strategy, task, teacher)
    with ZeroShotScorer(config, task, student, ("train", "val")) as scorer:
        reference = scorer(None)
        for n in candidates:
            plan = pruning.prune_plan(student.plan, alphas, n, config.prune_proxy_threshold,
                                      config.prune_universal_threshold)
            correct = scorer(plan)
            damage = selection.paired(reference, correct)
            cost = complexity.pruned_cost(backbone, plan, size, task.num_classes, student)
            agreement = float(np.mean(correct == (teacher_pool == labels_pool)))
            rows.append({"task": task.name, "n": n, "flops_fraction": cost["flops"] / teacher_flops,
                         "zero_shot": {
                             "val_accuracy": float(np.mean(correct[-num_val:])),
                             "pool_accuracy": float(np.mean(correct)),
                             "pool_damage": damage.as_dict(0.9),
                             "pool_teacher_correctness_agreement": agreement},
                         "plan": plan})
    for row in rows:
        keras.utils.set_random_seed(config.seed)
        candidate, _ = prepared_pruned(config, strategy, task, student, row.pop("plan"), [])
        trainer = nettailor_trainer(config, strategy, task, candidate, teacher, config.finetune,
                                    0.0, f"signals/n{row['n']}", targets, pruned=True)
        result = trainer.fit(task, size, config.seed, batch)
        predicted, _ = selection.answers(
            selection.answer_function(lambda x: candidate(x, training=False, mimic=False)[0]),
            task, size, batch, ("val", "test"))
        correct, teacher_correct = predicted == labels_eval, teacher_eval == labels_eval
        row["fine_tuned"] = {
            "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
            "val_vs_teacher": selection.paired(correct[:num_val],
                                               teacher_correct[:num_val]).as_dict(0.9),
            "test_vs_teacher": selection.paired(correct[num_val:],
                                                teacher_correct[num_val:]).as_dict(0.9)}
        row["teacher"] = {"val_accuracy": float(np.mean(teacher_correct[:num_val])),
                          "test_accuracy": float(np.mean(teacher_correct[num_val:]))}
        print(json.dumps(row), flush=True)
    return rows


def main(argv):
    del argv
    if FLAGS.render:
        with open(FLAGS.render, encoding="utf-8") as f:
            text = render_markdown(json.load(f))
        with open(FLAGS.markdown, "w", encoding="utf-8") as f:
            f.write(text)
        return
    from nettailor_tf import data as data_lib
    from nettailor_tf.common import quiet
    from nettailor_tf.training import distribution

    quiet.quiet_python_loggers()
    config = config_lib.from_flags(FLAGS)
    strategy = distribution.make_strategy("default")
    rows = []
    for spec in config.tasks:
        task = data_lib.with_validation_split(
            data_lib.load_task(spec, config.data_dir, config.download),
            config.validation_fraction, config.seed)
        rows += _measure_task(config, strategy, task, [int(n) for n in FLAGS.candidates])
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)

"""The evaluation suite: tasks and seeds never used to choose a default, one table.

    python benchmarks/eval_suite.py [--seeds=20,21,22] [--tasks=cluttered,textures,faces] \\
        [--flagfile=flags/quickstart.cfg] [--workdir=runs/eval_suite] \\
        [--json=docs/results/eval_suite.json] [--markdown=docs/eval_suite.md]
    python benchmarks/eval_suite.py --render=docs/results/eval_suite.json --markdown=docs/eval_suite.md

The defaults were chosen on the quickstart tasks (mnist5k, digits) with seeds
0 and 1, and reported there with seeds 10-14.  This runs the suite's tasks
(benchmarks/make_eval_suite.py, written to <workdir>/data unless there) with
other seeds: per seed, the command line a user would type
(`python -m nettailor_tf.main --flagfile=... --seed=S
--stages=teacher,student,prune,finetune --workdir=<workdir>/seed<S>
--tasks=folder:<data>/<task>,...`, benchmarks/seeds.py's runner).  A finished
stage is read, not rerun; a stage whose flags changed is redone by the
command line's stage ledger, so after a change of defaults the same command
redoes only what the change touches.

It writes the measurements (per task: teacher, student and pruned test
accuracy and the pruned network's multiply-adds as a fraction of the
teacher's, each as mean, sample standard deviation and per-seed values; the
per-seed pruned-minus-teacher gap; machine, date and command) as JSON, and
the markdown page rendered from it by `render`.  --render=JSON re-renders the
page from committed results without running anything.

--stages=teacher,student runs only those stages (they do not depend on the
pruning flags) and writes nothing.
"""
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import make_eval_suite  # noqa: E402
import renderers  # noqa: E402
import suite_records  # noqa: E402
import seeds  # noqa: E402  (its flags --seeds, --tasks, --workdir, --markdown, --extra are ours)

ROOT = seeds.ROOT
DEFAULT_SEEDS = ["20", "21", "22"]
# Seeds the defaults were chosen with (0, 1) or reported with (10-14): not here.
TUNING_SEEDS = frozenset({0, 1, *range(10, 15)})
DEVELOPMENT_TASKS = ("mnist5k", "digits")
COLUMNS = ("teacher", "student", "pruned", "pruned_flops_fraction")

flags.DEFINE_string("data", None, "The suite's folders (default: <workdir>/data, written "
                                  "there by make_eval_suite if missing).")
flags.DEFINE_string("stages", seeds.STAGES, "Stages to run (teacher,student alone writes "
                                            "nothing).")
flags.DEFINE_string("json", "docs/results/eval_suite.json", "Where the measurements go.")
flags.DEFINE_string("render", None, "Only render this JSON into --markdown.")
flags.DEFINE_bool("allow_tuning_seeds", False, "Accept seeds 0, 1 and 10-14 (used to "
                                               "choose or report the defaults).")
FLAGS = flags.FLAGS
FLAGS.set_default("seeds", DEFAULT_SEEDS)
FLAGS.set_default("workdir", "runs/eval_suite")
FLAGS.set_default("markdown", "docs/eval_suite.md")
FLAGS.set_default("flagfile_for_runs", os.path.join(ROOT, "flags", "quickstart.cfg"))


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _stat(values: list) -> dict:
    known = [v for v in values if v is not None]
    return {"mean": statistics.fmean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else 0.0 if known else None,
            "values": values}


def results(reports: dict, minutes: dict, command: str) -> dict:
    """The suite's JSON from {seed: report.json contents} and `minutes`
    {seed: {stages asked for: minutes}}."""
    summary = seeds.summarize(reports)
    tasks = {}
    for task, row in summary.items():
        classes, train, test = make_eval_suite.LAYOUT[task]
        tasks[task] = {"classes": len(classes), "train_images": len(classes) * train,
                       "test_images": len(classes) * test,
                       "description": make_eval_suite.DESCRIPTIONS[task],
                       **{column: _stat(row[column]["values"]) for column in COLUMNS},
                       "pruned_before_finetune": _stat(row["pruned_before_finetune"]["values"]),
                       "pruned_minus_teacher": row["pruned_minus_teacher"]}
    return {"seeds": sorted(reports), "development_tasks": list(DEVELOPMENT_TASKS),
            "tuning_seeds": sorted(TUNING_SEEDS), "tasks": tasks,
            "machine": suite_records.machine(),
            "date": datetime.date.today().isoformat(), "code": _code_version(),
            "command": command,
            "minutes_per_seed": {str(s): m for s, m in sorted(minutes.items())}}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}")
    if FLAGS.render:
        with open(FLAGS.render, encoding="utf-8") as f:
            suite_records.write(FLAGS.markdown, renderers.eval_suite_page(json.load(f)))
        print(f"eval_suite.py: {FLAGS.markdown} rendered from {FLAGS.render}", file=sys.stderr)
        return
    try:
        seed_list = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: integers, e.g. 20,21,22") from None
    if not seed_list or min(seed_list) < 0 or len(set(seed_list)) != len(seed_list):
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: distinct integers >= 0")
    used = sorted(set(seed_list) & TUNING_SEEDS)
    if used and not FLAGS.allow_tuning_seeds:
        raise app.UsageError(f"--seeds: {used} chose or reported the defaults; pick others "
                             "(or --allow_tuning_seeds)")
    task_names = FLAGS.tasks or list(make_eval_suite.LAYOUT)
    unknown = sorted(set(task_names) - set(make_eval_suite.LAYOUT))
    if unknown:
        raise app.UsageError(f"--tasks: unknown {unknown}; the suite has "
                             f"{','.join(make_eval_suite.LAYOUT)}")
    workdir = os.path.abspath(FLAGS.workdir)
    data_dir = os.path.abspath(FLAGS.data or os.path.join(workdir, "data"))
    if not all(os.path.isdir(os.path.join(data_dir, t)) for t in make_eval_suite.LAYOUT):
        counts = make_eval_suite.write_suite(data_dir)
        print(f"eval_suite.py: wrote the suite to {data_dir} ({counts})", file=sys.stderr)
    specs = [f"folder:{os.path.join(data_dir, t)}" for t in task_names]
    reports, minutes = {}, {}
    for seed in seed_list:
        seed_dir = os.path.join(workdir, f"seed{seed}")
        tic, before = time.perf_counter(), suite_records.ledger_time(seed_dir)
        seeds._run_seed(FLAGS.flagfile_for_runs, seed, seed_dir, specs, FLAGS.extra,
                        stages=FLAGS.stages)
        minutes[seed] = suite_records.record_minutes(
            seed_dir, FLAGS.stages, (time.perf_counter() - tic) / 60,
            ran=suite_records.ledger_time(seed_dir) != before)
        with open(os.path.join(seed_dir, "report.json"), encoding="utf-8") as f:
            reports[seed] = json.load(f)
    if set(FLAGS.stages.split(",")) != set(seeds.STAGES.split(",")):
        print(f"eval_suite.py: --stages={FLAGS.stages}: nothing written", file=sys.stderr)
        return
    flagfile = os.path.relpath(FLAGS.flagfile_for_runs, ROOT)
    command = " ".join(["python benchmarks/eval_suite.py", f"--flagfile={flagfile}",
                        f"--seeds={','.join(str(s) for s in seed_list)}",
                        f"--tasks={','.join(task_names)}",
                        *([f"--extra={','.join(FLAGS.extra)}"] if FLAGS.extra else [])])
    data = results(reports, minutes, command)
    suite_records.write(FLAGS.json, json.dumps(data, indent=1) + "\n")
    suite_records.write(FLAGS.markdown, renderers.eval_suite_page(data))
    for task, row in data["tasks"].items():
        print(json.dumps({"task": task, **{c: row[c]["mean"] for c in COLUMNS}}), flush=True)
    print(f"eval_suite.py: {FLAGS.json} and {FLAGS.markdown} written", file=sys.stderr)


if __name__ == "__main__":
    seeds.run(main)

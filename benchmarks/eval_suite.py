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
import seeds  # noqa: E402  (its flags --seeds, --tasks, --workdir, --markdown, --extra are ours)

ROOT = seeds.ROOT
DEFAULT_SEEDS = ["20", "21", "22"]
# Seeds the defaults were chosen with (0, 1) or reported with (10-14): not here.
TUNING_SEEDS = frozenset({0, 1, *range(10, 15)})
DEVELOPMENT_TASKS = ("mnist5k", "digits")
# A pruned network this far below its teacher (accuracy, fraction) is a finding.
GAP_FINDING = 0.015
# A student within this many points of chance (fraction) is a finding.
CHANCE_MARGIN = 0.10
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


def machine() -> dict:
    """CPU model and core count of this machine."""
    return {"cpu": renderers.cpu_model(), "cores": os.cpu_count()}


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
            "tuning_seeds": sorted(TUNING_SEEDS), "tasks": tasks, "machine": machine(),
            "date": datetime.date.today().isoformat(), "code": _code_version(),
            "command": command,
            "minutes_per_seed": {str(s): m for s, m in sorted(minutes.items())}}


def _issues(data: dict) -> list[tuple[str, int, str]]:
    """(task, seed, sentence) for every pruned network more than GAP_FINDING
    below its teacher and every student within CHANCE_MARGIN of chance."""
    out = []
    for task, row in data["tasks"].items():
        chance = 1.0 / row["classes"] if row.get("classes") else None
        for seed, gap, student in zip(data["seeds"], row["pruned_minus_teacher"],
                                      row["student"]["values"]):
            # 1e-9: three test images of 200 are 1.5 points, not a finding.
            if gap is not None and gap < -GAP_FINDING - 1e-9:
                out.append((task, seed, f"{task}, seed {seed}: the pruned network ends "
                                        f"{100 * -gap:.1f} points below its teacher (more "
                                        f"than {100 * GAP_FINDING:.1f})."))
            if chance is not None and student is not None and student < chance + CHANCE_MARGIN:
                out.append((task, seed, f"{task}, seed {seed}: the student reaches "
                                        f"{100 * student:.1f}%, near chance "
                                        f"({100 * chance:.1f}%)."))
    return out


def findings(data: dict) -> list[str]:
    return [text for _, _, text in _issues(data)]


def _flagged(data: dict) -> set:
    """{(task, seed)} with a finding."""
    return {(task, seed) for task, seed, _ in _issues(data)}


def _cell(stat: dict, percent: bool) -> str:
    if stat["mean"] is None:
        return "-"
    if percent:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def render(data: dict) -> str:
    """docs/eval_suite.md from the suite's JSON."""
    seed_list = ", ".join(str(s) for s in data["seeds"])
    lines = [
        "# Evaluation suite", "",
        "Rendered by `python benchmarks/eval_suite.py --render=docs/results/eval_suite.json` "
        "from the committed results; do not edit by hand.", "",
        "The defaults (flags/quickstart.cfg and the library's) were chosen on the "
        f"development tasks {' and '.join(data['development_tasks'])} with seeds 0 and 1, "
        "and reported there with seeds 10-14 (docs/seed_study.md). The tasks below "
        "took no part in choosing them, and the seeds below were never used for "
        "tuning: they show what a user can expect on a task of their own. The tasks "
        "are image folders written by `benchmarks/make_eval_suite.py` from data "
        "installed with the project, nothing downloaded:", ""]
    for task, row in data["tasks"].items():
        lines.append(f"- `{task}`: {row['classes']} classes, {row['train_images']} training "
                     f"and {row['test_images']} test images: {row['description']}")
    lines += [
        "",
        "Each run holds out 10% of the training images as its validation split, "
        "on which every choice is made; the test split is fixed and only measured.", "",
        f"Measured with `{data['command']}` on {data['machine']['cpu']} "
        f"({data['machine']['cores']} cores), {data['date']}, code {data['code']}. "
        f"Seeds {seed_list}: mean ± sample standard deviation of the test accuracy (%) "
        "and of the pruned network's multiply-adds as a fraction of its teacher's.", "",
        "| task | teacher | student | pruned | multiply-adds of the teacher's | "
        "pruned - teacher per seed (points) |",
        "| --- | --- | --- | --- | --- | --- |"]
    flagged = _flagged(data)
    for task, row in data["tasks"].items():
        gaps = ", ".join("-" if g is None else
                         (f"**{100 * g:+.1f}**" if (task, s) in flagged else f"{100 * g:+.1f}")
                         for s, g in zip(data["seeds"], row["pruned_minus_teacher"]))
        count = sum(1 for t, _ in flagged if t == task)
        name = f"{task} **({count} of {len(data['seeds'])} seeds: findings)**" if count else task
        lines.append(f"| {name} | {_cell(row['teacher'], True)} | {_cell(row['student'], True)} "
                     f"| {_cell(row['pruned'], True)} | "
                     f"{_cell(row['pruned_flops_fraction'], False)} | {gaps} |")
    lines += ["", "Per seed (teacher / student / pruned %, multiply-adds fraction):", ""]
    for task, row in data["tasks"].items():
        parts = []
        for i, seed in enumerate(data["seeds"]):
            accs = [row[c]["values"][i] for c in ("teacher", "student", "pruned")]
            flops = row["pruned_flops_fraction"]["values"][i]
            mark = " (finding)" if (task, seed) in flagged else ""
            parts.append(f"seed {seed}: " + " / ".join(
                "-" if v is None else f"{100 * v:.1f}" for v in accs)
                + ("" if flops is None else f", {flops:.2f}") + mark)
        lines.append(f"- {task}: " + "; ".join(parts))
    found = findings(data)
    lines += ["", "## Findings", ""]
    if found:
        lines += [f"- {text}" for text in found]
    else:
        lines.append(f"None: no pruned network more than {100 * GAP_FINDING:.1f} points below "
                     f"its teacher, no student within {100 * CHANCE_MARGIN:.0f} points of "
                     "chance.")
    if data.get("minutes_per_seed"):
        lines += ["", "Minutes per seed, all tasks in one process, on the machine above "
                  "(shared with other training jobs, so slower than alone), per invocation "
                  "of the command line that ran stages (an invocation skips the stages an "
                  "earlier one finished):", ""]
        for seed, record in data["minutes_per_seed"].items():
            lines.append(f"- seed {seed}: " + "; ".join(
                f"`--stages={stages}` {m:.1f}" for stages, m in record.items()))
    return "\n".join(lines) + "\n"


def _ledger_time(seed_dir: str) -> float:
    """Latest modification time of the tasks' stage ledgers (0 if none): a
    stage that runs records itself there, a skipped one does not."""
    times = [0.0]
    tasks_dir = os.path.join(seed_dir, "tasks")
    if os.path.isdir(tasks_dir):
        for task in os.listdir(tasks_dir):
            try:
                times.append(os.path.getmtime(os.path.join(tasks_dir, task, "ledger.json")))
            except OSError:
                pass
    return max(times)


def _record_minutes(seed_dir: str, stages: str, minutes: float, ran: bool) -> dict:
    """Records this invocation's minutes in <seed_dir>/eval_suite_minutes.json
    ({stages asked for: minutes of the latest invocation that ran any of
    them}) unless it ran nothing (every stage was done), and returns the
    record."""
    path = os.path.join(seed_dir, "eval_suite_minutes.json")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    if ran:
        record[stages] = round(minutes, 1)
        _write(path, json.dumps(record, indent=1) + "\n")
    print(f"eval_suite.py: {os.path.basename(seed_dir)}, --stages={stages}: {minutes:.1f} min"
          + ("" if ran else " (every stage was done)"), file=sys.stderr, flush=True)
    return record


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}")
    if FLAGS.render:
        with open(FLAGS.render, encoding="utf-8") as f:
            _write(FLAGS.markdown, render(json.load(f)))
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
        tic, before = time.perf_counter(), _ledger_time(seed_dir)
        seeds._run_seed(FLAGS.flagfile_for_runs, seed, seed_dir, specs, FLAGS.extra,
                        stages=FLAGS.stages)
        minutes[seed] = _record_minutes(seed_dir, FLAGS.stages, (time.perf_counter() - tic) / 60,
                                        ran=_ledger_time(seed_dir) != before)
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
    _write(FLAGS.json, json.dumps(data, indent=1) + "\n")
    _write(FLAGS.markdown, render(data))
    for task, row in data["tasks"].items():
        print(json.dumps({"task": task, **{c: row[c]["mean"] for c in COLUMNS}}), flush=True)
    print(f"eval_suite.py: {FLAGS.json} and {FLAGS.markdown} written", file=sys.stderr)


if __name__ == "__main__":
    seeds.run(main)

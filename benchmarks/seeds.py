"""A seed study: the training stages once per seed, accuracies as mean and spread.

    python benchmarks/seeds.py --flagfile=flags/quickstart.cfg --seeds=0,1,2 \\
        [--tasks=mnist5k,digits] [--workdir=runs/seeds] [--markdown=runs/seeds/seeds.md]

For each seed it runs the command line (`python -m nettailor_tf.main`, a real
process, exactly as a user would) with the flagfile, `--seed=<seed>`,
`--stages=teacher,student,prune,finetune` and `--workdir=<workdir>/seed<seed>`.
Every stage depends on the seed (initialisation, data order, the validation
split), so no teacher is shared between seeds.  A seed whose workdir is
already complete is read, not rerun (the command line skips finished stages),
so an interrupted study resumes.

Then, per task, it prints one JSON line with the mean and the sample standard
deviation over seeds of the teacher's, the student's and the pruned network's
test accuracy (and the pruned one's before fine-tuning), of the pruned
network's multiply-adds as a fraction of the teacher's, of the student's
gate entropy, and each seed's pruned-minus-teacher gap; and writes the same as
a markdown table.  With --results it also writes the study as a results file
(the command, this machine, the date, the seeds and the per-task summary),
the form docs/results/seed_study.json has: `python benchmarks/render_docs.py`
renders the documentation's tables from it.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
import renderers  # noqa: E402

flags.DEFINE_string("flagfile_for_runs", None, "The run's flagfile (set through --flagfile).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
flags.DEFINE_list("tasks", None, "Tasks (default: the flagfile's).")
flags.DEFINE_string("workdir", "runs/seeds", "One sub-folder per seed goes here.")
flags.DEFINE_string("markdown", None, "Where the table goes (default: <workdir>/seeds.md).")
flags.DEFINE_string("results", None, "Also write the study as a results file (JSON) here, "
                    "e.g. docs/results/seed_study.json.")
flags.DEFINE_list("extra", [], "More flags for every run, e.g. --extra=--student_lr=0.02.")
FLAGS = flags.FLAGS

STAGES = "teacher,student,prune,finetune"
# (column, report path, how to show it)
MEASURES = (
    ("teacher", ("teacher", "accuracy"), "percent"),
    ("student", ("student", "accuracy"), "percent"),
    ("pruned_before_finetune", ("pruned", "accuracy_before_finetune"), "percent"),
    ("pruned", ("pruned", "accuracy"), "percent"),
    ("pruned_flops_fraction", None, "fraction"),
    ("student_gate_entropy", ("student", "gate_entropy"), "fraction"),
)


def _run_seed(flagfile: str, seed: int, workdir: str, tasks, extra, stages: str = STAGES) -> float:
    command = [sys.executable, "-m", "nettailor_tf.main", f"--flagfile={flagfile}",
               f"--seed={seed}", f"--stages={stages}", f"--workdir={workdir}", *extra]
    if tasks:
        command.append(f"--tasks={','.join(tasks)}")
    print(f"seed {seed}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"seeds.py: error: the run for seed {seed} failed (exit code "
                         f"{proc.returncode}); its workdir {workdir} keeps what it finished")
    return time.perf_counter() - tic


def _value(entry: dict, measure) -> float | None:
    name, path, _ = measure
    if name == "pruned_flops_fraction":
        teacher, pruned = entry.get("teacher") or {}, entry.get("pruned") or {}
        if teacher.get("flops") and pruned.get("flops"):
            return pruned["flops"] / teacher["flops"]
        return None
    value = entry
    for key in path:
        value = (value or {}).get(key)
    return value


def summarize(reports: dict) -> dict:
    """{task: {measure: {"mean", "std", "values"}, "gaps": [...]}} over the seeds'
    report.json contents ({seed: report})."""
    tasks = sorted({t for report in reports.values() for t in report["tasks"]})
    summary = {}
    for task in tasks:
        row = {"seeds": sorted(reports)}
        for measure in MEASURES:
            values = [_value(reports[s]["tasks"].get(task, {}), measure) for s in sorted(reports)]
            known = [v for v in values if v is not None]
            row[measure[0]] = {
                "mean": statistics.fmean(known) if known else None,
                "std": statistics.stdev(known) if len(known) > 1 else 0.0 if known else None,
                "values": values}
        teachers, pruned = row["teacher"]["values"], row["pruned"]["values"]
        row["pruned_minus_teacher"] = [None if t is None or p is None else p - t
                                       for t, p in zip(teachers, pruned)]
        summary[task] = row
    return summary


def markdown(summary: dict, seeds, minutes: dict) -> str:
    """The table of benchmarks/renderers.py, and each seed's run time."""
    lines = [renderers.seed_study_table({"seeds": list(seeds), "tasks": summary}).rstrip("\n")]
    if minutes:
        lines += ["", "Run time per seed (minutes, this machine): " + ", ".join(
            f"seed {s}: {m:.1f}" for s, m in sorted(minutes.items()))]
    return "\n".join(lines) + "\n"


def results_file(summary: dict, seeds, argv) -> dict:
    """What docs/results/seed_study.json holds."""
    command = " ".join(["python benchmarks/seeds.py"] + [
        a if not a.startswith("--flagfile_for_runs=")
        else "--flagfile=" + os.path.relpath(a.split("=", 1)[1], ROOT) for a in argv[1:]])
    return {"command": command, "machine": renderers.machine(),
            "date": time.strftime("%Y-%m-%d"), "seeds": list(seeds),
            "tasks": {task: dict(row) for task, row in summary.items()}}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}")
    flagfile = FLAGS.flagfile_for_runs
    if not flagfile:
        raise app.UsageError("--flagfile=PATH is required: the run's flagfile")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: distinct integers >= 0")
    workdir = os.path.abspath(FLAGS.workdir)
    reports, minutes = {}, {}
    for seed in seeds:
        seed_dir = os.path.join(workdir, f"seed{seed}")
        seconds = _run_seed(flagfile, seed, seed_dir, FLAGS.tasks, FLAGS.extra)
        minutes[seed] = seconds / 60
        with open(os.path.join(seed_dir, "report.json"), encoding="utf-8") as f:
            reports[seed] = json.load(f)
    summary = summarize(reports)
    for task, row in summary.items():
        print(json.dumps({"task": task, **row}), flush=True)
    path = FLAGS.markdown or os.path.join(workdir, "seeds.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(summary, seeds, minutes))
    print(f"seeds.py: table written to {path}", file=sys.stderr)
    if FLAGS.results:
        with open(FLAGS.results, "w", encoding="utf-8") as f:
            json.dump(results_file(summary, seeds, sys.argv), f, indent=1)
            f.write("\n")
        print(f"seeds.py: results written to {FLAGS.results}", file=sys.stderr)


def run(main_function=None):
    # --flagfile is absl's own flag (it would be read as this script's
    # flags): hand it to the runs instead.
    argv = []
    for arg in sys.argv:
        if arg.startswith("--flagfile="):
            path = arg.split("=", 1)[1]
            if not os.path.isfile(path):
                sys.exit(f"seeds.py: error: --flagfile={path}: no such file")
            argv.append(f"--flagfile_for_runs={os.path.abspath(path)}")
        else:
            argv.append(arg)
    sys.argv = argv
    app.run(main_function or main)


if __name__ == "__main__":
    run()

"""Collects finished runs' reports into one results file, to compare settings.

    python benchmarks/collect_runs.py --out=docs/results/NAME.json \\
        --run="fixed fine-tune|0|runs/dev/A0|" \\
        --run="plateau fine-tune|0|runs/dev/B0|--finetune_plateau --finetune_min_steps=2000" ...

Each --run is `label|seed|workdir|flags added to the flagfile`: a workdir made by
`python -m nettailor_tf.main --flagfile=FLAGFILE --seed=SEED <flags>` (the
flagfile is --flagfile_of_runs).  For every task of its report.json the file
gets one row: the prune search's choice, the fine-tune's length and how it
stopped, and the teacher's and the pruned network's validation and test
accuracy.  Choices between settings are made on the validation columns; the
test columns are reported, not chosen on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import renderers  # noqa: E402


def rows_of(label: str, seed: int, workdir: str, flags: str) -> list[dict]:
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    rows = []
    for task, entry in sorted(report["tasks"].items()):
        teacher, pruned = entry["teacher"], entry.get("pruned")
        if not pruned:
            raise SystemExit(f"collect_runs.py: {workdir}: {task} has no fine-tuned pruned "
                             f"network yet (run its finetune stage)")
        search = pruned.get("prune_search") or {}
        rows.append({
            "label": label, "seed": seed, "task": task, "flags": flags.split(),
            "chosen": search.get("chosen"), "rule": search.get("rule"),
            "flops_fraction": round(pruned["flops"] / teacher["flops"], 4),
            "finetune_steps": pruned.get("steps"), "stopped": pruned.get("stopped"),
            "teacher_val": teacher.get("val_accuracy"), "teacher_test": teacher["accuracy"],
            "pruned_val": pruned.get("val_accuracy"), "pruned_test": pruned["accuracy"],
            # The validation loss of the weights the fine-tune ends with (plateau
            # rule only): a continuous measure where the accuracies of 145-400
            # images differ by an image or two.
            "pruned_val_loss": pruned.get("val_loss")})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True,
                        help="label|seed|workdir|flags added")
    parser.add_argument("--flagfile_of_runs", default="flags/quickstart.cfg")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = []
    for spec in args.run:
        parts = spec.split("|")
        if len(parts) != 4:
            raise SystemExit(f"collect_runs.py: --run={spec!r}: expected label|seed|workdir|flags")
        label, seed, workdir, flags = parts
        rows += rows_of(label, int(seed), workdir, flags)
    results = {"command": f"python -m nettailor_tf.main --flagfile={args.flagfile_of_runs} "
                          f"--seed=SEED --stages=teacher,student,prune,finetune <flags added>",
               "collected_by": "python benchmarks/collect_runs.py",
               "machine": renderers.machine(), "date": datetime.date.today().isoformat(),
               "note": args.note, "rows": rows}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    print(f"collect_runs.py: {len(rows)} rows written to {args.out}")


if __name__ == "__main__":
    main()

"""The same exported files of several workdirs, timed together.

    python benchmarks/compare_workdirs.py --workdirs=runs/flops,runs/latency [--variant=float32]

For each task the workdirs share, the pruned network's file of `--variant`
from every workdir is timed in interleaved rounds on one real test image
(LiteRT, batch 1, `--threads`), so that a slow spell of the machine hits all
of them alike: the fair way to ask whether one run's network is faster than
another's (e.g. `--complexity_cost=latency` against flops).  Prints one JSON
line per task: per workdir the median [p10, p90] ms, test accuracy and
multiply-adds, and the latency ratio of each workdir to the first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nettailor_tf  # noqa: E402,F401  (before TensorFlow: it chooses the CPU kernels)


def compare(workdirs: list[str], variant: str = "float32", threads: int = 1, runs: int = 300,
            rounds: int = 10) -> list[dict]:
    from exporters import savedmodel, timing
    from nettailor_tf.common import quiet

    reports = []
    for workdir in workdirs:
        with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
            reports.append(json.load(f))
    size = reports[0]["image_size"]
    tasks = [t for t in reports[0]["tasks"]
             if all(variant in (r["tasks"].get(t, {}).get("tflite") or {}) for r in reports)]
    rows = []
    for task in tasks:
        files = {workdir: (os.path.join(workdir, r["tasks"][task]["tflite"][variant]["path"]),
                           savedmodel.SERVING_KEY) for workdir, r in zip(workdirs, reports)}
        image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        with quiet.native_stderr_filtered():
            measured = timing.measure_many(files, image, threads, runs=runs, rounds=rounds)
        first = measured[workdirs[0]].median_ms
        rows.append({"task": task, "variant": variant, "threads": threads, "workdirs": {
            workdir: {"median_ms": round(measured[workdir].median_ms, 4),
                      "p10_ms": round(measured[workdir].p10_ms, 4),
                      "p90_ms": round(measured[workdir].p90_ms, 4),
                      "ratio_to_first": round(measured[workdir].median_ms / first, 4),
                      "accuracy": r["tasks"][task]["pruned"]["accuracy"],
                      "flops": r["tasks"][task]["pruned"]["flops"],
                      "predicted_latency_ms": r["tasks"][task]["pruned"].get(
                          "predicted_latency_ms")}
            for workdir, r in zip(workdirs, reports)},
            "other_load_cores": measured[workdirs[0]].other_load_cores,
            "busy": measured[workdirs[0]].busy})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdirs", required=True, help="comma-separated finished workdirs")
    parser.add_argument("--variant", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args(argv)
    workdirs = [w for w in args.workdirs.split(",") if w]
    if len(workdirs) < 2:
        parser.error("--workdirs needs at least two workdirs to compare")
    for row in compare(workdirs, args.variant, args.threads, args.runs):
        print(json.dumps(row))


if __name__ == "__main__":
    main()

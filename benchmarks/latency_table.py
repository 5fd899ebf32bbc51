"""Latency tables for `--complexity_cost=latency`: measured here, or on a phone.

Here (this machine's LiteRT interpreter, the same table a run caches):

    python benchmarks/latency_table.py measure --backbone=efficientnet_lite0 \\
        --image_size=64 --threads=1 --out=table.json

On a device with LiteRT's `benchmark_model` tool (BUILD.md, "A latency table
from a phone"), in three steps:

    python benchmarks/latency_table.py models --backbone=efficientnet_lite0 \\
        --image_size=64 --out=branches/        # one .tflite per branch + run_all.sh
    # copy branches/ to the device, run run_all.sh there, copy the .txt back
    python benchmarks/latency_table.py collect --backbone=efficientnet_lite0 \\
        --image_size=64 --threads=1 --results=branches/ --device="Pixel 7" --out=table.json

then train with `--complexity_cost=latency --latency_table=table.json`.
`benchmark_model` reports the mean of its runs (microseconds), not the
median the interpreter here gives: on a quiet device the two agree closely.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nettailor_tf.latency import measure  # noqa: E402
from nettailor_tf.latency import table as latency_table_lib  # noqa: E402
from nettailor_tf.settings import config as config_lib  # noqa: E402  (after the path above)

# What `benchmark_model` prints at the end of a run, e.g.
#   Inference timings in us: Init: 3063, First inference: 1013, Warmup (avg): 626.9,
#   Inference (avg): 604.3
_AVERAGE = re.compile(r"Inference \(avg\):\s*([0-9.eE+-]+)")

RUN_ALL = """#!/bin/sh
# Times every branch with LiteRT's benchmark_model; run on the device from
# this folder.  BENCHMARK_MODEL: path of the tool (default ./benchmark_model).
set -e
tool="${{BENCHMARK_MODEL:-./benchmark_model}}"
for model in *.tflite; do
  "$tool" --graph="$model" --num_threads={threads} --num_runs={runs} --warmup_runs=10 \\
    --use_xnnpack=true > "${{model%.tflite}}.txt" 2>&1
  echo "$model: $(grep -o 'Inference (avg): [0-9.]*' "${{model%.tflite}}.txt")"
done
"""


def _functions(backbone: str, image_size: int, max_skip):
    from nettailor_tf.model import student_network
    from nettailor_tf.model import backbones as backbones_lib

    network = backbones_lib.build_backbone(backbone)
    plan = student_network.Plan.full(len(network.blocks), max_skip)
    student = student_network.build_student(network, 10, plan, "frozen", image_size)
    return measure.branch_functions(student, image_size)


def write_models(backbone: str, image_size: int, max_skip, out: str, threads: int,
                 runs: int = 200) -> list[str]:
    """One float32 .tflite per table entry, and run_all.sh that times them."""
    from nettailor_tf.model import backbones as backbones_lib

    os.makedirs(out, exist_ok=True)
    written = []
    for key, function in _functions(backbone, image_size, max_skip).items():
        path = os.path.join(out, f"{key}.tflite")
        with open(path, "wb") as f:
            f.write(measure.convert_functions({key: function}))
        written.append(path)
    # The whole networks the table is calibrated on.
    network = backbones_lib.build_backbone(backbone)
    networks = measure.whole_networks(
        network, max_skip, image_size, out,
        measure.sample_plans(len(network.blocks), max_skip))
    written += [path for path, _ in networks.values()]
    script = os.path.join(out, "run_all.sh")
    with open(script, "w", encoding="utf-8") as f:
        f.write(RUN_ALL.format(threads=threads, runs=runs))
    os.chmod(script, 0o755)
    return written


def collect(backbone: str, image_size: int, max_skip, threads: int, results: str,
            device: str) -> latency_table_lib.LatencyTable:
    """The table from `benchmark_model`'s outputs (<entry>.txt per branch)."""
    from nettailor_tf.model import backbones as backbones_lib

    expected = list(_functions(backbone, image_size, max_skip))
    samples = measure.sample_plans(len(backbones_lib.build_backbone(backbone).blocks),
                                           max_skip)
    calibration = [latency_table_lib.TEACHER_KEY, latency_table_lib.STUDENT_KEY, *samples]
    entries, missing = {}, []
    for key in expected + calibration:
        path = os.path.join(results, f"{key}.txt")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                found = _AVERAGE.findall(f.read())
        except OSError:
            found = []
        if not found:
            missing.append(key)
            continue
        entries[key] = round(float(found[-1]) / 1e3, 5)  # us -> ms
    if set(missing) & set(calibration[:2]):  # optional: the table is then uncalibrated
        for key in calibration:
            entries.pop(key, None)
    # A missing sample (an older run_all.sh) leaves the teacher and the
    # full student: the two-factor calibration.
    missing = [k for k in missing if k not in calibration]
    if missing:
        raise SystemExit(f"--results={results}: no 'Inference (avg)' for {len(missing)} of "
                         f"{len(expected)} branches ({', '.join(missing[:4])}...); run "
                         f"run_all.sh on the device first")
    return latency_table_lib.LatencyTable(
        backbone=backbone, image_size=image_size, threads=threads, max_skip=max_skip,
        entries=entries, device=device, source=os.path.abspath(results),
        calibration_plans={k: latency_table_lib.plan_as_dict(p) for k, p in samples.items()
                           if k in entries})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("measure", "models", "collect"))
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        choices=config_lib.BACKBONES)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--max_skip", default="3", help="as the run's --max_skip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="table.json (measure, collect) or a "
                        "folder (models)")
    parser.add_argument("--results", help="collect: the folder of benchmark_model outputs")
    parser.add_argument("--device", default="unknown device", help="collect: what it ran on")
    args = parser.parse_args(argv)
    max_skip = config_lib.parse_max_skip(args.max_skip)
    if args.command == "measure":
        table = measure.measure_table(args.backbone, args.image_size, args.threads,
                                                max_skip)
        table.save(args.out)
    elif args.command == "models":
        written = write_models(args.backbone, args.image_size, max_skip, args.out, args.threads)
        print(f"{len(written)} branch models and run_all.sh in {args.out}")
        return
    else:
        if not args.results:
            parser.error("collect needs --results=FOLDER (the .txt files run_all.sh wrote)")
        table = collect(args.backbone, args.image_size, max_skip, args.threads, args.results,
                        args.device)
        table.save(args.out)
    print(f"{args.out}: {len(table.entries)} entries, fingerprint {table.fingerprint()[:12]}")


if __name__ == "__main__":
    main()

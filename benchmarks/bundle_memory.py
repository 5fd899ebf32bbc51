"""Peak memory of the quickstart's tasks run once: separate files against
the bundle, each without XNNPACK's weight cache, with it in a file and with
it in memory (`:memory`), and where each process's memory sat.

    python benchmarks/bundle_memory.py --workdir=runs/quickstart [--variant=float32] [--repeats=3]

Prints one JSON object (MB; all but the baseline as increments over a
process that only loaded the runtime).  The benchmark stage records the same
in report.json (`bundle.memory_mb`), from one process per way;
docs/results/bundle_memory.json is this script's output.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nettailor_tf  # noqa: E402,F401  (before TensorFlow: it chooses the CPU kernels)
from exporters.memory import bundle_memory  # noqa: E402  (after the path above)


def workdir_memory(workdir: str, variant: str = "float32", repeats: int = 3) -> dict:
    """`bundle_memory` for the files of a finished workdir."""
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    separate = [os.path.join(workdir, task["tflite"][variant]["path"])
                for task in report["tasks"].values() if variant in (task.get("tflite") or {})]
    bundle = os.path.join(workdir, report["bundle"]["variants"][variant]["path"])
    return {**bundle_memory(separate, bundle, repeats), "variant": variant}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variant", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(workdir_memory(args.workdir, args.variant, args.repeats)))


if __name__ == "__main__":
    main()

"""Peak memory of a phone-like process that runs every task once: separate
per-task files, the multi-task bundle, and the bundle through XNNPACK's
weight cache (which packs each shared weight once for every signature).

    python benchmarks/bundle_memory.py --workdir=runs/quickstart [--variant=float32]

Each way runs in a fresh process (LiteRT's CompiledModel API, 1 thread): it
loads the files, runs each task's signature once on a zero image and reports
its peak resident memory (VmHWM).  A process that only loaded the runtime is
the baseline; the figures are increments over it.  Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r'''
import json, sys
import numpy as np
from ai_edge_litert import compiled_model, cpu_options, options

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

files, cache = json.loads(sys.argv[1]), sys.argv[2]
models = []
for number, path in enumerate(files):
    # One cache file per model file: XNNPACK's cache belongs to one model.
    cpu = cpu_options.CpuOptions(num_threads=1,
                                 xnnpack_weight_cache_path=f"{cache}.{number}" if cache else "")
    model = compiled_model.CompiledModel.from_file(path, options=options.Options(cpu_options=cpu))
    models.append(model)
    for index in range(model.get_num_signatures()):
        inputs = model.create_input_buffers(index)
        outputs = model.create_output_buffers(index)
        model.run_by_index(index, inputs, outputs)
print(json.dumps({"peak_mb": peak_mb()}))
'''


def measure(files: list[str], cache: str = "", repeats: int = 3) -> float:
    """Peak memory (MB) of a fresh process that loads `files` and runs every
    signature: the median of `repeats` processes (each with a fresh cache)."""
    peaks = []
    for repeat in range(repeats):
        path = f"{cache}.{repeat}" if cache else ""
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(files), path],
                              capture_output=True, text=True, check=True)
        peaks.append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])
    return sorted(peaks)[len(peaks) // 2]


def bundle_memory(workdir: str, variant: str = "float32", repeats: int = 3) -> dict:
    """{"baseline", "separate_files", "separate_files_weight_cache", "bundle",
    "bundle_weight_cache"} in MB (all but the baseline as increments over it),
    and what they ran."""
    report = json.load(open(os.path.join(workdir, "report.json"), encoding="utf-8"))
    separate = [os.path.join(workdir, task["tflite"][variant]["path"])
                for task in report["tasks"].values() if variant in (task.get("tflite") or {})]
    bundle = os.path.join(workdir, report["bundle"]["variants"][variant]["path"])
    baseline = measure([], repeats=repeats)
    result = {"baseline": round(baseline, 1)}
    with tempfile.TemporaryDirectory() as folder:
        cache = os.path.join(folder, "xnnpack_cache")
        for name, files, cache in (("separate_files", separate, ""),
                                   ("separate_files_weight_cache", separate, cache),
                                   ("bundle", [bundle], ""),
                                   ("bundle_weight_cache", [bundle], cache)):
            result[name] = round(measure(files, cache, repeats) - baseline, 1)
    result["variant"] = variant
    result["tasks"] = len(separate)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variant", default="float32")
    args = parser.parse_args()
    print(json.dumps(bundle_memory(args.workdir, args.variant)))


if __name__ == "__main__":
    main()

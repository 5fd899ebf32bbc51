"""Peak memory of a phone-like process that runs every task once.

A fresh process (LiteRT's CompiledModel API, 1 thread) loads the files, runs
every signature once on a zero image and reports its peak resident memory
(VmHWM): from separate per-task files, from the multi-task bundle, and each
through XNNPACK's weight cache (which packs a weight once for every
signature of a model).  A process that only loaded the runtime is the
baseline; the other figures are increments over it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_CHILD = r'''
import json, sys
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


def bundle_memory(separate: list[str], bundle: str, repeats: int = 3) -> dict:
    """{"baseline", "separate_files", "separate_files_weight_cache", "bundle",
    "bundle_weight_cache"} in MB (all but the baseline as increments over it)
    for running every task once from the `separate` per-task files or from
    the `bundle` file."""
    for path in [*separate, bundle]:
        # A file still dirty in the page cache (just written) is not shared
        # the same way: the weight cache then saved nothing (measured).
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    baseline = measure([], repeats=repeats)
    result = {"baseline": round(baseline, 1)}
    with tempfile.TemporaryDirectory() as folder:
        # A cache file per way (and per repeat and model, in `measure`): a
        # cache packed for another model must never be read.
        for name, files, cache in (("separate_files", separate, ""),
                                   ("separate_files_weight_cache", separate,
                                    os.path.join(folder, "separate_cache")),
                                   ("bundle", [bundle], ""),
                                   ("bundle_weight_cache", [bundle],
                                    os.path.join(folder, "bundle_cache"))):
            result[name] = round(measure(files, cache, repeats) - baseline, 1)
    result["tasks"] = len(separate)
    result["repeats"] = repeats
    return result

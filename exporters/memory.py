"""Peak memory of a phone-like process that runs every task once.

A fresh process (LiteRT's CompiledModel API, 1 thread) loads the files, runs
every signature once on a zero image and reports its peak resident memory
(VmHWM): from separate per-task files and from the multi-task bundle, each
three ways: plain, through XNNPACK's weight cache in a file, and through
the same cache kept in memory (the reserved path `:memory`, no file).
Without a cache XNNPACK packs a weight once per signature, so a bundle's
shared weights are packed once for every task; the cache packs each weight
once for every signature of a model.  A process that only loaded the
runtime is the baseline; the other figures are increments over it.

Where the memory goes is recorded beside each peak, at the end of the run:
the model files' mapped pages, the weight cache's pages (the cache file or
the in-memory one) and anonymous memory (XNNPACK's packed weights when no
cache holds them, arenas, runtime state).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

# LiteRT's reserved weight-cache path for a cache that lives in memory only
# (TfLiteXNNPackDelegateInMemoryFilePath(): it still packs each shared weight
# once for every signature of a model, and writes no file).
IN_MEMORY_CACHE = ":memory"

_CHILD = r'''
import json, os, sys
from ai_edge_litert import compiled_model, cpu_options, options

IN_MEMORY = ":memory"

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def mapped_mb(files, cache):
    """Resident MB of the model files' mappings and of the weight cache's."""
    totals, name = {"model_files_mb": 0.0, "weight_cache_mb": 0.0}, ""
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            name = " ".join(fields[5:])
        elif fields[0] == "Rss:":
            if name in files:
                totals["model_files_mb"] += int(fields[1]) / 1024
            elif cache and (name.startswith(cache) or "XNNPack in-memory weight cache" in name):
                totals["weight_cache_mb"] += int(fields[1]) / 1024
    return totals

files, cache = json.loads(sys.argv[1]), sys.argv[2]
models = []
for number, path in enumerate(files):
    # One cache per model file: XNNPACK's cache belongs to one model.
    path_of_cache = cache if cache in ("", IN_MEMORY) else f"{cache}.{number}"
    cpu = cpu_options.CpuOptions(num_threads=1, xnnpack_weight_cache_path=path_of_cache)
    model = compiled_model.CompiledModel.from_file(path, options=options.Options(cpu_options=cpu))
    models.append(model)
    for index in range(model.get_num_signatures()):
        inputs = model.create_input_buffers(index)
        outputs = model.create_output_buffers(index)
        model.run_by_index(index, inputs, outputs)
print(json.dumps({"peak_mb": status_mb("VmHWM"), "anonymous_mb": status_mb("RssAnon"),
                  **mapped_mb({os.path.abspath(f) for f in files}, cache)}))
'''

# (name, which files, which cache) for every way `bundle_memory` measures.
WAYS = (("separate_files", "separate", ""),
        ("separate_files_weight_cache", "separate", "file"),
        ("separate_files_in_memory_cache", "separate", IN_MEMORY_CACHE),
        ("bundle", "bundle", ""),
        ("bundle_weight_cache", "bundle", "file"),
        ("bundle_in_memory_cache", "bundle", IN_MEMORY_CACHE))


def measure_once(files: list[str], cache: str = "") -> dict:
    """One fresh process that loads `files` (through the weight cache file
    prefix `cache`, IN_MEMORY_CACHE, or none) and runs every signature:
    {"peak_mb", "anonymous_mb", "model_files_mb", "weight_cache_mb"}."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(files), cache],
                          capture_output=True, text=True)
    if proc.returncode:
        # Python's own error line, not the runtime's log lines around it.
        errors = re.findall(r"^[\w.]*(?:Error|Exception)\b.*$", proc.stderr, re.M)
        last = errors[-1] if errors else (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"measuring the memory of {files} failed (exit {proc.returncode}): "
                           f"{last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bundle_memory(separate: list[str], bundle: str, repeats: int = 3) -> dict:
    """Peak memory in MB of running every task once from the `separate`
    per-task files or from the `bundle` file, for every way in WAYS (all but
    the baseline as increments over a process that only loaded the
    runtime), and under "breakdown" where each way's memory sat at the end
    of its run.  Each figure is the median of `repeats` processes; the ways
    take turns within a repeat so that a change in the machine's load
    touches them all alike."""
    for path in [*separate, bundle]:
        # A file still dirty in the page cache (just written) is not shared
        # the same way: the weight cache then saved nothing (measured).
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    runs: dict[str, list[dict]] = {name: [] for name in ("baseline", *(w[0] for w in WAYS))}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(repeats):
            runs["baseline"].append(measure_once([]))
            for name, which, cache in WAYS:
                if cache == "file":
                    # A cache file per way, repeat and model (the child adds
                    # the model's number): a cache packed for another model
                    # must never be read.
                    cache = os.path.join(folder, f"{name}_{repeat}")
                runs[name].append(measure_once(separate if which == "separate" else [bundle],
                                               cache))
    return _summary(runs, tasks=len(separate), repeats=repeats)


def _summary(runs: dict[str, list[dict]], tasks: int, repeats: int) -> dict:
    """Medians of the runs of `bundle_memory`, as increments over the baseline."""
    def median(name, key):
        return statistics.median(run[key] for run in runs[name])

    baseline, baseline_anonymous = median("baseline", "peak_mb"), median("baseline", "anonymous_mb")
    result = {"baseline": round(baseline, 1)}
    breakdown = {}
    for name, _, _ in WAYS:
        result[name] = round(median(name, "peak_mb") - baseline, 1)
        breakdown[name] = {"model_files": round(median(name, "model_files_mb"), 1),
                           "weight_cache": round(median(name, "weight_cache_mb"), 1),
                           "anonymous": round(median(name, "anonymous_mb") - baseline_anonymous, 1)}
    return {**result, "breakdown": breakdown, "tasks": tasks, "repeats": repeats}

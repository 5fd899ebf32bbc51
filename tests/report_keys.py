"""The key paths of a report.json and those docs/report_json.md documents;
shared by tests/test_docs.py (keys the code writes literally) and
tests/test_stages_deploy.py (keys of a report a full run writes).  Pure
Python: no TensorFlow."""
import os
import re

ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
REPORT_DOC = os.path.join(ROOT, "docs", "report_json.md")

# Objects whose keys are data (task names, variants, ...): key path -> the
# placeholder docs/report_json.md writes for their keys.
MAPS = {"tasks": "<task>",
        "bundle.labels": "<task>", "bundle.signatures": "<task>",
        "bundle.task_specific_params": "<task>",
        "bundle.latency": "<variant>", "bundle.latency.<variant>": "<task>",
        "bundle.variants": "<variant>", "bundle.variants.<variant>.tasks": "<task>",
        "bundle.variants.<variant>.weight_types": "<signature>",
        "bundle.variants.<variant>.weight_types.<signature>": "<TYPE>",
        "bundle.variants.<variant>.float_weights_per_signature": "<signature>",
        "bundle.variants.<variant>.task_weight_bytes": "<task>",
        "bundle.memory_mb.breakdown": "<way>",
        "bundle.variants.<variant>.universal_task_weight_bytes": "<task>",
        "tasks.<task>.recommended.candidates": "<variant>",
        "tasks.<task>.pruned.vs_teacher": "<split>",
        "tasks.<task>.pruned.prune_search.damage": "<key>"}
for _part in ("tflite", "teacher_tflite"):
    MAPS[f"tasks.<task>.{_part}"] = "<variant>"
    MAPS[f"tasks.<task>.{_part}.<variant>.latency"] = "<threads>"
    MAPS[f"tasks.<task>.{_part}.<variant>.weight_types"] = "<TYPE>"


def key_paths(data, prefix: str = "") -> set[str]:
    """Every key path of a report, with the keys that are data replaced by placeholders."""
    paths = set()
    if isinstance(data, list):
        for item in data:
            paths |= key_paths(item, prefix)
    elif isinstance(data, dict):
        placeholder = MAPS.get(prefix)
        for key, value in data.items():
            name = placeholder or key
            path = f"{prefix}.{name}" if prefix else name
            paths.add(path)
            paths |= key_paths(value, path)
    return paths


def documented() -> set[str]:
    """Every code span of docs/report_json.md (the keys are written as code)."""
    with open(REPORT_DOC, encoding="utf-8") as f:
        return set(m.group(1) for m in re.finditer(r"`([^`\n]+)`", f.read()))

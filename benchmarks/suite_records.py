"""What benchmarks/eval_suite.py records about its runs, apart from its flags
(so that tests can import it): the machine, and the minutes of each
invocation that ran stages."""
from __future__ import annotations

import json
import os
import sys

import renderers


def machine() -> dict:
    """CPU model and core count of this machine."""
    return {"cpu": renderers.cpu_model(), "cores": os.cpu_count()}


def ledger_time(seed_dir: str) -> float:
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


def record_minutes(seed_dir: str, stages: str, minutes: float, ran: bool) -> dict:
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
        write(path, json.dumps(record, indent=1) + "\n")
    print(f"eval_suite.py: {os.path.basename(seed_dir)}, --stages={stages}: {minutes:.1f} min"
          + ("" if ran else " (every stage was done)"), file=sys.stderr, flush=True)
    return record


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)

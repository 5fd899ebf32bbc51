"""Fault injection: the CLI killed (SIGKILL) at seeded random moments inside
each stage, then run again until it finishes, ends exactly where an
uninterrupted run ends, and never leaves a half-written file where a later
run would read it."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ARGS = ["--backbone=tiny", "--backbone_weights=random", "--image_size=16", "--tasks=digits",
        "--stages=teacher,student,prune,finetune,export,benchmark", "--teacher_epochs=1",
        "--teacher_lr=0.05", "--student_epochs=2", "--finetune_epochs=1",
        "--prune_universal=1", "--log_every=5", "--checkpoint_every=7",
        "--teacher_min_steps=0", "--student_min_steps=0", "--finetune_min_steps=0",
        "--export_variants=float32", "--bundle_variants=float32",
        "--calibration_images=32", "--benchmark_runs=50", "--seed=0", "--noteacher_plateau"]
# A line each stage logs when it starts its real work, and the range (s) the
# kill is drawn from after it: prune and benchmark take about a second here.
STAGE_MARKERS = {"teacher": ("teacher stage: fine-tuning", 2.5), "student": ("student stage:", 2.5),
                 "prune": ("prune stage:", 0.8), "finetune": ("finetune stage:", 2.5),
                 "export": ("exporting to", 2.5), "benchmark": ("benchmark stage:", 0.8)}


def _command(workdir, *extra):
    return [sys.executable, "-m", "nettailor_tf.main", f"--workdir={workdir}", *ARGS, *extra]


def _run_to_end(workdir):
    result = subprocess.run(_command(workdir), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _run_and_kill(workdir, marker, delay, *extra):
    """Starts the run, waits for `marker` in its log, then `delay` seconds
    more, and SIGKILLs it.  Returns whether the kill landed (the run may
    finish first)."""
    process = subprocess.Popen(_command(workdir, *extra), stderr=subprocess.PIPE, text=True)
    seen = threading.Event()

    def read():
        for line in process.stderr:
            if marker in line:
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not seen.is_set() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        time.sleep(delay)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    reader.join(timeout=10)
    return killed


def _results(workdir):
    report = json.loads((workdir / "report.json").read_text())
    task = report["tasks"]["digits"]
    with np.load(workdir / "tasks" / "digits" / "nettailor.npz") as state:
        weights = {k: state[k] for k in state.files}
    return {"teacher": task["teacher"]["accuracy"], "student": task["student"]["accuracy"],
            "gates": task["student"]["gates"], "pruned": task["pruned"]["accuracy"],
            "flops": task["pruned"]["flops"],
            "agreement": {v: e["top1_agreement"] for v, e in task["tflite"].items()},
            "plan": json.loads((workdir / "tasks" / "digits" / "plan.json").read_text())["blocks"],
            "weights": weights}


def _leftovers(workdir):
    """Temporary files and directories of atomic writes."""
    found = []
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            if name.startswith(".tmp-") or ".tmp-" in name or name.endswith((".tmp", ".old")):
                found.append(os.path.join(root, name))
    return found


@pytest.mark.parametrize("seed", [0])
def test_killed_at_random_points_of_every_stage_then_resumed_ends_the_same(tmp_path, seed):
    # The uninterrupted reference run goes on beside the killed ones (the
    # results do not depend on timing, and the two overlap on 2 cores).
    reference = tmp_path / "reference"
    reference_log = tmp_path / "reference.log"  # a file: a full pipe would stall the run
    with open(reference_log, "w") as log_file:
        reference_run = subprocess.Popen(_command(reference), stdout=subprocess.DEVNULL,
                                         stderr=log_file)

    # A second run on the reference's workdir, started while it works, is
    # refused at once and names it; the reference then ends exactly where the
    # runs below (alone on their workdir) end.
    deadline = time.monotonic() + 120
    while "stage 1 of" not in reference_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # the lock is held from before the first stage
    started = time.monotonic()
    intruder = subprocess.run(_command(reference), capture_output=True, text=True, timeout=120)
    assert intruder.returncode == 2, intruder.stderr[-2000:]
    assert f"is in use by another run (pid {reference_run.pid} on" in intruder.stderr
    assert time.monotonic() - started < 30

    rng = np.random.default_rng(seed)
    workdir = tmp_path / "killed"
    kills = []
    for stage, (marker, latest) in STAGE_MARKERS.items():
        delay = float(rng.uniform(0.1, latest))
        if _run_and_kill(workdir, marker, delay):
            kills.append((stage, round(delay, 2)))
    assert len(kills) >= 4, kills  # the kills landed inside the run, not after it
    reference_run.wait(timeout=400)
    assert reference_run.returncode == 0, reference_log.read_text()[-3000:]
    expected = _results(reference)
    log = _run_to_end(workdir)
    assert "resuming from" in log or "already done" in log

    got = _results(workdir)
    for key in ("teacher", "student", "gates", "pruned", "flops", "agreement", "plan"):
        assert got[key] == expected[key], (key, kills)
    assert got["weights"].keys() == expected["weights"].keys()
    for name, value in expected["weights"].items():
        np.testing.assert_array_equal(got["weights"][name], value, err_msg=f"{name} {kills}")
    assert _leftovers(workdir) == []
    # What the prune and benchmark stages add to the report, whatever the kills hit.
    report = json.loads((workdir / "report.json").read_text())
    task = report["tasks"]["digits"]
    assert (workdir / task["architecture_png"]).stat().st_size > 0
    assert task["tflite"]["float32"]["latency_ms"] > 0
    assert task["teacher_tflite"]["float32"]["latency_ms"] > 0
    assert report["bundle"]["latency"]["float32"]["digits"] > 0
    assert (workdir / report["deployment_png"]).stat().st_size > 0
    export = workdir / "tasks" / "digits" / "export"
    assert json.loads((export / "export.json").read_text())["artefacts"]["nettailor_float32"]

    # A restart from the student stage throws away the student and everything
    # made from it (plan, fine-tuned weights, exports); killed in the middle of
    # the new student and again in the new fine-tuning, the run still ends on
    # the very same results: nothing stale is reused, nothing is lost.
    old_plan_time = (workdir / "tasks" / "digits" / "plan.json").stat().st_mtime_ns
    restart_kills = [_run_and_kill(workdir, "student stage:", float(rng.uniform(0.5, 2.5)),
                                   "--restart_from=student"),
                     _run_and_kill(workdir, "finetune stage:", float(rng.uniform(0.1, 2.5)))]
    assert all(restart_kills), restart_kills
    log = _run_to_end(workdir)
    # The kill cut the new fine-tuning short, and the exports of the old one
    # are stale: both are made again.
    assert "finetune stage already done" not in log, log[-3000:]
    assert "export stage already done" not in log, log[-3000:]
    got = _results(workdir)
    assert (workdir / "tasks" / "digits" / "plan.json").stat().st_mtime_ns != old_plan_time
    for key in ("teacher", "student", "gates", "pruned", "flops", "agreement", "plan"):
        assert got[key] == expected[key], (key, "after the restart")
    for name, value in expected["weights"].items():
        np.testing.assert_array_equal(got["weights"][name], value, err_msg=name)
    assert _leftovers(workdir) == []

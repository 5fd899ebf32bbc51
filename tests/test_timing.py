"""LiteRT latency of a signature at batch 1."""
import shutil
import time
import types

import numpy as np
import pytest
from helpers import tiny_static_models

from exporters import savedmodel, tflite, timing
from nettailor_tf.model.student_network import BlockPlan, Plan

SIZE = 16


@pytest.fixture(scope="module")
def tflite_file(tmp_path_factory):
    plan = Plan([BlockPlan(True, [])] * 4)
    (model, _), = tiny_static_models([plan], num_classes=(5,), image_size=SIZE)[0]
    root = tmp_path_factory.mktemp("latency")
    savedmodel.write_savedmodel(str(root / "sm"), {savedmodel.SERVING_KEY:
                                                   savedmodel.Endpoint(model, SIZE, False)})
    path = str(root / "m.tflite")
    with open(path, "wb") as f:
        f.write(tflite.convert(str(root / "sm"), [savedmodel.SERVING_KEY], "float32"))
    return path


def test_median_of_timed_runs(tflite_file):
    image = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    result = timing.measure(tflite_file, image, threads=1, runs=60, warmup=3)
    assert result.runs == 60 and result.threads == 1
    assert 0 < result.median_ms < 1000


def test_parts_in_several_files_run_on_their_own_files_interpreter(monkeypatch, tflite_file,
                                                                  tmp_path):
    """The table's branches come in several files (one conversion of all of
    them took longer): each part runs on the one interpreter of its file."""
    other = tmp_path / "other.tflite"
    shutil.copy(tflite_file, other)
    used = {}

    def fake_invoker(path, feed, threads, key, interpreter=None, refresh=False):
        used[key] = (path, interpreter)
        return (lambda: None, lambda: None) if refresh else (lambda: None)

    monkeypatch.setattr(timing, "_invoker", fake_invoker)
    files = {"stem": tflite_file, "universal0": str(other), "head": tflite_file}
    timing.measure_parts_and_networks(files, {key: {} for key in files}, {}, None, threads=1,
                                       warmup=0, runs=50, rounds=5)
    assert {key: path for key, (path, _) in used.items()} == files
    assert used["stem"][1] is used["head"][1]
    assert used["stem"][1] is not used["universal0"][1]


def test_the_figures_are_the_timed_runs_median_and_10th_and_90th_percentiles(monkeypatch):
    """On a scripted clock: three slow warm-up runs (500 ms) that must not be
    counted, then 60 timed runs of 1..60 ms in a shuffled order."""
    timed = list(np.random.default_rng(0).permutation(np.arange(1, 61)))
    durations = [500.0] * 3 + [float(ms) for ms in timed]
    clock = {"now": 0.0}

    def invoke():
        clock["now"] += durations.pop(0) / 1e3

    monkeypatch.setattr(timing, "_invoker", lambda *args, **kwargs: invoke)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(
        perf_counter=lambda: clock["now"], process_time=time.process_time))
    image = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    result = timing.measure("unused.tflite", image, threads=1, runs=60, warmup=3)
    assert durations == []  # every scripted run was made, none more
    assert result.runs == 60
    # Sorted 1..60: the median of the middle two, the 7th and the 55th.
    assert (result.median_ms, result.p10_ms, result.p90_ms) == pytest.approx((30.5, 7.0, 55.0))


def test_a_bigger_input_takes_longer(tflite_file):
    """The in-graph resize makes the latency depend on the input size: a
    sanity check that the timed call really runs the graph."""
    small = timing.measure(tflite_file, np.zeros((1, SIZE, SIZE, 3), np.uint8), 1, runs=50)
    big = timing.measure(tflite_file, np.zeros((1, 1024, 1024, 3), np.uint8), 1, runs=50)
    assert big.median_ms > small.median_ms


def test_too_few_runs_or_a_batch_are_refused(tflite_file):
    with pytest.raises(ValueError, match="at least 50"):
        timing.measure(tflite_file, np.zeros((1, SIZE, SIZE, 3), np.uint8), 1, runs=10)
    with pytest.raises(ValueError, match=r"\[1, H, W, 3\]"):
        timing.measure(tflite_file, np.zeros((4, SIZE, SIZE, 3), np.uint8), 1)


def test_all_cores_is_positive():
    assert timing.all_cores() >= 1


def test_other_processes_load_is_measured_and_marks_the_figure_busy(tflite_file):
    import subprocess
    import sys

    if timing._machine_busy_seconds() is None:
        pytest.skip("no /proc/stat on this system")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the interpreter is up and spinning
        result = timing.measure(tflite_file, np.zeros((1, SIZE, SIZE, 3), np.uint8), 1,
                                 runs=2000)
    finally:
        spinner.kill()
        spinner.wait()
    # One core spun the whole time (on 2 cores the timing loop held the other).
    assert result.other_load_cores > 0.5, result
    assert result.busy and result.as_dict()["busy"] is True


def test_parts_and_networks_are_timed_in_the_same_rounds(monkeypatch, tflite_file):
    """A table's parts and the whole networks are interleaved round by
    round (a round: passes over every part in order, each part's inputs
    written just before it, then each network's runs) under one load check."""
    calls = []

    def fake_invoker(path, feed, threads, key, interpreter=None, refresh=False):
        invoke = lambda: calls.append(key)
        return (invoke, lambda: calls.append(f"write {key}")) if refresh else invoke

    monkeypatch.setattr(timing, "_invoker", fake_invoker)
    image = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    feeds = {"stem": {}, "head": {}}
    files = {"teacher": (tflite_file, "teacher"), "pruned": (tflite_file, "pruned")}
    results = timing.measure_parts_and_networks(tflite_file, feeds, files, image, threads=1,
                                                 warmup=0, runs=50, rounds=5)
    # Each network's share starts with untimed runs (the passes evicted it),
    # and the networks take turns to come first after the passes.
    warm = timing.BLOCK_WARMUP
    passes = ["write stem", "stem", "write head", "head"] * 10
    teacher, pruned = ["teacher"] * (warm + 10), ["pruned"] * (warm + 10)
    assert calls == (passes + teacher + pruned + passes + pruned + teacher) * 2 + (
        passes + teacher + pruned)
    assert {r.runs for r in results.values()} == {50}
    assert len({r.other_load_cores for r in results.values()}) == 1

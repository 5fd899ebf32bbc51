"""The benchmark scripts run as a user would run them: real subprocesses, tiny sizes."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _json_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_input_pipeline_reports_pipeline_and_step_throughput(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "input_pipeline.py"), "--task=digits",
         "--backbone=tiny", "--image_size=32", "--batch_size=8", "--warmup=1", "--steps=10",
         "--pipeline_warmup=2", "--pipeline_batches=20"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _json_line(proc.stdout)
    assert result["task"] == "digits" and result["backbone"] == "tiny"
    assert result["image_size"] == 32 and result["batch_size"] == 8
    assert result["pipeline_timed_batches"] == 20
    assert result["pipeline_images_per_second"] > 0
    assert result["teacher_images_per_second"] > 0
    assert result["student_images_per_second"] > 0
    assert result["step_source"] == "measured"
    faster_step = max(result["teacher_images_per_second"], result["student_images_per_second"])
    assert result["pipeline_bound"] == (result["pipeline_images_per_second"] < faster_step)
    # The path that reads the step from train_step.py's JSON is run by
    # test_gpu_check_quick_prints_one_json_object.


def test_gpu_check_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", os.path.join(BENCHMARKS, "gpu_check.sh")], check=True)


def test_gpu_check_quick_prints_one_json_object(tmp_path):
    """The CPU path: quick sizes, no install (it would change this environment),
    no quickstart (about 45 s more; `GPU_CHECK_QUICK=1 GPU_CHECK_INSTALL=0 bash
    benchmarks/gpu_check.sh` runs it too)."""
    bash = shutil.which("bash")
    if bash is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path / "out"
    proc = subprocess.run(
        [bash, os.path.join(BENCHMARKS, "gpu_check.sh")], cwd=tmp_path,
        env=_env(OUT=str(out), GPU_CHECK_QUICK="1", GPU_CHECK_INSTALL="0",
                 GPU_CHECK_QUICKSTART="0", PYTHON=sys.executable, TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] and result["failed"] == []
    assert result["quick"] is True and result["install"] == "skipped"
    assert isinstance(result["gpu"], bool)
    if not result["gpu"]:
        assert result["tf_gpus"] == []
    assert result["tf_version"]
    assert result["sizes"]["backbone"] == "tiny"
    assert result["train_step"]["teacher_images_per_second"] > 0
    assert result["train_step"]["student_images_per_second"] > 0
    pipeline = result["input_pipeline"]
    assert pipeline["pipeline_images_per_second"] > 0
    # The pipeline is judged against the train step measured just before.
    assert pipeline["step_source"] != "measured"
    assert (pipeline["teacher_images_per_second"]
            == result["train_step"]["teacher_images_per_second"])
    assert isinstance(pipeline["pipeline_bound"], bool)
    assert result["quickstart"] is None
    assert any(s.startswith("quickstart:") for s in result["skipped"])
    assert any(s.startswith("install:") for s in result["skipped"])
    # The scratch folder (per-step outputs) is removed at exit.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gpu_check.")]


def test_seed_study_runs_each_seed_and_summarises_mean_and_spread(tmp_path):
    flagfile = tmp_path / "tiny.cfg"
    flagfile.write_text("\n".join([
        "--tasks=digits", "--backbone=tiny", "--backbone_weights=random", "--image_size=16",
        "--teacher_epochs=1", "--student_epochs=1", "--finetune_epochs=1", "--teacher_lr=0.05",
        "--prune_universal=1", "--log_every=50", "--teacher_min_steps=0",
        "--student_min_steps=0", "--finetune_min_steps=0", "--noteacher_plateau"]))
    markdown = tmp_path / "seeds.md"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "seeds.py"), f"--flagfile={flagfile}",
         "--seeds=0,1", f"--workdir={tmp_path / 'runs'}", f"--markdown={markdown}",
         f"--results={tmp_path / 'seeds.json'}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = _json_line(proc.stdout)
    assert row["task"] == "digits" and row["seeds"] == [0, 1]
    reports = [json.loads((tmp_path / "runs" / f"seed{s}" / "report.json").read_text())
               for s in (0, 1)]
    teachers = [r["tasks"]["digits"]["teacher"]["accuracy"] for r in reports]
    pruned = [r["tasks"]["digits"]["pruned"]["accuracy"] for r in reports]
    assert row["teacher"]["values"] == teachers and row["pruned"]["values"] == pruned
    assert row["teacher"]["mean"] == pytest.approx(sum(teachers) / 2)
    assert row["pruned"]["std"] == pytest.approx(abs(pruned[0] - pruned[1]) / 2 ** 0.5)
    assert row["pruned_minus_teacher"] == pytest.approx([p - t for p, t in zip(pruned, teachers)])
    # The seed reaches every stage: other validation images, other gates.
    gates = [r["tasks"]["digits"]["student"]["gates"] for r in reports]
    assert gates[0] != gates[1]
    text = markdown.read_text()
    assert "| digits |" in text and "seed 0:" in text and "seed 1:" in text
    # --results: what docs/results/seed_study.json holds, and the docs render from it.
    results = json.loads((tmp_path / "seeds.json").read_text())
    assert results["seeds"] == [0, 1] and results["tasks"]["digits"]["pruned"] == row["pruned"]
    assert results["command"].startswith("python benchmarks/seeds.py --flagfile=")
    assert results["machine"] and results["date"]
    sys.path.insert(0, BENCHMARKS)
    try:
        import renderers
    finally:
        sys.path.pop(0)
    assert "| digits |" in renderers.seed_study_page(results)
    assert "| digits |" in renderers.seed_study_summary(results)



def test_seed_study_refuses_a_missing_flagfile(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "seeds.py"), "--flagfile=/no/such.cfg"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--flagfile=/no/such.cfg: no such file" in proc.stderr


def _time_like_benchmark_model(model_path, runs=60):
    """What LiteRT's benchmark_model prints for a file, measured here with the
    Python interpreter on random inputs (the tool itself runs on devices)."""
    import time

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=model_path, num_threads=1).get_signature_runner()
    rng = np.random.default_rng(0)
    feed = {name: (rng.integers(0, 256, d["shape"], dtype=np.uint8) if d["dtype"] == np.uint8
                   else rng.standard_normal(d["shape"]).astype(np.float32))
            for name, d in runner.get_input_details().items()}
    runner(**feed)
    start = time.perf_counter()
    for _ in range(runs):
        runner(**feed)
    average_us = (time.perf_counter() - start) / runs * 1e6
    return (f"Inference timings in us: Init: 1000, First inference: 900, Warmup (avg): "
            f"{average_us:.1f}, Inference (avg): {average_us:.3f}\n")


def test_latency_table_from_device_files_round_trips(tmp_path):
    """The phone route of BUILD.md: one file per branch (and the two whole
    networks), timed one by one as benchmark_model would, collected into a
    table that a run accepts as --latency_table."""
    script = os.path.join(BENCHMARKS, "latency_table.py")
    common = ["--backbone=tiny", "--image_size=16", "--max_skip=1"]
    models = tmp_path / "branches"
    proc = subprocess.run([sys.executable, script, "models", *common, f"--out={models}"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in models.glob("*.tflite"))
    assert {"stem.tflite", "head.tflite", "universal0.tflite", "proxy1_from1.tflite",
            "network_teacher.tflite", "network_student.tflite"} <= set(files)
    assert (models / "run_all.sh").read_text().count("benchmark_model") >= 1
    for name in files:
        (models / name.replace(".tflite", ".txt")).write_text(
            _time_like_benchmark_model(str(models / name)))
    # collect in this process (its command line is the same argparse as above).
    sys.path.insert(0, BENCHMARKS)
    try:
        import latency_table as script_module
    finally:
        sys.path.pop(0)
    table_path = tmp_path / "table.json"
    script_module.main(["collect", *common, f"--results={models}", "--device=test machine",
                        f"--out={table_path}"])
    from nettailor_tf.latency import table as latency_table

    table = latency_table.LatencyTable.load(str(table_path))
    assert table.device == "test machine" and len(table.entries) == len(files)
    # the whole networks were collected: the teacher, the full student, the
    # samples.  (Not asserted through the fit: these 16 px networks take a
    # few microseconds, and on a loaded machine a network timed here can come
    # out under the empty model's time, which the fit rightly refuses.)
    assert len(table.calibration_networks()) == 2 + latency_table.SAMPLE_PLANS
    # A branch's .txt missing: the table is refused in one line naming it.
    (models / "universal0.txt").unlink()
    with pytest.raises(SystemExit) as refused:
        script_module.main(["collect", *common, f"--results={models}",
                            f"--out={tmp_path / 'other.json'}"])
    assert "universal0" in str(refused.value) and "\n" not in str(refused.value)


def test_the_prune_signal_table_is_its_committed_results(tmp_path):
    """docs/prune_signals.md is rendered from docs/results/prune_signals.json:
    a figure changed in one and not the other fails here."""
    out = tmp_path / "signals.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "prune_signals.py"),
                           "--render=" + os.path.join(ROOT, "docs", "results",
                                                      "prune_signals.json"),
                           f"--markdown={out}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(ROOT, "docs", "prune_signals.md"), encoding="utf-8") as f:
        assert out.read_text() == f.read()
    assert "| mnist5k | 0 | 9 | 0.596 |" in out.read_text()


def test_the_cluttered_digits_folder_is_ten_classes_and_the_same_for_a_seed(tmp_path):
    def make(out, seed):
        proc = subprocess.run(
            [sys.executable, os.path.join(BENCHMARKS, "make_cluttered_digits.py"),
             f"--out={out}", "--train_per_class=2", "--test_per_class=1", f"--seed={seed}"],
            env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(out) for f in files}

    first, again = make(tmp_path / "a", 0), make(tmp_path / "b", 0)
    assert sorted(first) == sorted(again) and first == again
    assert sorted({name.split(os.sep)[1] for name in first}) == [str(d) for d in range(10)]
    assert sum(name.startswith("train") for name in first) == 20 and len(first) == 30

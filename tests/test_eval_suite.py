"""The evaluation suite: its maker and its page, without training anything."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import renderers  # noqa: E402
import suite_records  # noqa: E402
import make_eval_suite  # noqa: E402


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_the_suite_has_its_classes_and_counts_and_is_the_same_for_a_seed(tmp_path):
    counts = make_eval_suite.write_suite(str(tmp_path / "a"))
    make_eval_suite.write_suite(str(tmp_path / "b"))
    first, again = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first == again
    assert counts == {"cluttered": 700, "textures": 600, "faces": 200}
    for task, (classes, train, test) in make_eval_suite.LAYOUT.items():
        for split, per_class in (("train", train), ("test", test)):
            for cls in classes:
                names = [n for n in first if n.startswith(os.path.join(task, split, cls, ""))]
                assert len(names) == per_class, (task, split, cls)
        assert sorted(os.listdir(tmp_path / "a" / task / "train")) == sorted(classes)
    make_eval_suite.write_textures(str(tmp_path / "c"), 2, 1, seed=1)
    other = _files(tmp_path / "c")
    assert len(other) == 24
    assert all(other[name] != first[os.path.join("textures", name)] for name in other)


def test_the_maker_refuses_to_mix_into_an_existing_suite(tmp_path):
    (tmp_path / "textures").mkdir()
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "make_eval_suite.py"),
                           f"--out={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "exists" in proc.stderr


def test_the_suite_page_is_its_committed_results(tmp_path):
    """docs/eval_suite.md is rendered from docs/results/eval_suite.json: a
    figure changed in one and not the other fails here."""
    out = tmp_path / "suite.md"
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "eval_suite.py"),
                           "--render=" + os.path.join(ROOT, "docs", "results", "eval_suite.json"),
                           f"--markdown={out}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(ROOT, "docs", "eval_suite.md"), encoding="utf-8") as f:
        assert out.read_text() == f.read()


def _stat(values):
    return {"mean": sum(values) / len(values), "std": 0.0, "values": values}


def test_a_large_gap_and_a_student_near_chance_are_findings():
    row = {"classes": 10, "train_images": 500, "test_images": 200, "description": "digits.",
           "teacher": _stat([0.80, 0.80]), "student": _stat([0.15, 0.78]),
           "pruned": _stat([0.79, 0.77]), "pruned_flops_fraction": _stat([0.5, 0.6]),
           "pruned_minus_teacher": [-0.01, -0.03]}
    data = {"seeds": [20, 21], "development_tasks": ["mnist5k", "digits"], "tasks": {"t": row},
            "machine": {"cpu": "x", "cores": 2}, "date": "d", "code": "c", "command": "cmd"}
    text = renderers.eval_suite_page(data)
    assert "t, seed 21: the pruned network ends 3.0 points below its teacher" in text
    assert "t, seed 20: the student reaches 15.0%, near chance (10.0%)" in text
    assert "| t **(2 of 2 seeds: findings)** |" in text
    assert "**-3.0**" in text and "+-1.0" not in text and "-1.0" in text
    row["student"], row["pruned_minus_teacher"] = _stat([0.75, 0.78]), [-0.01, 0.0]
    assert "None: no pruned network" in renderers.eval_suite_page(data)


def test_tuning_seeds_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "eval_suite.py"),
                           "--seeds=0,20", f"--workdir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "chose or reported the defaults" in proc.stderr
    assert not os.listdir(tmp_path)
    json.dumps(suite_records.machine())


def test_a_resume_that_ran_nothing_keeps_the_measured_minutes(tmp_path):
    seed_dir = str(tmp_path)
    assert suite_records.ledger_time(seed_dir) == 0.0
    assert suite_records.record_minutes(seed_dir, "teacher,student", 12.3, ran=True) == {
        "teacher,student": 12.3}
    assert suite_records.record_minutes(seed_dir, "teacher,student", 0.1, ran=False) == {
        "teacher,student": 12.3}
    (tmp_path / "tasks" / "t").mkdir(parents=True)
    (tmp_path / "tasks" / "t" / "ledger.json").write_text("{}")
    assert suite_records.ledger_time(seed_dir) > 0

"""benchmarks/collect_runs.py: finished runs' reports into one results file."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
SCRIPT = os.path.join(ROOT, "benchmarks", "collect_runs.py")


def _workdir(path, pruned=True):
    task = {"teacher": {"accuracy": 0.98, "val_accuracy": 0.97, "flops": 100},
            **({"pruned": {"accuracy": 0.975, "val_accuracy": 0.965, "flops": 48, "steps": 640,
                           "stopped": "plateau", "val_loss": 0.081,
                           "prune_search": {"chosen": 9, "rule": "allowance"}}}
               if pruned else {})}
    path.mkdir()
    (path / "report.json").write_text(json.dumps({"tasks": {"digits": task}}))
    return path


def test_each_tasks_choice_and_accuracies_become_a_row(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, SCRIPT, f"--out={out}", "--note=n",
                          f"--run=plateau|3|{_workdir(tmp_path / 'a')}|--finetune_plateau"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert results["machine"] and results["date"] and "--seed=SEED" in results["command"]
    row, = results["rows"]
    assert row == {"label": "plateau", "seed": 3, "task": "digits",
                   "flags": ["--finetune_plateau"], "chosen": 9, "rule": "allowance",
                   "flops_fraction": 0.48, "finetune_steps": 640, "stopped": "plateau",
                   "teacher_val": 0.97, "teacher_test": 0.98, "pruned_val": 0.965,
                   "pruned_test": 0.975, "pruned_val_loss": 0.081}


@pytest.mark.parametrize("spec,message", [("only|two", "expected label|seed|workdir|flags"),
                                          ("x|0|{unfinished}|", "no fine-tuned pruned network")])
def test_a_bad_run_is_one_line_naming_it(tmp_path, spec, message):
    spec = spec.format(unfinished=_workdir(tmp_path / "u", pruned=False))
    run = subprocess.run([sys.executable, SCRIPT, f"--out={tmp_path / 'o.json'}",
                          f"--run={spec}"], capture_output=True, text=True)
    assert run.returncode != 0 and message in run.stderr
    assert not (tmp_path / "o.json").exists()

"""The command line, run as a user runs it: a real subprocess."""
import json
import subprocess
import sys

import pytest

TINY = ["--backbone=tiny", "--backbone_weights=random", "--image_size=16", "--tasks=digits",
        "--teacher_epochs=1", "--teacher_lr=0.05", "--student_epochs=2", "--finetune_epochs=1",
        "--prune_universal=1", "--log_every=5", "--checkpoint_every=10"]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nettailor_tf.main", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_stages_stop_resume_and_are_skipped_when_done(tmp_path):
    flagfile = tmp_path / "run.cfg"
    flagfile.write_text("# a comment line\n" + "\n".join(TINY + [f"--workdir={tmp_path / 'w'}"]))

    stopped = run_cli(f"--flagfile={flagfile}", "--max_steps=12")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped at step 12" in stopped.stderr
    assert not (tmp_path / "w" / "digits" / "teacher.weights.h5").exists()

    # The teacher finishes (44 steps); the student (88 steps) stops at 50.
    resumed = run_cli(f"--flagfile={flagfile}", "--max_steps=50")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "(step 12 of 44)" in resumed.stderr
    assert "student stopped at step 50" in resumed.stderr

    resumed = run_cli(f"--flagfile={flagfile}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "teacher stage already done" in resumed.stderr
    assert "(step 50 of 88)" in resumed.stderr
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    teacher = report["tasks"]["digits"]["teacher"]
    assert report["backbone"] == "tiny" and report["image_size"] == 16
    assert report["tasks"]["digits"]["num_classes"] == 10
    assert 0.0 <= teacher["accuracy"] <= 1.0 and teacher["steps"] == 44
    assert teacher["params"] == 10_952 + 16 * 10 + 10
    assert teacher["flops"] > 0
    assert (tmp_path / "w" / "digits" / "teacher.weights.h5").exists()
    assert "fine-tuned teacher" in (tmp_path / "w" / "report.md").read_text()
    assert list((tmp_path / "w" / "tensorboard" / "digits" / "teacher").iterdir())

    assert "pruned" in report["tasks"]["digits"]
    again = run_cli(f"--flagfile={flagfile}")
    assert again.returncode == 0
    for stage in ("teacher", "student", "prune", "finetune"):
        assert f"{stage} stage already done" in again.stderr


@pytest.mark.parametrize("args,expected", [
    (["--backbone=resnet9"], "--backbone='resnet9' is not one of"),
    (["--tasks=foo"], "foo"),
    (["--image_size=2"], "--image_size=2 is too small for tiny"),
    (["--stages=teacher,distill"], "--stages: unknown stage 'distill'"),
    (["--strategy=horovod"], "--strategy='horovod' is not one of"),
    (["--teacher_lr=-1"], "--teacher_lr=-1.0 must be in (0, 10]"),
    (["--backbone_weights=/no/such.pth"], "--backbone_weights='/no/such.pth': no such file"),
    (["--flagfile=/no/such.cfg"], "--flagfile=/no/such.cfg: no such file"),
    (["--backbone=resnet34", "--backbone_weights=imagenet"], "no packaged ImageNet weights"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, expected):
    proc = run_cli(*TINY, f"--workdir={tmp_path / 'w'}", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("nettailor_tf: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

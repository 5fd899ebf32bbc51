"""The command line, run as a user runs it: a real subprocess."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import run_in_process

TINY = ["--backbone=tiny", "--backbone_weights=random", "--image_size=16", "--tasks=digits",
        "--teacher_epochs=1", "--teacher_lr=0.05", "--student_epochs=2", "--finetune_epochs=1",
        "--prune_universal=1", "--log_every=5", "--checkpoint_every=10",
        "--teacher_min_steps=0", "--student_min_steps=0", "--finetune_min_steps=0",
        "--stages=teacher,student,prune,finetune", "--noteacher_plateau"]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nettailor_tf.main", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_stages_stop_resume_and_are_skipped_when_done(tmp_path):
    flagfile = tmp_path / "run.cfg"
    # Teacher and student only: test_faults.py runs every stage through the CLI.
    flagfile.write_text("# a comment line\n" + "\n".join(
        TINY + [f"--workdir={tmp_path / 'w'}", "--stages=teacher,student"]))

    stopped = run_cli(f"--flagfile={flagfile}", "--max_steps=12")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped at step 12" in stopped.stderr
    # A quiet log: the stages said with their number, steps with the time
    # left, and none of TensorFlow's start-up notices or internals.
    assert "stage 1 of 2: teacher for 1 task" in stopped.stderr
    # Its first lines say which CPU kernels run and who chose them.
    assert "CPU kernels: oneDNN " in stopped.stderr
    for noise in ("cuInit", "oneDNN custom operations", "Sharding callback"):
        assert noise not in stopped.stderr
    assert not (tmp_path / "w" / "tasks" / "digits" / "teacher.weights.h5").exists()

    # The teacher resumes at step 12 of its 40 (1,293 training images after the
    # validation split, batch 32) and every later stage runs.
    resumed = run_cli(f"--flagfile={flagfile}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "(step 12 of 40)" in resumed.stderr
    # A few step lines per stage, each with the time the stage still needs.
    assert re.search(r"step \d+/40 .* eta \d+ s", resumed.stderr)
    # The second stage's line estimates the rest of the run from the first's pace.
    assert re.search(r"stage 2 of 2: student for 1 task \(\d+ s into the run(, about \d+ s "
                     r"left)?\)", resumed.stderr)
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    teacher = report["tasks"]["digits"]["teacher"]
    assert report["backbone"] == "tiny" and report["image_size"] == 16
    assert report["tasks"]["digits"]["num_classes"] == 10
    assert 0.0 <= teacher["accuracy"] <= 1.0 and teacher["steps"] == 40
    assert teacher["params"] == 10_952 + 16 * 10 + 10
    assert teacher["flops"] > 0
    assert (tmp_path / "w" / "tasks" / "digits" / "teacher.weights.h5").exists()
    assert "fine-tuned teacher" in (tmp_path / "w" / "report.md").read_text()
    assert list((tmp_path / "w" / "tensorboard" / "digits" / "teacher").iterdir())

    assert "student" in report["tasks"]["digits"]
    again = run_cli(f"--flagfile={flagfile}")
    assert again.returncode == 0
    for stage in ("teacher", "student"):
        assert f"{stage} stage already done" in again.stderr


# A few cases as real processes: the exit code and "no traceback" of the
# whole program, a missing flagfile (checked before absl parses anything) and
# a strategy conflict (checked before TensorFlow touches a device).
@pytest.mark.parametrize("args,expected", [
    (["--backbone=resnet9"], "--backbone=resnet9: value should be one of <efficientnet_lite0|"),
    (["--image_size=abc"], "--image_size=abc: invalid literal for int()"),
    (["--flagfile=/no/such.cfg"], "--flagfile=/no/such.cfg: no such file"),
    (["--num_cpu_devices=2"], "--num_cpu_devices=2 splits the CPU for a multi-replica"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, expected):
    proc = run_cli(*TINY, f"--workdir={tmp_path / 'w'}", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("nettailor_tf: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _truncated_weights(tmp_path):
    from nettailor_tf.model.pretrained import packaged_weights_path

    data = open(packaged_weights_path("efficientnet_lite0"), "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 3])
    return str(path)


def _malicious_weights(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv.weight": Payload()}))
    return str(path)


def _corrupt_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / cls / f"{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"not an image" * 20)
    return f"folder:{root}"


def _packaged_efficientnet(tmp_path):
    from nettailor_tf.model.pretrained import packaged_weights_path

    return packaged_weights_path("efficientnet_lite0")


# (flags, expected text of the one error line).  Each row is a row of the
# README's "What happens when ..." table.
IN_PROCESS_CASES = {
    "unknown task": (["--tasks=foo"], "foo"),
    "unknown stage": (["--stages=teacher,distill"], "unknown stage 'distill'; accepted: teacher,"),
    "unknown strategy": (["--strategy=horovod"], "--strategy=horovod: value should be one of"),
    "learning rate out of range": (["--teacher_lr=-1"], "--teacher_lr=-1.0: must be in (0, 10]"),
    "coefficient out of range": (["--complexity_coeff=-1"],
                                 "--complexity_coeff=-1.0: must be in [0, 100]"),
    "threshold out of range": (["--prune_proxy_threshold=1.5"],
                               "--prune_proxy_threshold=1.5: must be in [0, 1)"),
    "negative seed": (["--seed=-1"], "--seed=-1: must be in [0, 2147483647]"),
    "strategy without its machine": (["--strategy=tpu"], "--strategy=tpu: cannot start on "
                                                         "this machine"),
    "max_skip neither a number nor dense": (["--max_skip=wide"],
                                            "--max_skip=wide: must be a positive integer or "
                                            "'dense'"),
    "image too small": (["--image_size=2"], "--image_size=2 is too small for tiny"),
    "conflicting flags": (["--prune_search", "--prune_universal=2"],
                          "--prune_search chooses the number of universal blocks"),
    "weights file missing": (["--backbone_weights=/no/such.pth"],
                             "--backbone_weights='/no/such.pth': no such file"),
    "no packaged weights": (["--backbone=resnet34", "--backbone_weights=imagenet"],
                            "no packaged ImageNet weights"),
    "student without teacher": (["--stages=student"], "no teacher at"),
    "truncated weights": ([lambda p: f"--backbone_weights={_truncated_weights(p)}",
                           "--backbone=efficientnet_lite0", "--image_size=32"], "truncated.pth"),
    "weights of another backbone": ([lambda p: f"--backbone_weights={_packaged_efficientnet(p)}",
                                     "--backbone=resnet18", "--image_size=32"], "resnet18"),
    "pickle that runs code": ([lambda p: f"--backbone_weights={_malicious_weights(p)}",
                               "--backbone=resnet18", "--image_size=32"], "evil.pth"),
    "corrupt image": ([lambda p: f"--tasks={_corrupt_folder(p)}"], "corrupt image"),
    "workdir is not a directory": ([lambda p: f"--workdir={_a_file(p)}/run"],
                                   "cannot write to --workdir="),
    "workdir made with another backbone": (
        [lambda p: _workdir_made_with(p, backbone="efficientnet_lite0")],
        "was made with --backbone=efficientnet_lite0 (now tiny)"),
    "workdir made with another image size": (
        [lambda p: _workdir_made_with(p, image_size=32)], "--image_size=32 (now 16)"),
    "workdir made with another max_skip": (
        [lambda p: _workdir_made_with(p, max_skip="dense")], "--max_skip=dense (now 3)"),
    "submission for a task outside the decathlon": (
        ["--stages=submission"], "task 'digits' is not a Visual Decathlon task"),
    "decathlon annotation file missing": (
        ["--tasks=tfds:visual_domain_decathlon/svhn", "--stages=submission",
         lambda p: f"--decathlon_annotations={p}"], "no svhn_test_stripped.json in it"),
}


def _workdir_made_with(tmp_path, **settings):
    """A workdir whose first run used `settings` (the rest as TINY has them)."""
    workdir = tmp_path / "earlier"
    workdir.mkdir()
    record = {"backbone": "tiny", "backbone_weights": "random", "image_size": 16, "max_skip": 3,
              "universal_bn": "frozen", **settings}
    (workdir / "settings.json").write_text(json.dumps(record))
    return f"--workdir={workdir}"


def _a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return str(path)


@pytest.mark.parametrize("case", list(IN_PROCESS_CASES))
def test_bad_input_in_process(tmp_path, capsys, case):
    args, expected = IN_PROCESS_CASES[case]
    args = [a(tmp_path) if callable(a) else a for a in args]
    code, err = run_in_process(capsys, *TINY, f"--workdir={tmp_path / 'w'}", *args)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("nettailor_tf: error:"), err[-2000:]
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "pwned").exists()


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """No space left: the first write fails with the errno's words and the path."""
    import errno

    from nettailor_tf.common import atomic

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(atomic, "write_text", full)
    code, err = run_in_process(capsys, *TINY, f"--workdir={tmp_path / 'w'}")
    assert code == 2
    # The first file a run writes records the settings the workdir is made with.
    assert "No space left on device" in err and "settings.json" in err


def test_a_failed_read_names_the_file_and_is_no_write_failure(tmp_path, capsys):
    """A folder where the workdir's settings record should be: reading it
    fails (also for root, unlike a file without read permission)."""
    workdir = tmp_path / "w"
    (workdir / "settings.json").mkdir(parents=True)
    code, err = run_in_process(capsys, *TINY, f"--workdir={workdir}")
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert lines[0] == (f"nettailor_tf: error: cannot access {workdir / 'settings.json'}: "
                        f"Is a directory; it must be a readable file (and writable, inside "
                        f"--workdir={workdir})")


def _invalid_argument_from_a_run(monkeypatch, make_error):
    """`stages.run` raising the InvalidArgumentError `make_error()` returns."""
    import tensorflow as tf

    from nettailor_tf import stages

    try:
        make_error()
    except tf.errors.InvalidArgumentError as error:
        raised = error

    def run(config, strategy):
        raise raised

    monkeypatch.setattr(stages, "run", run)
    return raised


def test_a_data_check_is_one_line_naming_the_task(tmp_path, capsys, monkeypatch):
    from data_helpers import hand_made_task, numpy_batches

    from nettailor_tf import data

    task = hand_made_task([0, 5, 1], num_classes=3, name="badlabels")
    _invalid_argument_from_a_run(monkeypatch, lambda: numpy_batches(data.eval_pipeline(task, 8, 2)))
    code, err = run_in_process(capsys, *TINY, f"--workdir={tmp_path / 'w'}")
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and lines == [
        "nettailor_tf: error: task 'custom:badlabels' (badlabels): label outside [0, 3) -- the "
        "data does not match num_classes"], err[-2000:]


def test_another_invalid_argument_error_is_a_bug_and_keeps_its_traceback(tmp_path, capsys,
                                                                       monkeypatch):
    """Not the data pipeline's check: TensorFlow's own (a wrong reshape)."""
    import tensorflow as tf
    from absl import flags

    from nettailor_tf import main as cli

    raised = _invalid_argument_from_a_run(monkeypatch, lambda: tf.reshape(tf.zeros([3]), [2]))
    flags.FLAGS.unparse_flags()
    try:
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            cli.main(cli.parse_flags(["nettailor_tf", *TINY, f"--workdir={tmp_path / 'w'}"]))
    finally:
        flags.FLAGS.unparse_flags()
    assert caught.value is raised  # not a SystemExit with one line
    assert "nettailor_tf: error:" not in capsys.readouterr().err


def test_running_out_of_memory_names_the_flags_to_lower(tmp_path):
    """A real allocation failure: the CLI under a 6 GiB address-space limit,
    asked for batches of 256 images of 600x600 (each 1.1 GB as float32)."""
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    # oneDNN's allocator waits 10 s before each failed allocation is given up
    # (the same line comes out after about a minute); the plain one fails at once.
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "nettailor_tf.main", f"--workdir={tmp_path / 'w'}",
         "--backbone=tiny", "--backbone_weights=random", "--tasks=digits", "--stages=teacher",
         "--image_size=600", "--teacher_batch_size=256", "--teacher_min_steps=0"],
        capture_output=True, text=True, timeout=300, env=env, preexec_fn=limit_memory)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nettailor_tf: error: out of memory at --image_size=600 with "
                           "batches of 256/"), proc.stderr[-3000:]
    assert "lower --<stage>_batch_size or --image_size" in last
    assert "Traceback" not in proc.stderr


def test_the_help_lists_every_backbone():
    proc = run_cli("--helpfull", timeout=120)
    from nettailor_tf.settings.config import BACKBONES

    # The --backbone entry, its wrapped lines joined: <name|name|...>.
    entry = proc.stdout[proc.stdout.index("--backbone:"):]
    entry = re.sub(r"\n\s+", "", entry[:entry.index("(default")])
    listed = re.search(r"<([a-z0-9_|]+)>", entry).group(1).split("|")
    assert listed == list(BACKBONES)


def test_a_second_run_on_a_busy_workdir_refuses_at_once_naming_the_first(tmp_path):
    import time

    from nettailor_tf.run.workdir import Workdir

    with Workdir(str(tmp_path / "w")).lock():
        started = time.monotonic()
        proc = run_cli(*TINY, f"--workdir={tmp_path / 'w'}", timeout=120)
        took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("nettailor_tf: error:")]
    assert len(errors) == 1 and f"is in use by another run (pid {os.getpid()} on" in errors[0]
    assert "Traceback" not in proc.stderr and took < 30
    assert not (tmp_path / "w" / "tasks").exists()  # nothing of the second run was written


def test_a_task_named_bundle_keeps_its_files(tmp_path):
    """A folder task called `bundle` next to the multi-task bundle of the export stage."""
    from PIL import Image

    root = tmp_path / "bundle"
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 10)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                pixels[..., 0] = 250 if cls == "a" else 5
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    workdir = tmp_path / "w"
    proc = run_cli(*TINY, f"--workdir={workdir}", f"--tasks=folder:{root}",
                   "--stages=teacher,student,prune,finetune,export",
                   "--export_variants=float32", "--bundle_variants=float32",
                   "--teacher_variants=float32", "--parity_min_agreement=0", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = workdir / "tasks" / "bundle"
    for name in ("teacher.weights.h5", "student.npz", "plan.json", "nettailor.npz",
                 "export/nettailor_float32.tflite"):
        assert (task / name).exists(), name
    assert (workdir / "bundle" / "bundle_float32.tflite").exists()
    report = json.loads((workdir / "report.json").read_text())
    for key in ("teacher", "student", "pruned", "tflite"):
        assert key in report["tasks"]["bundle"]

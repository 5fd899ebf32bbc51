"""Every path in a run's folder, and the record that keeps one folder to one setup.

Stages, exporters and reports find their files here and nowhere else, so
the layout of a workdir (README, "Outputs") is written in one place.
"""
from __future__ import annotations

import json
import os

from nettailor_tf import atomic
from nettailor_tf.errors import NetTailorError

SETTINGS_RECORD = "settings.json"


class WorkdirError(NetTailorError):
    """The workdir holds results made with other settings."""


class Workdir:
    """The paths of one run's folder."""

    def __init__(self, root: str):
        self.root = root

    # --- run-wide files ---
    @property
    def report_json(self) -> str:
        return os.path.join(self.root, "report.json")

    @property
    def report_md(self) -> str:
        return os.path.join(self.root, "report.md")

    @property
    def random_backbone(self) -> str:
        """The random universal weights of --backbone_weights=random, drawn once."""
        return os.path.join(self.root, "random_backbone.weights.h5")

    @property
    def bundle_dir(self) -> str:
        return os.path.join(self.root, "bundle")

    @property
    def deployment_png(self) -> str:
        return os.path.join(self.root, "deployment.png")

    @property
    def decathlon_results(self) -> str:
        return os.path.join(self.root, "decathlon_results.json")

    def tensorboard(self, task: str, stage: str) -> str:
        return os.path.join(self.root, "tensorboard", task, stage)

    def relative(self, path: str) -> str:
        """`path` as report.json records it: relative to the workdir."""
        return os.path.relpath(path, self.root)

    # --- per task ---
    def task_dir(self, task: str) -> str:
        return os.path.join(self.root, task.replace("/", "_"))

    def _in_task(self, task: str, name: str) -> str:
        return os.path.join(self.task_dir(task), name)

    def checkpoints(self, task: str, stage: str) -> str:
        return self._in_task(task, f"{stage}_ckpt")

    def split_record(self, task: str) -> str:
        return self._in_task(task, "validation_split.json")

    def teacher_weights(self, task: str) -> str:
        return self._in_task(task, "teacher.weights.h5")

    def student_state(self, task: str) -> str:
        return self._in_task(task, "student.npz")

    def plan(self, task: str) -> str:
        return self._in_task(task, "plan.json")

    def prune_search_results(self, task: str) -> str:
        return self._in_task(task, "prune_search.json")

    def prune_search_checkpoints(self, task: str, num_universal: int) -> str:
        return os.path.join(self.task_dir(task), "prune_search", f"n{num_universal}_ckpt")

    def architecture_png(self, task: str) -> str:
        return self._in_task(task, "architecture.png")

    def pruned_state(self, task: str) -> str:
        return self._in_task(task, "nettailor.npz")

    def export_dir(self, task: str) -> str:
        return self._in_task(task, "export")

    def decathlon_predictions(self, task: str) -> str:
        return self._in_task(task, "decathlon_test_predictions.json")

    # --- the settings every result in the folder was made with ---
    def check_settings(self, settings: dict) -> None:
        """Records `settings` on first use and refuses a later run whose
        settings differ: every file in the folder was made with the first."""
        path = os.path.join(self.root, SETTINGS_RECORD)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                try:
                    earlier = json.load(f)
                except json.JSONDecodeError:
                    earlier = None
            if isinstance(earlier, dict):
                changed = [f"--{k}={earlier.get(k)} (now {v})"
                           for k, v in settings.items() if earlier.get(k, v) != v]
                if changed:
                    raise WorkdirError(
                        f"--workdir={self.root} was made with {', '.join(changed)}; its "
                        f"teachers, students and exports belong to those settings. Use another "
                        f"--workdir or the same flags", path=path)
                if all(k in earlier for k in settings):
                    return
        os.makedirs(self.root, exist_ok=True)
        atomic.write_text(path, json.dumps(settings, indent=1) + "\n")


"""Every path in a run's folder, and the records that make it a ledger.

Stages, exporters and reports find their files here and nowhere else, so
the layout of a workdir (README, "Outputs") is written in one place.  The
folder also records what its results were made with: the run's settings
(`settings.json`), each task's data (`tasks/<task>/data.json`) and, per
stage, the fingerprints of the files it read (`tasks/<task>/ledger.json`),
so that a result is never reused for inputs it was not made from.  One run
at a time holds the folder (`lock`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket

from nettailor_tf.common import atomic
from nettailor_tf.common.errors import NetTailorError

SETTINGS_RECORD = "settings.json"
# Task folders live here, where no run-level file or folder (bundle/,
# tensorboard/, report.json, ...) can share their name.
TASKS_FOLDER = "tasks"


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
    def latency_prediction_png(self) -> str:
        return os.path.join(self.root, "latency_prediction.png")

    @property
    def latency_prediction_table(self) -> str:
        return os.path.join(self.root, "latency_prediction_table.json")

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
        return os.path.join(self.root, TASKS_FOLDER, task_folder_name(task))

    def _in_task(self, task: str, name: str) -> str:
        return os.path.join(self.task_dir(task), name)

    def checkpoints(self, task: str, stage: str) -> str:
        return self._in_task(task, f"{stage}_ckpt")

    def data_record(self, task: str) -> str:
        return self._in_task(task, "data.json")

    def ledger(self, task: str) -> "Ledger":
        return Ledger(self._in_task(task, "ledger.json"))

    def teacher_weights(self, task: str) -> str:
        return self._in_task(task, "teacher.weights.h5")

    def student_state(self, task: str) -> str:
        return self._in_task(task, "student.npz")

    def plan(self, task: str) -> str:
        return self._in_task(task, "plan.json")

    def prune_search_results(self, task: str) -> str:
        return self._in_task(task, "prune_search.json")

    def prune_search_dir(self, task: str) -> str:
        return self._in_task(task, "prune_search")

    def prune_search_checkpoints(self, task: str, num_universal: int) -> str:
        return os.path.join(self.prune_search_dir(task), f"n{num_universal}_ckpt")

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
                changed = [_setting_change(k, earlier.get(k), v)
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

    # --- one run at a time ---
    @contextlib.contextmanager
    def lock(self):
        """Holds the workdir for the body; a second run refuses at once with a
        line naming the holder.  The operating system releases the lock when
        the process ends, however it ends."""
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, ".lock")
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
                raise WorkdirError(f"--workdir={self.root} is in use by another run "
                                   f"({holder or 'process unknown'}); wait for it to end or "
                                   f"use another --workdir", path=path) from None
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
        finally:
            os.close(descriptor)


def _setting_change(name: str, before, now) -> str:
    if name.endswith("_sha256"):  # a file's content: the flag may well be the same
        what = name.removesuffix("_sha256").replace("_", " ")
        return f"other {what} (sha256 {str(before)[:12]}, now {str(now)[:12]})"
    return f"--{name}={before} (now {now})"


def task_folder_name(task: str) -> str:
    """The folder of a task inside tasks/: its name, with '/' (a tfds config) as '_'."""
    return task.replace("/", "_")


def fingerprint(path: str) -> str | None:
    """sha256 of a file's bytes, or of a folder's files (names and bytes); None if absent."""
    if not os.path.exists(path):
        return None
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
    for name in files:
        if name != path:
            digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# The ledger's entry for stages that have started and not finished.
_STARTED = "started"


class Ledger:
    """What each stage of a task read: {stage: {input name: fingerprint}}.

    A finished stage whose recorded inputs differ from the current ones is
    stale: its outputs were made from something else and must be redone."""

    def __init__(self, path: str):
        self.path = path

    def _load(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged ledger is rebuilt: the stages check their outputs
        return data if isinstance(data, dict) else {}

    def recorded(self, stage: str, started: bool = False) -> dict | None:
        """What `stage` was made from when it finished (`started`: what its
        unfinished run started from); None if nothing was recorded."""
        data = self._load()
        found = (data.get(_STARTED) or {}).get(stage) if started else data.get(stage)
        return found if isinstance(found, dict) else None

    def record(self, stage: str, inputs: dict, started: bool = False) -> None:
        data = self._load()
        where = data.setdefault(_STARTED, {}) if started else data
        if where.get(stage) == inputs:
            return
        where[stage] = inputs
        self._save(data)

    def forget(self, stage: str) -> None:
        data = self._load()
        finished = data.pop(stage, None)
        started = (data.get(_STARTED) or {}).pop(stage, None)
        if finished is not None or started is not None:
            self._save(data)

    def _save(self, data: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic.write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def remove(paths: list[str]) -> None:
    """Deletes files and folders (a stale stage's outputs); absent ones are fine."""
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


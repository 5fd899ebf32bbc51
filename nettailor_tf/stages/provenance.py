"""Which files each training stage reads and writes, and keeping them current.

Each stage records what it is made from when it starts and when it
finishes (`Ledger`): the data, the content of the files it reads, and the
value of every setting declared to change its results
(`nettailor_tf.settings.stage_settings`, derived from the settings' own declarations).
Before a stage runs, a finished stage whose inputs have changed since (a
teacher retrained, a plan re-pruned with other flags, other data) is stale:
its outputs, checkpoints and report entry are removed and it runs again, and
the change flows down to every stage that read its outputs.  An unfinished
stage whose checkpoints were written under other settings starts over
rather than resuming them.
"""
from __future__ import annotations

import json

from absl import logging

from nettailor_tf.run.report import Report
from nettailor_tf.run.workdir import Workdir, fingerprint, remove
from nettailor_tf.settings.stage_settings import changed_settings, stage_settings

TRAINING_ORDER = ("teacher", "student", "prune", "finetune")
# The report entry that says a stage is done for a task.
REPORT_ENTRY = {"teacher": "teacher", "student": "student", "prune": "architecture_png",
                "finetune": "pruned"}


def _inputs(paths: Workdir, task: str, stage: str) -> dict[str, str]:
    """{name: path} of the files `stage` reads (the run's identity aside)."""
    return {"teacher": {},
            "student": {"teacher": paths.teacher_weights(task)},
            "prune": {"student": paths.student_state(task)},
            "finetune": {"plan": paths.plan(task), "student": paths.student_state(task),
                         "teacher": paths.teacher_weights(task)}}[stage]


def outputs(paths: Workdir, task: str, stage: str) -> list[str]:
    """The files and folders `stage` writes for `task`, checkpoints included."""
    return {"teacher": [paths.teacher_weights(task), paths.checkpoints(task, "teacher")],
            "student": [paths.student_state(task), paths.checkpoints(task, "student")],
            "prune": [paths.plan(task), paths.prune_search_results(task),
                      paths.prune_search_dir(task),
                      paths.architecture_png(task)],
            "finetune": [paths.pruned_state(task), paths.checkpoints(task, "finetune")]}[stage]


# What a record made before settings were recorded holds instead of them.
_EARLIER_SETTING_KEYS = ("settings", "prune_settings", "plateau")


def settings_identity(config, stage: str) -> dict:
    """The settings part of `stage`'s record: every declared setting that
    changes its results, as one canonical JSON text."""
    return {"settings": json.dumps(stage_settings(config, stage), sort_keys=True)}


def input_fingerprints(paths: Workdir, task: str, stage: str, identity: dict) -> dict:
    """What `stage` of `task` is made from: the run's and the data's identity
    and the content of the files it reads."""
    found = {name: fingerprint(path) for name, path in _inputs(paths, task, stage).items()}
    return {**identity, **found}


def invalidate(paths: Workdir, report: Report, task: str, stage: str) -> None:
    """Removes what `stage` made for `task`, so that it runs again."""
    remove(outputs(paths, task, stage))
    entry = report.task(task)
    if REPORT_ENTRY[stage] in entry:
        del entry[REPORT_ENTRY[stage]]
        report.save()
    paths.ledger(task).forget(stage)


def refresh(paths: Workdir, report: Report, task: str, stage: str, identity: dict) -> None:
    """Invalidates `stage` of `task` if what it was made from has changed,
    finished or not; then notes what it starts from, so that checkpoints
    written under these settings are known as such."""
    ledger = paths.ledger(task)
    current = input_fingerprints(paths, task, stage, identity)
    finished = ledger.recorded(stage)
    if finished is not None:
        if "settings" not in finished:
            logging.warning("%s: the %s stage was recorded by an earlier version without its "
                            "settings; a changed setting is not detected for it "
                            "(--restart_from=%s redoes it)", task, stage, stage)
            current = {k: v for k, v in current.items() if k not in _EARLIER_SETTING_KEYS}
            finished = {k: v for k, v in finished.items() if k not in _EARLIER_SETTING_KEYS}
        changed = _changed(finished, current)
        if not changed:
            return
        logging.warning("%s: the %s stage's %s changed since it ran; redoing it", task,
                        stage, ", ".join(changed))
        invalidate(paths, report, task, stage)
    started = ledger.recorded(stage, started=True)
    if started is not None and _changed(started, current):
        logging.warning("%s: the %s stage's checkpoints were written with other %s; starting "
                        "the stage over instead of resuming them", task, stage,
                        ", ".join(_changed(started, current)))
        invalidate(paths, report, task, stage)
    ledger.record(stage, current, started=True)


def _changed(recorded: dict, current: dict) -> list[str]:
    """What differs: an input by name, a setting by its flag."""
    names = []
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) == current.get(key):
            continue
        if key == "settings" and recorded.get(key) and current.get(key):
            names += changed_settings(json.loads(recorded[key]), json.loads(current[key]))
        else:
            names.append(key)
    return names


def record(paths: Workdir, task: str, stage: str, identity: dict) -> None:
    """Notes what a finished `stage` of `task` was made from."""
    paths.ledger(task).record(stage, input_fingerprints(paths, task, stage, identity))

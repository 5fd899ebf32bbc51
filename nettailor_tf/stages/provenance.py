"""Which files each training stage reads and writes, and keeping them current.

Each stage records the fingerprints of its inputs when it finishes
(`Ledger`).  Before a stage runs, a finished stage whose inputs have changed
since (a teacher retrained, a plan re-pruned with other flags, other data) is
stale: its outputs, checkpoints and report entry are removed and it runs
again, and the change flows down to every stage that read its outputs.
"""
from __future__ import annotations

from absl import logging

from nettailor_tf.report import Report
from nettailor_tf.workdir import Workdir, fingerprint, remove

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


# The plateau rule's settings: a stage trained under other ones is redone.
PLATEAU_SETTINGS = ("eval_steps", "plateau_monitor", "plateau_patience", "plateau_factor",
                    "plateau_min_delta",
                    "plateau_cooldown", "plateau_min_lr", "stop_patience", "restore_best")


def schedule_identity(config, stage: str) -> dict:
    """How `stage` decides its own length, for the ledger: the plateau
    rule's settings where it trains by the rule (the prune search's brief
    fine-tunes train by the finetune stage's), nothing for a fixed schedule,
    so that workdirs made before the rule stay current."""
    schedule = {"teacher": config.teacher, "student": config.student,
                "finetune": config.finetune,
                "prune": config.finetune if config.searches_prune
                and config.prune_search_steps != 0 else None}.get(stage)
    if schedule is None or not schedule.plateau:
        return {}
    return {"plateau": {name: getattr(schedule, name) for name in PLATEAU_SETTINGS}}


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
    """Invalidates `stage` of `task` if what it was made from has changed."""
    changed = paths.ledger(task).changed_inputs(
        stage, input_fingerprints(paths, task, stage, identity))
    if changed:
        logging.warning("%s: the %s stage's %s changed since it ran; redoing it", task, stage,
                        ", ".join(changed))
        invalidate(paths, report, task, stage)


def record(paths: Workdir, task: str, stage: str, identity: dict) -> None:
    """Notes what a finished `stage` of `task` was made from."""
    paths.ledger(task).record(stage, input_fingerprints(paths, task, stage, identity))

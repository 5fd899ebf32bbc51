"""The part of a stage's record that comes from the configuration.

Each setting declares the stages whose results it changes (`option(stages=...)`
in `nettailor_tf.settings.config`); a stage's record in the ledger holds the values of
those settings, so that a changed one redoes the stage and a checkpoint
written under other ones is not resumed (`stages.provenance`).
"""
from __future__ import annotations

import dataclasses

from nettailor_tf.settings.config import Config, flag_name, is_schedule
from nettailor_tf.settings.options import declared_stages
from nettailor_tf.settings.schedules import Schedule


def stage_settings(config: Config, stage: str) -> dict:
    """{setting: value} of every setting that changes `stage`'s results, as
    JSON values: the part of the stage's record that comes from the
    configuration.  Derived from the declarations, so a new setting cannot
    be forgotten (tests/test_config.py walks them all)."""
    found = {}
    for field in dataclasses.fields(config):
        if stage in declared_stages(field, config):
            value = getattr(config, field.name)
            found[field.name] = (dataclasses.asdict(value) if is_schedule(field)
                                 else list(value) if isinstance(value, tuple) else value)
    return found


def changed_settings(before: dict, now: dict) -> list[str]:
    """The flags whose values differ between two `stage_settings` records
    (a schedule's by its own flags: --teacher_lr, not --teacher)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    subfields = {f.name: f for f in dataclasses.fields(Schedule)}
    changed = []
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name), now.get(name)
        if old == new:
            continue
        field = fields.get(name)
        if field is not None and is_schedule(field) and isinstance(old, dict) \
                and isinstance(new, dict):
            changed += [f"--{flag_name(name, subfields[k])}" if k in subfields else f"--{k}"
                        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        else:
            changed.append(f"--{name}")
    return changed

"""Folders of converted files kept between runs (the latency table's
branches and calibration networks: `measure.table_files`), one per name.

Several processes may share a cache (a run beside the test suite's
workers, two checkouts of the project): a folder is built under a hidden
name of its own and renamed into place, a process that finds a finished
folder there uses it, and nothing is deleted that another process might be
reading: only folders unused for `UNUSED_DAYS` (a use touches `marker`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Callable

from nettailor_tf.common import atomic

# A folder no run has used for this long (another code version's, other
# settings') is removed when a new one is built beside it.
UNUSED_DAYS = 7


def cached_folder(parent: str, name: str, marker: str, build: Callable[[str], None],
                  valid: Callable[[str], bool]) -> tuple[str, bool]:
    """`parent`/`name`, built by `build(folder)` unless a folder there is
    `valid`; returns it and whether it was there.  `marker` is the file in
    it whose time says when it was last used."""
    folder = os.path.join(parent, name)
    if valid(folder):
        os.utime(os.path.join(folder, marker))
        return folder, True
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    try:
        build(staging)
        atomic.sync_tree(staging)
        if not valid(folder):  # no other process finished one meanwhile
            shutil.rmtree(folder, ignore_errors=True)  # a damaged one
            try:
                os.rename(staging, folder)
            except OSError:
                pass  # another process's folder arrived first: it is used
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remove_unused(parent, marker, keep=name)
    return folder, False


def remove_unused(parent: str, marker: str, keep: str, days: float = UNUSED_DAYS) -> list[str]:
    """Removes the folders of `parent` but `keep` (finished ones by their
    `marker`'s time, a dead build's hidden one by its own) unused for
    `days`; returns their names."""
    removed = []
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if entry == keep or not os.path.isdir(path):
            continue
        stamp = os.path.join(path, marker)
        try:
            used = os.path.getmtime(stamp if os.path.exists(stamp) else path)
        except OSError:
            continue  # removed by another process meanwhile
        if time.time() - used > days * 86400:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(entry)
    return removed

"""Directories that appear whole or not at all.

An export is built in a hidden temporary directory beside its final place and
renamed into place only once every file in it is written and checked.  A run
that fails (or is killed) part-way leaves the previous export where it was;
the next run deletes the leftovers.

Swapping a directory takes two renames (old out of the way, new in); a kill
between them leaves `<final>.old` and no `<final>`, which the next run puts
back before anything else.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile

from nettailor_tf.report import chmod_default


def _leftovers(final_path: str) -> list[str]:
    parent, base = os.path.split(os.path.abspath(final_path))
    return glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.tmp-*"))


def recover(final_path: str) -> None:
    """Undoes what an interrupted `staged_directory` left behind."""
    final_path = os.path.abspath(final_path)
    old = final_path + ".old"
    if os.path.isdir(old):
        if os.path.exists(final_path):
            shutil.rmtree(old)  # the swap finished; only the clean-up was cut off
        else:
            os.rename(old, final_path)  # killed between the two renames
    for leftover in _leftovers(final_path):
        shutil.rmtree(leftover, ignore_errors=True)


def replace_directory(source: str, final_path: str) -> None:
    """Moves the directory `source` to `final_path`, replacing what is there."""
    final_path = os.path.abspath(final_path)
    old = final_path + ".old"
    if os.path.exists(final_path):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final_path, old)
    os.rename(source, final_path)
    if os.path.exists(old):
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_directory(final_path: str):
    """Yields an empty directory to build in; on a clean exit it replaces
    `final_path`, on an exception it is deleted and `final_path` is untouched."""
    final_path = os.path.abspath(final_path)
    parent = os.path.dirname(final_path)
    os.makedirs(parent, exist_ok=True)
    recover(final_path)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final_path)}.tmp-")
    chmod_default(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, final_path)


def directory_bytes(path: str) -> int:
    """Bytes of every file under `path`."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total

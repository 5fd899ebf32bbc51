"""Files and directories that appear whole or not at all.

Every file the project writes (reports, plans, weights, plots, prediction
files) is written to a hidden temporary beside its final place and renamed
into place once complete: readers see the old file or the new one, never
half of one.  Temporaries are named ``.<name>.tmp-<random>``, so a run
killed mid-write leaves only such names behind, and the next write of the
same file deletes them (one run owns a workdir, so a temporary of the same
target can only be a dead run's).

An export directory is built the same way: in ``.<name>.tmp-<random>/``,
then renamed into place.  Swapping a directory takes two renames (old out of
the way, new in); a kill between them leaves ``<name>.old`` and no
``<name>``, which `recover` puts back before anything else.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile


def chmod_default(path: str) -> None:
    """Gives a file made by mkstemp (0600) or a directory made by mkdtemp
    (0700) the permissions a plain open()/mkdir would have (umask applied)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def _temporary_prefix(final_path: str) -> str:
    return f".{os.path.basename(final_path)}.tmp-"


def _leftovers(final_path: str) -> list[str]:
    parent = os.path.dirname(final_path)
    return glob.glob(os.path.join(glob.escape(parent),
                                  glob.escape(_temporary_prefix(final_path)) + "*"))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def replacing_file(path: str, suffix: str = ""):
    """Yields a temporary path beside `path` to write; on a clean exit it is
    synced and renamed to `path`, on an exception deleted (`path` untouched).

    `suffix` ends the temporary's name, for writers that insist on one
    (Keras' ``.weights.h5``).
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for leftover in _leftovers(path):
        _remove(leftover)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=_temporary_prefix(path),
                               suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        chmod_default(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with replacing_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str, text: str) -> None:
    """Writes UTF-8 `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


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
        _remove(leftover)


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
    staging = tempfile.mkdtemp(dir=parent, prefix=_temporary_prefix(final_path))
    chmod_default(staging)
    try:
        yield staging
        sync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, final_path)


def sync_tree(path: str) -> None:
    """Flushes every file under `path` to disk.  Without it a crash soon after
    the rename can leave the new directory with empty files, and a file still
    dirty in the page cache is mapped differently: XNNPACK's weight cache
    shared nothing between the signatures of a bundle read right after it
    was written (43.4 MB instead of 27.8, measured)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def copy_directory(source: str, final_path: str) -> None:
    """A copy of the directory `source` at `final_path`, all or nothing."""
    with staged_directory(final_path) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)


def directory_bytes(path: str) -> int:
    """Bytes of every file under `path`."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total

"""Files and export directories appear whole or not at all."""
import os

import pytest

from nettailor_tf.common import atomic


def _write(directory, name, text):
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def _contents(directory):
    return {n: open(os.path.join(directory, n)).read() for n in sorted(os.listdir(directory))}


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".") or n.endswith(".old")]


def test_a_finished_export_replaces_the_previous_one(tmp_path):
    final = str(tmp_path / "export")
    with atomic.staged_directory(final) as staging:
        _write(staging, "a.tflite", "one")
        assert not os.path.exists(final)  # nothing visible until it is complete
    with atomic.staged_directory(final) as staging:
        _write(staging, "b.tflite", "two")
    assert _contents(final) == {"b.tflite": "two"}
    assert _leftovers(tmp_path) == []
    assert oct(os.stat(final).st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_every_file_of_an_export_is_on_disk_before_it_is_renamed_into_place(tmp_path,
                                                                           monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        assert not os.path.exists(tmp_path / "export")  # before the rename
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with atomic.staged_directory(str(tmp_path / "export")) as staging:
        _write(staging, "a.tflite", "one")
        os.makedirs(os.path.join(staging, "savedmodel"))
        _write(os.path.join(staging, "savedmodel"), "saved_model.pb", "two")
    assert sorted(synced) == ["a.tflite", "saved_model.pb"]


def test_a_failing_export_leaves_the_previous_one_intact(tmp_path):
    final = str(tmp_path / "export")
    with atomic.staged_directory(final) as staging:
        _write(staging, "a.tflite", "good")
    with pytest.raises(RuntimeError, match="injected"):
        with atomic.staged_directory(final) as staging:
            _write(staging, "a.tflite", "half-writ")
            raise RuntimeError("injected failure mid-export")
    assert _contents(final) == {"a.tflite": "good"}
    assert _leftovers(tmp_path) == []


def test_leftovers_of_a_killed_export_are_removed(tmp_path):
    """A SIGKILL mid-build leaves a hidden staging directory; the next export removes it."""
    final = str(tmp_path / "export")
    os.makedirs(tmp_path / ".export.tmp-killed")
    _write(str(tmp_path / ".export.tmp-killed"), "a.tflite", "partial")
    with atomic.staged_directory(final) as staging:
        _write(staging, "a.tflite", "whole")
    assert _contents(final) == {"a.tflite": "whole"}
    assert _leftovers(tmp_path) == []


def test_a_kill_between_the_two_renames_is_undone(tmp_path):
    """Killed after moving the old export aside but before moving the new one
    in: `recover` puts the old one back."""
    final = str(tmp_path / "export")
    os.makedirs(final + ".old")
    _write(final + ".old", "a.tflite", "previous")
    atomic.recover(final)
    assert _contents(final) == {"a.tflite": "previous"}
    assert _leftovers(tmp_path) == []


def test_a_kill_after_the_swap_only_needs_the_cleanup(tmp_path):
    final = str(tmp_path / "export")
    os.makedirs(final)
    _write(final, "a.tflite", "new")
    os.makedirs(final + ".old")
    atomic.recover(final)
    assert _contents(final) == {"a.tflite": "new"}
    assert not os.path.exists(final + ".old")


def test_directory_bytes(tmp_path):
    os.makedirs(tmp_path / "d" / "sub")
    _write(str(tmp_path / "d"), "x", "12345")
    _write(str(tmp_path / "d" / "sub"), "y", "678")
    assert atomic.directory_bytes(str(tmp_path / "d")) == 8


def test_a_file_is_replaced_whole_with_the_usual_permissions(tmp_path):
    path = str(tmp_path / "sub" / "report.json")
    atomic.write_text(path, "one")
    atomic.write_text(path, "two")
    assert _contents(str(tmp_path / "sub")) == {"report.json": "two"}
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_a_failing_writer_leaves_the_previous_file(tmp_path):
    path = str(tmp_path / "model.weights.h5")
    atomic.write_bytes(path, b"good")
    with pytest.raises(RuntimeError, match="injected"):
        with atomic.replacing_file(path, suffix=".weights.h5") as tmp:
            assert tmp.endswith(".weights.h5") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "wb") as f:
                f.write(b"ha")
            raise RuntimeError("injected failure mid-write")
    assert open(path, "rb").read() == b"good"
    assert _leftovers(tmp_path) == []


def test_temporaries_of_a_killed_writer_go_with_the_next_write(tmp_path):
    """SIGKILL mid-write leaves `.<name>.tmp-*`; the next write of that file
    removes it, and leaves other files' temporaries alone."""
    _write(str(tmp_path), ".plot.png.tmp-dead.png", "half")
    _write(str(tmp_path), ".other.png.tmp-live.png", "someone else's")
    atomic.write_bytes(str(tmp_path / "plot.png"), b"whole")
    assert sorted(os.listdir(tmp_path)) == [".other.png.tmp-live.png", "plot.png"]

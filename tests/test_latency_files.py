"""The latency table's converted files: kept in the cache by settings and
code, read back by a second table instead of converted again, and converted
again where the code changed or the folder was damaged."""
import os
import shutil
import time

import numpy as np
import pytest

from nettailor_tf.latency import file_cache, measure as latency_measure, table as lt
from nettailor_tf.model import backbones, student_network


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny backbone's files at 16 px, converted once into a cache."""
    cache = str(tmp_path_factory.mktemp("latency_files"))
    with latency_measure.table_files("tiny", 16, 2, cache) as files:
        assert not files.cached
    return files, cache


def _no_conversion(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("converted again")
    monkeypatch.setattr(latency_measure, "convert_functions", refuse)


def test_a_second_table_times_the_cached_files_without_converting(converted, monkeypatch):
    files, cache = converted
    _no_conversion(monkeypatch)
    with latency_measure.table_files("tiny", 16, 2, cache) as again:
        assert again.cached
        assert again.parts == files.parts and again.networks == files.networks
        assert all(os.path.isfile(path) for path in again.parts.values())
    table = latency_measure.measure_table("tiny", 16, 1, 2, runs=50, cache_dir=cache)
    plan = student_network.Plan.full(len(backbones.build_backbone("tiny").blocks), 2)
    # Every branch, in the network's order, and the calibration networks.
    assert [k for k in table.entries if k != lt.EMPTY_KEY and not
            k.startswith(lt.NETWORK_PREFIX)] == lt.plan_keys(plan)
    assert {lt.TEACHER_KEY, lt.STUDENT_KEY, *files.calibration_plans} <= set(table.entries)
    assert table.calibration().networks == 2 + lt.SAMPLE_PLANS


def test_the_cached_inputs_are_the_signatures_inputs(converted):
    """The feeds built from the manifest fit each signature of the files:
    its input names, shapes and types (a uint8 image for the stem)."""
    from ai_edge_litert.interpreter import Interpreter

    files, _ = converted
    feeds = latency_measure.branch_feeds(files.inputs)
    assert feeds[lt.stem_key()]["images"].dtype == np.uint8
    for path in set(files.parts.values()):
        interpreter = Interpreter(model_path=path)
        for key, signature in interpreter.get_signature_list().items():
            assert sorted(signature["inputs"]) == sorted(feeds[key])
            details = interpreter.get_signature_runner(key).get_input_details()
            for name, array in feeds[key].items():
                assert tuple(details[name]["shape"]) == array.shape
                assert details[name]["dtype"] == array.dtype


def _copying_converter(monkeypatch, files):
    """A conversion that copies the fixture's files (and counts itself):
    the cache's bookkeeping without the converter's seconds."""
    source = os.path.dirname(files.parts[lt.stem_key()])
    calls = []

    def convert(backbone_name, image_size, max_skip, folder, per_file):
        calls.append(folder)
        shutil.copytree(source, folder, dirs_exist_ok=True)

    monkeypatch.setattr(latency_measure, "_convert_table_files", convert)
    return calls


def test_other_codes_files_sit_beside_until_unused_for_a_week(converted, tmp_path,
                                                              monkeypatch):
    files, cache = converted
    cache = shutil.copytree(cache, tmp_path / "cache")
    parent = os.path.join(cache, "converted")
    calls = _copying_converter(monkeypatch, files)
    with latency_measure.table_files("tiny", 24, 2, cache) as other_size:
        assert not other_size.cached
    first = os.path.basename(os.path.dirname(files.parts["stem"]))
    monkeypatch.setattr(latency_measure, "files_fingerprint", lambda per_file=10: "othercode")
    with latency_measure.table_files("tiny", 16, 2, cache) as other_code:
        assert not other_code.cached
    with latency_measure.table_files("tiny", 16, 2, cache) as again:
        assert again.cached and again.parts == other_code.parts
    assert len(calls) == 2
    # Another checkout may still use the first code's files: they stay...
    assert first in os.listdir(parent) and len(os.listdir(parent)) == 3
    # ...until no run has used them for a week.
    week = time.time() - 8 * 86400
    os.utime(os.path.join(parent, first, "manifest.json"), (week, week))
    assert file_cache.remove_unused(parent, "manifest.json", keep="tiny_16_skip2_othercode") == [
        first]


def test_a_folder_another_process_finished_first_is_the_one_used(tmp_path):
    """Two processes building the same folder: the one that finishes second
    keeps the first one's folder and drops its own, leaving no staging."""
    def valid(folder):
        return os.path.isfile(os.path.join(folder, "done"))

    def build(staging, other=str(tmp_path / "files")):
        open(os.path.join(staging, "done"), "w").write("mine")
        os.makedirs(other)  # the other process renames its folder into place meanwhile
        open(os.path.join(other, "done"), "w").write("theirs")

    folder, cached = file_cache.cached_folder(str(tmp_path), "files", "done", build, valid)
    assert not cached and open(os.path.join(folder, "done")).read() == "theirs"
    assert os.listdir(tmp_path) == ["files"]
    assert file_cache.cached_folder(str(tmp_path), "files", "done", None, valid) == (folder, True)


def test_a_damaged_folder_is_converted_again(converted, tmp_path, monkeypatch):
    files, cache = converted
    cache = shutil.copytree(cache, tmp_path / "cache")
    with latency_measure.table_files("tiny", 16, 2, cache) as copy:
        assert copy.cached
    os.remove(next(iter(copy.networks.values())))
    calls = _copying_converter(monkeypatch, files)
    with latency_measure.table_files("tiny", 16, 2, cache) as again:
        assert not again.cached and len(calls) == 1
        assert all(os.path.isfile(path) for path in again.networks.values())


def test_without_a_cache_the_files_are_temporary(converted, monkeypatch):
    files, _ = converted
    calls = _copying_converter(monkeypatch, files)
    with latency_measure.table_files("tiny", 16, 2) as temporary:
        folder = os.path.dirname(temporary.parts[lt.stem_key()])
        assert not temporary.cached and os.path.isdir(folder) and len(calls) == 1
    assert not os.path.exists(folder)

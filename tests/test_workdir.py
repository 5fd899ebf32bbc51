"""The workdir's layout and the record that keeps one folder to one setup."""
import json
import os

import pytest

from nettailor_tf.run.workdir import Workdir, WorkdirError, fingerprint

SETTINGS = {"backbone": "tiny", "image_size": 16, "max_skip": 3}


def test_task_files_live_in_one_folder_per_task(tmp_path):
    paths = Workdir(str(tmp_path))
    # A tfds name with a config has a slash; its folder does not.
    # Task folders live under tasks/, where no run-level name can reach them.
    assert paths.task_dir("visual_domain_decathlon/svhn") == str(
        tmp_path / "tasks" / "visual_domain_decathlon_svhn")
    assert paths.task_dir("bundle") != paths.bundle_dir
    assert paths.plan("digits") == str(tmp_path / "tasks" / "digits" / "plan.json")
    assert paths.checkpoints("digits", "prune_search/n3") == str(
        tmp_path / "tasks" / "digits" / "prune_search" / "n3_ckpt")
    assert paths.prune_search_checkpoints("digits", 3) == paths.checkpoints(
        "digits", "prune_search/n3")
    assert paths.relative(paths.pruned_state("digits")) == "tasks/digits/nettailor.npz"


def test_the_first_run_records_its_settings_and_a_later_one_must_match(tmp_path):
    paths = Workdir(str(tmp_path / "run"))
    paths.check_settings(SETTINGS)
    assert json.loads((tmp_path / "run" / "settings.json").read_text()) == SETTINGS
    paths.check_settings(SETTINGS)
    with pytest.raises(WorkdirError) as error:
        paths.check_settings({**SETTINGS, "image_size": 32, "max_skip": "dense"})
    message = str(error.value)
    assert "--image_size=16 (now 32)" in message and "--max_skip=3 (now dense)" in message
    assert "another --workdir" in message and "\n" not in message
    assert error.value.path.endswith("settings.json")


def test_a_setting_added_later_is_recorded_not_refused(tmp_path):
    paths = Workdir(str(tmp_path))
    paths.check_settings({"backbone": "tiny"})
    paths.check_settings({"backbone": "tiny", "universal_bn": "frozen"})
    assert json.loads((tmp_path / "settings.json").read_text())["universal_bn"] == "frozen"


def test_one_run_at_a_time(tmp_path):
    paths = Workdir(str(tmp_path / "run"))
    with paths.lock():
        with pytest.raises(WorkdirError) as error:
            with Workdir(str(tmp_path / "run")).lock():
                pass
        assert f"in use by another run (pid {os.getpid()} on " in str(error.value)
    with paths.lock():  # released when the first holder is done
        pass


def test_the_ledger_keeps_what_a_stage_started_and_finished_from(tmp_path):
    ledger = Workdir(str(tmp_path)).ledger("digits")
    assert ledger.recorded("student") is None  # nothing recorded
    ledger.record("student", {"teacher": "a"}, started=True)
    assert ledger.recorded("student") is None
    assert ledger.recorded("student", started=True) == {"teacher": "a"}
    ledger.record("student", {"teacher": "a", "data": "d"})
    assert ledger.recorded("student") == {"teacher": "a", "data": "d"}
    ledger.forget("student")
    assert ledger.recorded("student") is None
    assert ledger.recorded("student", started=True) is None


def test_fingerprints_follow_content(tmp_path):
    (tmp_path / "a").write_bytes(b"one")
    first = fingerprint(str(tmp_path / "a"))
    (tmp_path / "a").write_bytes(b"two")
    assert fingerprint(str(tmp_path / "a")) != first
    assert fingerprint(str(tmp_path / "missing")) is None
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"one")
    folder = fingerprint(str(tmp_path / "d"))
    (tmp_path / "d" / "x").rename(tmp_path / "d" / "y")
    assert fingerprint(str(tmp_path / "d")) != folder  # names count too

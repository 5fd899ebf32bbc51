"""The workdir's layout and the record that keeps one folder to one setup."""
import json

import pytest

from nettailor_tf.workdir import Workdir, WorkdirError

SETTINGS = {"backbone": "tiny", "image_size": 16, "max_skip": 3}


def test_task_files_live_in_one_folder_per_task(tmp_path):
    paths = Workdir(str(tmp_path))
    # A tfds name with a config has a slash; its folder does not.
    assert paths.task_dir("visual_domain_decathlon/svhn") == str(
        tmp_path / "visual_domain_decathlon_svhn")
    assert paths.plan("digits") == str(tmp_path / "digits" / "plan.json")
    assert paths.checkpoints("digits", "prune_search/n3") == str(
        tmp_path / "digits" / "prune_search" / "n3_ckpt")
    assert paths.prune_search_checkpoints("digits", 3) == paths.checkpoints(
        "digits", "prune_search/n3")
    assert paths.relative(paths.pruned_state("digits")) == "digits/nettailor.npz"


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

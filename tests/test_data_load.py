"""Tests for nettailor_tf/data/load.py: `load_task` reads the spec and hands it
to the loader of its source (the loaders have their own test files)."""

from __future__ import annotations

import pytest

from nettailor_tf import data
from nettailor_tf.data import DataError


@pytest.mark.parametrize("spec", ["", "   ", None])
def test_empty_spec_lists_the_accepted_specs(spec):
    with pytest.raises(DataError, match="empty task spec") as info:
        data.load_task(spec)
    assert data.TASK_SPEC_HELP in str(info.value)


def test_unknown_spec_names_it_and_lists_the_accepted_specs():
    with pytest.raises(DataError) as info:
        data.load_task("mnist")
    assert str(info.value) == f"task 'mnist': unknown task spec; {data.TASK_SPEC_HELP}"
    for form in ("mnist5k", "digits", "tfds:", "folder:"):
        assert form in data.TASK_SPEC_HELP


def test_each_prefix_reaches_its_loader():
    task = data.load_task("digits", split_seed=1)
    assert (task.name, task.spec, task.num_classes) == ("digits", "digits", 10)
    with pytest.raises(DataError, match="'tfds:': malformed TFDS name"):
        data.load_task("tfds:")
    with pytest.raises(DataError, match="'folder:': empty folder path"):
        data.load_task("folder:")

"""Tests for nettailor_tf/data/tasks.py: DataError, TaskData and the
undecoded source a loaded task carries for the pipelines' fast path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from data_helpers import hand_made_task

from nettailor_tf.common.errors import NetTailorError
from nettailor_tf.data import tasks


def test_data_error_is_a_nettailor_error_and_a_value_error():
    assert issubclass(tasks.DataError, NetTailorError)
    assert issubclass(tasks.DataError, ValueError)


def test_task_error_is_one_line_naming_the_spec():
    err = tasks.task_error("folder:/photos", "bad\n   thing\n\there")
    assert isinstance(err, tasks.DataError)
    assert str(err) == "task 'folder:/photos': bad thing here"


def _two_item_source() -> tasks.UndecodedSource:
    # Items are strings; "decoding" one paints a 2x2 image with its length.
    def decode(item):
        return tf.fill([2, 2, 3], tf.cast(tf.strings.length(item), tf.uint8))

    split = tasks.UndecodedSplit(items=np.array(["a", "bbb"]), labels=np.array([0, 1], np.int64))
    return tasks.build_source(split, split, decode=decode, same_size=True)


def test_loaded_task_reads_decoded_images_and_keeps_its_source():
    source = _two_item_source()
    task = tasks.make_task("two", "custom:two", 2, source, 2, 2, "none")
    pairs = [(image.numpy(), label) for image, label in task.train]
    assert [int(image[0, 0, 0]) for image, _ in pairs] == [1, 3]
    assert all(image.dtype == np.uint8 and image.shape == (2, 2, 3) for image, _ in pairs)
    assert all(label.dtype == tf.int32 for _, label in pairs)

    assert tasks.source_of(task) is source
    split, decode, same_size = tasks.undecoded_split(task, "train")
    assert split is source.train and decode is source.decode and same_size
    # A task whose split was replaced after loading loses the fast path for it.
    edited = dataclasses.replace(task, train=task.train.take(1))
    assert tasks.undecoded_split(edited, "train") == (None, None, False)
    assert tasks.undecoded_split(edited, "test")[0] is source.test
    assert tasks.undecoded_split(task, "val") == (None, None, False)


def test_hand_built_task_has_no_source_until_given_one():
    task = hand_made_task([0, 1, 0], 2)
    assert tasks.source_of(task) is None
    assert tasks.undecoded_split(task, "train") == (None, None, False)
    source = _two_item_source()
    given = tasks.with_source(task, source, train=source.public_train, num_train=2)
    assert tasks.source_of(given) is source and given.num_train == 2
    assert tasks.undecoded_split(given, "train")[0] is source.train
    assert given.name == task.name and given.test is task.test


def test_class_names_are_one_per_class_and_label_names_fill_the_gaps():
    source = _two_item_source()
    named = tasks.make_task("two", "custom:two", 2, source, 2, 2, "none",
                            class_names=["cat", "dog"])
    assert named.class_names == ("cat", "dog")  # a tuple, whatever was given
    assert tasks.label_names(named) == ("cat", "dog")
    unnamed = tasks.make_task("two", "custom:two", 2, source, 2, 2, "none")
    assert unnamed.class_names is None
    assert tasks.label_names(unnamed) == ("class_0", "class_1")
    odd = dataclasses.replace(named, class_names=("two\nlines", "  "))
    assert tasks.label_names(odd) == ("two lines", "class_1")
    # Editing a loaded task keeps its names, its source and its behaviour.
    assert dataclasses.replace(named, num_train=1).class_names == ("cat", "dog")
    with pytest.raises(tasks.DataError, match="1 class names for 2 classes"):
        tasks.make_task("two", "custom:two", 2, source, 2, 2, "none", class_names=["cat"])


def test_a_tfds_task_names_its_classes_after_its_class_label(mocked_svhn):
    from nettailor_tf import data

    # Names written in the dataset's code; others (cifar10) read them from
    # the prepared data, which mock data has not, and get "0".."N-1" then.
    hands = data.load_task("tfds:rock_paper_scissors")
    assert hands.class_names == ("rock", "paper", "scissors")
    assert data.load_task("tfds:mnist").class_names == tuple(str(d) for d in range(10))

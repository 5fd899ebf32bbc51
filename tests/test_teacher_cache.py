"""The teacher's targets computed once: the same values the teacher gives at each step."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import randomize_weights

from nettailor_tf import data
from nettailor_tf.model import backbones
from nettailor_tf.training import teacher_cache


def _teacher():
    backbone = backbones.build_backbone("tiny")
    randomize_weights(backbone.layers, 0)
    model = backbones.classifier_model(backbone, 10)
    return backbones.folded_classifier(backbone, model)


def _check_lookup(teacher, task, targets):
    for images, _, indices in data.train_pipeline(task, 16, 8, epoch=1, seed=3,
                                                  with_index=True).take(3):
        want_logits, want_endpoints = teacher(images, training=False)
        logits, endpoints = targets.lookup(indices)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        assert len(endpoints) == len(want_endpoints)
        for got, want in zip(endpoints, want_endpoints):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_looked_up_targets_equal_the_teachers_outputs_on_the_training_batches():
    teacher = _teacher()
    task = data.with_validation_split(data.load_task("digits"), 0.1, seed=0)
    targets = teacher_cache.build(teacher, task, 16, 64, tf.distribute.get_strategy())
    assert targets.logits.shape[0] == task.num_train
    assert targets.bytes == teacher_cache.target_bytes(teacher, task, 16)
    _check_lookup(teacher, task, targets)


def test_a_sequential_split_is_looked_up_by_its_positions():
    teacher = _teacher()
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        # tfds sets are read in sequence and skipped, not sliced; without
        # augmentation their pixels repeat each epoch.
        task = dataclasses.replace(data.load_task("tfds:mnist"), augment="none")
        task = data.with_validation_split(task, 0.2, seed=0)
        targets = teacher_cache.build(teacher, task, 16, 16, tf.distribute.get_strategy())
        _check_lookup(teacher, task, targets)


def test_augmented_or_too_large_tasks_keep_the_teacher():
    teacher = _teacher()
    strategy = tf.distribute.get_strategy()
    digits = data.load_task("digits")
    augmented = dataclasses.replace(digits, augment="crop_flip")
    assert teacher_cache.build(teacher, augmented, 16, 64, strategy) is None
    assert teacher_cache.build(teacher, digits, 16, 64, strategy, max_bytes=1000) is None

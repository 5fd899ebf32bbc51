"""Tests for exporters/memory.py: the peak memory of running every task once."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from exporters import memory

CHANNELS = 256  # two shared 3x3 convolutions: 4.7 MB of float32 weights


class _TwoTasks(tf.Module):
    """Two tasks on one trunk: the trunk's weights are what a bundle shares."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)

        def weights(*shape):
            return tf.Variable(rng.normal(0, 0.05, shape).astype(np.float32))

        self.stem = weights(3, 3, 3, CHANNELS)
        self.trunk = [weights(3, 3, CHANNELS, CHANNELS) for _ in range(2)]
        self.heads = {"task_a": weights(1, 1, CHANNELS, 5), "task_b": weights(1, 1, CHANNELS, 7)}

    def logits(self, images, task):
        x = tf.nn.relu(tf.nn.conv2d(images, self.stem, 1, "SAME"))
        for kernel in self.trunk:
            x = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
        return {"logits": tf.reduce_mean(tf.nn.conv2d(x, self.heads[task], 1, "SAME"), [1, 2])}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(separate per-task files, the two-signature bundle)."""
    folder = tmp_path_factory.mktemp("memory")
    module = _TwoTasks()
    spec = tf.TensorSpec([1, 8, 8, 3], tf.float32, name="images")
    signatures = {task: tf.function(lambda images, task=task: module.logits(images, task),
                                    input_signature=[spec]) for task in module.heads}
    tf.saved_model.save(module, str(folder / "savedmodel"), signatures=signatures)

    def convert(keys, name):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(folder / "savedmodel"),
                                                             signature_keys=keys)
        (folder / name).write_bytes(converter.convert())
        return str(folder / name)

    separate = [convert([task], f"{task}.tflite") for task in module.heads]
    bundle = convert(list(module.heads), "bundle.tflite")
    # The precondition of every test below: the bundle stores the trunk once.
    assert os.path.getsize(bundle) < 0.7 * sum(map(os.path.getsize, separate))
    return separate, bundle


@pytest.fixture(scope="module")
def measured(files):
    separate, bundle = files
    return memory.bundle_memory(separate, bundle, repeats=1)


def test_every_way_is_measured_over_the_baseline(measured):
    assert measured["tasks"] == 2 and measured["repeats"] == 1 and measured["baseline"] > 10
    for name, _, _ in memory.WAYS:
        assert 0 < measured[name] < 200, (name, measured)
        assert set(measured["breakdown"][name]) == {"model_files", "weight_cache", "anonymous"}


def test_the_in_memory_cache_packs_the_bundles_shared_weights_once(measured):
    """Without a cache XNNPACK packs the trunk once per signature; the
    in-memory cache (no file) packs it once for the model."""
    trunk_mb = (9 * CHANNELS * CHANNELS * 2 + 27 * CHANNELS) * 4 / 2**20
    assert measured["bundle"] - measured["bundle_in_memory_cache"] > 0.5 * trunk_mb, measured
    assert measured["bundle_in_memory_cache"] < measured["separate_files_in_memory_cache"]
    # Where it went: packed weights in anonymous memory without a cache,
    # in the cache's pages with it.
    plain, cached = (measured["breakdown"][name] for name in ("bundle", "bundle_in_memory_cache"))
    assert plain["weight_cache"] == 0 and cached["weight_cache"] > 0.8 * trunk_mb
    assert plain["anonymous"] - cached["anonymous"] > trunk_mb


def test_the_bundles_file_pages_are_shared(measured):
    """The separate files map the trunk twice, the bundle once."""
    breakdown = measured["breakdown"]
    assert breakdown["separate_files"]["model_files"] > breakdown["bundle"]["model_files"] + 3


def test_a_file_that_does_not_load_is_named(tmp_path):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match=r"broken\.tflite.*failed \(exit 1\): RuntimeError"):
        memory.measure_once([str(broken)])

"""Fixtures shared by the test files."""
import os
import tempfile

import pytest

# Before TensorFlow (tfds imports it): the package chooses the CPU kernels
# for the tests as it does for a user (nettailor_tf/cpu_kernels.py).
import nettailor_tf  # noqa: F401
import tensorflow_datasets as tfds  # noqa: E402

# Latency tables measured by the tests stay out of the user's cache; the
# workers of one run (and the CLI subprocesses they start) share theirs.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ["NETTAILOR_TF_CACHE"] = (
    os.path.join(tempfile.gettempdir(), f"nettailor_tf_test_cache_{_RUN}") if _RUN
    else tempfile.mkdtemp(prefix="nettailor_tf_test_cache_"))


@pytest.fixture
def mocked_svhn():
    """tfds's mock data: 48 random images per split of any dataset."""
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


# The longest files go first: with pytest-xdist (pytest.ini) a file runs on
# one worker, and the longest one dispatched last keeps the other core idle.
# pytest.ini turns off xdist's own order (files with the most tests first),
# which sent these one-test files last: one worker ran 537 s of tests, the
# other 329 s.  Seconds per file, measured on 2 cores: faults 114, deploy
# 102, own data 94, benchmarks 91, main 89, stages 64, train 57, prune 46.
_LONGEST_FIRST = ("test_faults.py", "test_stages_deploy.py", "test_own_data.py",
                  "test_benchmarks.py", "test_main.py", "test_stages.py", "test_train.py",
                  "test_stages_prune.py", "test_backbones.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept

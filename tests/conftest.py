"""Fixtures shared by the test files."""
import pytest
import tensorflow_datasets as tfds


@pytest.fixture
def mocked_svhn():
    """tfds's mock data: 48 random images per split of any dataset."""
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        yield

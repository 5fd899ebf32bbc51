"""A task's data identity: stable for the same data, different for other data."""
import dataclasses

from nettailor_tf import data as data_lib


def test_the_same_data_has_the_same_identity_and_other_data_another():
    digits = data_lib.with_validation_split(data_lib.load_task("digits"), 0.1, 0)
    same = data_lib.with_validation_split(data_lib.load_task("digits"), 0.1, 0)
    first = data_lib.identity(digits)
    assert first == data_lib.identity(same)
    assert first["num_classes"] == 10 and first["num_val"] == 145 and first["spec"] == "digits"
    # Another validation draw: the same sizes, other images.
    reseeded = data_lib.identity(data_lib.with_validation_split(data_lib.load_task("digits"),
                                                                0.1, 1))
    assert reseeded["num_val"] == 145 and reseeded["fingerprint"] != first["fingerprint"]
    # Other images in the first split under the same name and sizes.
    shuffled = dataclasses.replace(digits, train=digits.train.skip(1))
    assert data_lib.identity(shuffled)["fingerprint"] != first["fingerprint"]

"""One error type for everything a user can cause."""
import importlib
import inspect

import pytest
from test_imports import MODULES

from nettailor_tf.common.errors import NetTailorError

# Control flow inside a module, never raised to the user.
INTERNAL = {"nettailor_tf.stages.prune._Interrupted"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_error_class_is_a_nettailor_error(module):
    loaded = importlib.import_module(module)
    for name, value in vars(loaded).items():
        if (inspect.isclass(value) and issubclass(value, Exception)
                and value.__module__ == module and f"{module}.{name}" not in INTERNAL):
            assert issubclass(value, NetTailorError), f"{module}.{name}"


def test_an_error_carries_its_flag_or_file():
    error = NetTailorError("--x=1: too big", flag="x")
    assert str(error) == "--x=1: too big" and error.flag == "x" and error.path is None

"""oneDNN's kernels on every x86 CPU unless the user chose otherwise."""
import os
import platform
import subprocess
import sys

import pytest

from nettailor_tf import cpu_kernels

_PROBE = ("import nettailor_tf, tensorflow\n"
          "from tensorflow.python.util import _pywrap_util_port\n"
          "print(_pywrap_util_port.IsMklEnabled())\n")


def test_an_x86_cpu_gets_onednn_when_nothing_is_set():
    for machine in ("x86_64", "AMD64", "i686"):
        environ = {}
        assert cpu_kernels.prefer_onednn(environ, machine) == "nettailor_tf"
        assert environ == {"TF_ENABLE_ONEDNN_OPTS": "1"}


@pytest.mark.parametrize("value", ["0", "1", ""])
def test_the_users_setting_wins(value):
    environ = {"TF_ENABLE_ONEDNN_OPTS": value}
    assert cpu_kernels.prefer_onednn(environ, "x86_64") == "user"
    assert environ == {"TF_ENABLE_ONEDNN_OPTS": value}


def test_other_cpus_keep_tensorflows_default():
    environ = {}
    assert cpu_kernels.prefer_onednn(environ, "aarch64") == "tensorflow"
    assert environ == {}


def test_the_log_line_says_whether_and_why():
    assert cpu_kernels.describe(True).startswith("CPU kernels: oneDNN on (")
    assert "oneDNN off" in cpu_kernels.describe(False)


def _probe(**env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(env_changes)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the default is for x86 CPUs")
def test_importing_the_package_first_turns_onednn_on_in_tensorflow():
    """A real TensorFlow: on since the package said so (on an AVX2-only CPU
    TensorFlow alone would leave it off), off when the user says 0."""
    assert _probe() == "True"
    assert _probe(TF_ENABLE_ONEDNN_OPTS="0") == "False"

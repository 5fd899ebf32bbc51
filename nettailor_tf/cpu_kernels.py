"""oneDNN's CPU kernels on every x86 machine, chosen before TensorFlow loads.

TensorFlow 2.21 turns its oneDNN kernels on by default only on CPUs with
AVX-512-class features.  On an AVX2-only CPU it runs Eigen's kernels instead,
which made this project's training steps up to 2.8 times slower on 2 cores
(`benchmarks/train_step.py --image_size=64 --batch_size=32`, ResNet-34
student: 1,968-2,056 ms a step against 696 with oneDNN) and which round
differently, so that one seed trained other networks on two machines.  The
package therefore asks for oneDNN on every x86 CPU, unless the user has set
TF_ENABLE_ONEDNN_OPTS themselves: their setting always wins, and
TF_ENABLE_ONEDNN_OPTS=0 gives the Eigen kernels back.

TensorFlow reads the variable once, when it is first imported, so this runs
from the package's `__init__`: any `import nettailor_tf...` before TensorFlow
is early enough.  Pure standard library: importing it loads nothing heavy.
"""
from __future__ import annotations

import os
import platform

VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
_X86 = frozenset({"x86_64", "amd64", "x86", "i386", "i686"})

# Who chose the kernels, for the log line: "user" (the variable was set
# before the package was imported), "nettailor_tf" (set here), or
# "tensorflow" (not x86: TensorFlow's own default).  Set by `__init__`.
chosen_by = "tensorflow"


def prefer_onednn(environ=None, machine: str | None = None) -> str:
    """Sets TF_ENABLE_ONEDNN_OPTS=1 in `environ` (default: this process's)
    on an x86 `machine` (default: this one) where it is unset; returns who
    chose: 'user', 'nettailor_tf' or 'tensorflow'."""
    environ = os.environ if environ is None else environ
    machine = (machine if machine is not None else platform.machine()).lower()
    if VARIABLE in environ:
        return "user"
    if machine not in _X86:
        return "tensorflow"
    environ[VARIABLE] = "1"
    return "nettailor_tf"


def describe(onednn_on: bool) -> str:
    """One log line: whether TensorFlow runs oneDNN's kernels (`onednn_on`,
    from `tensorflow.python.util._pywrap_util_port.IsMklEnabled()`), and why."""
    value = os.environ.get(VARIABLE)
    why = {"user": f"{VARIABLE}={value}, set before nettailor_tf was imported",
           "nettailor_tf": f"{VARIABLE}=1, set by nettailor_tf on this x86 CPU; "
                           f"{VARIABLE}=0 turns them off",
           "tensorflow": "TensorFlow's default on this CPU"}[chosen_by]
    return f"CPU kernels: oneDNN {'on' if onednn_on else 'off'} ({why})"

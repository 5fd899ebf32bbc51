"""TensorFlow's and LiteRT's internal chatter, kept out of a run's log.

A run's log is meant to be the project's own lines.  Exactly this is hidden:

* Native stderr, only inside `native_stderr_filtered` blocks (TensorFlow's
  import, the device probe, TFLite conversion, LiteRT's first interpreter,
  latency timing): lines matching `_NOTICES` (absl's "All log messages
  before absl::InitializeLog()", the oneDNN and CUDA-stub notices at import,
  `failed call to cuInit` on a machine without a GPU, the CPU-feature notice
  and its rebuild hint, the converter's `fully_quantize:` line, LiteRT's
  XNNPACK-delegate line).  Every other line written there is passed on;
  what C++ writes outside those blocks is not touched.
* After `quiet_python_loggers`, Python log records below ERROR (INFO and
  WARNING, so libraries' warnings too, not only their chatter): every such
  record of the `tensorflow` and `h5py` loggers, and every such record that
  absl's or the root logger receives from a file inside the tensorflow,
  keras, tf_keras, tensorflow_datasets or ai_edge_quantizer packages.  Their
  ERROR and CRITICAL records are shown.
* The Python warning that tf.lite.Interpreter is deprecated (TensorFlow's
  converter calibrates with it; the project runs files on LiteRT's).

Everything else gets through: the project's own lines at every level
(`--verbosity=1`, absl's flag, shows its debug lines), other packages'
records, and Python warnings other than that one.
"""
from __future__ import annotations

import contextlib
import logging as py_logging
import os
import re
import sys
import tempfile
import warnings

# Lines TensorFlow prints on every start or on a healthy CPU-only machine.
_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|To enable the following instructions: .*rebuild TensorFlow"
    # The TFLite converter's calibration and LiteRT's first interpreter.
    r"|^fully_quantize: \d+, inference_type"
    r"|^INFO: Created TensorFlow Lite XNNPACK delegate for CPU")

# Python loggers of TensorFlow and its helpers whose INFO/WARNING lines are
# internals (e.g. retracing hints).
_CHATTY_LOGGERS = ("tensorflow", "h5py")


def drop_notices(text: str) -> str:
    """`text` without the known start-up notices."""
    return "".join(line for line in text.splitlines(keepends=True) if not _NOTICES.search(line))


@contextlib.contextmanager
def native_stderr_filtered():
    """Captures file descriptor 2 for the body and writes back every line
    that is not a known notice (also when the body raises)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured by a harness)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = drop_notices(captured.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _FromLibraries(py_logging.Filter):
    """Drops records below ERROR logged from a file inside one of
    `_LIBRARY_PACKAGES` (through absl's logger, which the project's lines
    share, or the root logger)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.ERROR:
            return True
        path = record.pathname.replace(os.sep, "/")
        return not any(f"/{package}/" in path for package in _LIBRARY_PACKAGES)


_LIBRARY_PACKAGES = ("tensorflow", "keras", "tf_keras", "tensorflow_datasets",
                     "ai_edge_quantizer")


def quiet_python_loggers() -> None:
    """Hides the Python-side records below ERROR described in the module's
    docstring (the `tensorflow` and `h5py` loggers, and `_LIBRARY_PACKAGES`'
    records through absl's or the root logger), and the deprecation warning
    of the interpreter TensorFlow's converter calibrates with."""
    warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
    for name in _CHATTY_LOGGERS:
        py_logging.getLogger(name).setLevel(py_logging.ERROR)
    # absl's own logger, and the root logger that libraries calling
    # `logging.info` directly write to (ai-edge-quantizer's "Serializing model...").
    for logger in (py_logging.getLogger("absl"), py_logging.getLogger()):
        if not any(isinstance(f, _FromLibraries) for f in logger.filters):
            logger.addFilter(_FromLibraries())

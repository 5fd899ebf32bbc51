"""TensorFlow's and LiteRT's internal chatter, silenced at the source.

A run's log is the project's own lines.  TensorFlow writes some lines from
C++ before any log level applies (the oneDNN and CUDA-stub notices at
import, a `failed call to cuInit` error line on a machine without a GPU);
those windows are short and known, so stderr is captured there and every
line that is not a known notice is passed on.  Its Python loggers (checkpoint
timings, fingerprint writes, signature-name notes, retracing hints) are kept
at errors.  Nothing else is hidden: `--verbosity=1` (absl's) still shows the
project's debug lines, and any other line TensorFlow writes gets through.
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
    """Drops records below ERROR that TensorFlow's or Keras's own modules
    logged through absl (which the project's lines share)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.ERROR:
            return True
        path = record.pathname.replace(os.sep, "/")
        return not any(f"/{package}/" in path for package in _LIBRARY_PACKAGES)


_LIBRARY_PACKAGES = ("tensorflow", "keras", "tf_keras", "tensorflow_datasets",
                     "ai_edge_quantizer")


def quiet_python_loggers() -> None:
    """TensorFlow's and Keras's Python-side lines at errors only, and the
    deprecation warning of the interpreter TensorFlow's converter calibrates
    with (the project itself runs files on LiteRT's)."""
    warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
    for name in _CHATTY_LOGGERS:
        py_logging.getLogger(name).setLevel(py_logging.ERROR)
    # absl's own logger, and the root logger that libraries calling
    # `logging.info` directly write to (ai-edge-quantizer's "Serializing model...").
    for logger in (py_logging.getLogger("absl"), py_logging.getLogger()):
        if not any(isinstance(f, _FromLibraries) for f in logger.filters):
            logger.addFilter(_FromLibraries())

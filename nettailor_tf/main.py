"""Command line: python -m nettailor_tf.main --flagfile=flags/quickstart.cfg

Flags -> Config -> strategy -> stages.  Every user error ends in one line on
stderr naming the flag, file or value, and exit code 2.
"""
from __future__ import annotations

import errno
import os
import sys

from absl import app, flags, logging

from nettailor_tf import cpu_kernels
from nettailor_tf.common import quiet
from nettailor_tf.settings import config as config_lib

FLAGS = flags.FLAGS
config_lib.define_flags(FLAGS)


def _fail(message: str) -> None:
    print(f"nettailor_tf: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag")
    # Imported here so that --help and flag errors answer without loading TF.
    with quiet.native_stderr_filtered():
        import tensorflow as tf
        from tensorflow.python.util import _pywrap_util_port

        from nettailor_tf import stages
        from nettailor_tf.data import pipeline
        from nettailor_tf.run import artifacts
        from nettailor_tf.training import distribution
    from nettailor_tf.common.errors import NetTailorError

    quiet.quiet_python_loggers()
    logging.info(cpu_kernels.describe(_pywrap_util_port.IsMklEnabled()))
    config = config_lib.from_flags(FLAGS)
    try:
        config.validate()
        # Splitting the CPU into logical devices must happen before anything
        # touches TensorFlow devices, the backbone checks included.
        with quiet.native_stderr_filtered():
            strategy = _strategy(config, distribution, tf)
        artifacts.check_backbone_settings(config)
        logging.info("strategy %s with replicas=%d", config.strategy,
                     strategy.num_replicas_in_sync)
        report = stages.run(config, strategy)
    except NetTailorError as err:
        _fail(str(err))
    except OSError as err:
        # One that names no file names nothing a user could fix: a bug.
        if not isinstance(err.filename, (str, bytes)):
            raise
        _fail(_file_error(err, config.workdir))
    except MemoryError:
        # std::bad_alloc from TensorFlow's C++ side: its threads may be stuck
        # in the allocator, and an orderly exit would wait on them forever
        # (seen under an address-space limit): leave at once.  Every file
        # the run wrote is complete already (atomic writes).
        print(f"nettailor_tf: error: {_out_of_memory(config)}", file=sys.stderr, flush=True)
        os._exit(2)
    except (tf.errors.ResourceExhaustedError, tf.errors.InvalidArgumentError) as err:
        if isinstance(err, tf.errors.ResourceExhaustedError) or _is_allocation_failure(err):
            _fail(_out_of_memory(config))
        # Only the data pipeline's own checks (a label outside [0, num_classes))
        # are a user's error; any other InvalidArgumentError is a bug.
        check = pipeline.data_check_failure(err.message)
        if check is None:
            raise
        _fail(check)
    logging.info("done: %s", report.json_path)


# Without oneDNN's retrying allocator, a tensor that cannot be allocated can
# surface as a constant that "cannot be parsed" (measured under a memory limit).
_ALLOCATION_FAILURES = ("OOM when allocating", "Cannot parse tensor from")


def _out_of_memory(config) -> str:
    return (f"out of memory at --image_size={config.image_size} with batches of "
            f"{config.teacher.batch_size}/{config.student.batch_size}/"
            f"{config.finetune.batch_size} (teacher/student/finetune): lower "
            f"--<stage>_batch_size or --image_size")


def _is_allocation_failure(err) -> bool:
    return any(text in err.message for text in _ALLOCATION_FAILURES)


# What only a write can be refused with: the disk or file system is full or
# read-only.  Any other errno (permissions, a missing file, a folder where a
# file should be) may come from a read as well, and an OSError does not say
# which call it came from.
_WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _file_error(err: OSError, workdir: str) -> str:
    """One line for an OSError: a write failure only when it can be nothing
    else (a full or read-only disk, or the workdir itself cannot be made);
    otherwise the file, without claiming what was being done to it."""
    reason = err.strerror or type(err).__name__
    path = os.path.abspath(os.fsdecode(err.filename))
    root = os.path.abspath(workdir)
    making_the_workdir = path == root or root.startswith(path.rstrip(os.sep) + os.sep)
    if err.errno in _WRITE_ONLY_ERRNOS or making_the_workdir:
        return f"cannot write to --workdir={workdir}: {reason} ({path})"
    return (f"cannot access {path}: {reason}; it must be a readable file "
            f"(and writable, inside --workdir={workdir})")


def _strategy(config, distribution, tf):
    """The tf.distribute strategy, or a ConfigError naming what is missing."""
    from nettailor_tf.settings.config import ConfigError

    try:
        strategy = distribution.make_strategy(config.strategy, config.num_cpu_devices)
        tf.config.list_logical_devices()  # the device probe, inside the caller's filter
        return strategy
    except (ValueError, KeyError, tf.errors.OpError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        source = ("the TF_CONFIG environment variable"
                  if config.strategy == "multi_worker" else "this machine")
        raise ConfigError(f"--strategy={config.strategy}: cannot start on {source} "
                          f"({detail})", flag="strategy") from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with its errors as one line and exit code 2 instead
    of a usage dump and exit code 1."""
    for arg in argv[1:]:
        if arg.startswith("--flagfile="):
            path = arg.split("=", 1)[1]
            if not os.path.isfile(path):
                _fail(f"--flagfile={path}: no such file")
    try:
        return FLAGS(argv)
    except flags.Error as err:
        _fail(str(err).removeprefix("flag "))


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()

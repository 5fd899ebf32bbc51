"""The runtime's chatter is dropped, everything else gets through."""
import subprocess
import sys

from nettailor_tf.common import quiet


def test_known_notices_are_dropped_and_other_lines_kept():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
            "STDERR\n"
            "I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see\n"
            "E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
            "E0000 00:00:1.0 1 something.cc:9] a real error\n")
    assert quiet.drop_notices(text) == "E0000 00:00:1.0 1 something.cc:9] a real error\n"


def _stderr_of(code: str) -> str:
    """What a fresh Python process running `code` writes to stderr."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stderr


def test_native_stderr_is_filtered_line_by_line_and_restored():
    code = ("import os, sys\n"
            "from nettailor_tf.common import quiet\n"
            "with quiet.native_stderr_filtered():\n"
            "    os.write(2, b'I0 cudart_stub.cc:31] Could not find cuda drivers\\n')\n"
            "    os.write(2, b'kept line\\n')\n"
            "os.write(2, b'after\\n')\n")
    assert _stderr_of(code) == "kept line\nafter\n"


def test_library_lines_below_error_are_dropped_from_absl():
    code = ("import logging, os, sys\n"
            "from absl import logging as absl_logging\n"
            "absl_logging.use_absl_handler(); absl_logging.set_verbosity('info')\n"
            "from nettailor_tf.common import quiet\n"
            "quiet.quiet_python_loggers()\n"
            "record = logging.LogRecord('absl', logging.INFO, '/x/tensorflow/saver.py', 1,\n"
            "                           'Sharding callback duration', None, None)\n"
            "logging.getLogger('absl').handle(record)\n"
            "absl_logging.info('our line')\n")
    stderr = _stderr_of(code)
    assert "our line" in stderr and "Sharding" not in stderr

"""Runs an exported file on images, as an app would: prints one JSON object per image.

    python -m nettailor_tf.predict --model=PATH --image=FILE [--image=FILE2 ...]
        [--task=NAME] [--top_k=5]

PATH is any export of the `export` stage: a SavedModel folder (a task's
`nettailor_savedmodel/`, or the bundle's `savedmodel/`), a task's .tflite file
of any variant, or a bundle .tflite.  Every task of a bundle runs unless
--task names one (its task name or its signature key).  Each image (any
format PIL reads) is converted to RGB; a file with a static input (the
.tflite files, [1, S, S, 3]) gets it resized to S x S the way the evaluation
pipeline resizes, and a SavedModel (any size) gets it as it is: the graphs
resize where needed and centre-crop the tasks trained with crops themselves.

Output, one line per image:
  {"image": FILE, "tasks": {TASK: {"top": [{"label": NAME, "probability": P}, ...]}},
   "latency_ms": MS, "peak_memory_mb": MB}
`latency_ms` is the time of the inference call(s) for that image, every
selected task together (a SavedModel's first call includes its one-time
setup); `peak_memory_mb` the process's peak resident memory so far.  Class names come from the labels files next to the model
(`labels.txt`; `labels_<signature>.txt` for a bundle), task names from its
`export.json` where present.  A bad model, image or task is one line
`nettailor_tf.predict: error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from nettailor_tf.common import quiet
from nettailor_tf.common.errors import NetTailorError, PREDICT_COMMAND, PredictError
from nettailor_tf.image_files import check_image

FLAGS = flags.FlagValues()  # its own: importing this module adds no flag to absl's FLAGS
flags.DEFINE_string("model", None, "a SavedModel folder or a .tflite file of the export stage",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("image", None, "an image file (any format PIL reads); repeat the "
                          "flag for several", flag_values=FLAGS)
flags.DEFINE_string("task", None, "one task of a bundle (task name or signature key); "
                    "default: every task", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 5, "classes listed per task, most probable first", lower_bound=1,
                     flag_values=FLAGS)


def _parse(argv: list[str]) -> None:
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(argv)
    except flags.Error as err:
        raise PredictError(str(err).removeprefix("flag ")) from None
    if len(rest) > 1:
        raise PredictError(f"unexpected arguments {' '.join(rest[1:])}; every option is a "
                           "--flag")
    if not FLAGS.model:
        raise PredictError("--model is required: a SavedModel folder or a .tflite file")
    if not FLAGS.image:
        raise PredictError("--image is required: one image file per --image")


def main(argv: list[str] | None = None) -> int:
    """The command: JSON lines on stdout; 0, or 2 with one error line on stderr."""
    argv = list(sys.argv if argv is None else argv)
    if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help())
        return 0
    try:
        _parse(argv)
        for image in FLAGS.image:  # every image is checked before the model loads
            check_image(image)
        if not os.path.exists(os.path.expanduser(FLAGS.model)):
            raise PredictError(f"--model={FLAGS.model}: no such file or folder",
                               path=FLAGS.model)
        with quiet.native_stderr_filtered():  # TensorFlow's start-up notices
            # Imported here, not at the top: --help and a bad flag or image
            # answer without loading TensorFlow (seconds).
            import tensorflow as tf

            from nettailor_tf import inference

            tf.config.list_logical_devices()  # the device probe, inside the filter
        quiet.quiet_python_loggers()
        model = inference.load_model(FLAGS.model)
        signatures = inference.select(model, FLAGS.task)
        for image in FLAGS.image:
            print(json.dumps(inference.predict_image(image, signatures, FLAGS.top_k)),
                  flush=True)
    except NetTailorError as err:
        print(f"{PREDICT_COMMAND}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())

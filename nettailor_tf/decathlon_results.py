"""Command line: one Visual Decathlon results file from the submission stage's
per-task predictions, e.g. of ten workdirs (one per domain):

  python -m nettailor_tf.decathlon_results \
    --predictions='runs/decathlon_*/*/decathlon_test_predictions.json' \
    --output=results.json

The challenge's server takes results.json packed in a ZIP; --output=*.zip
writes that ZIP directly.  Bad input ends in one line on stderr and exit
code 2.  TensorFlow is not imported.
"""
from __future__ import annotations

import glob
import os
import sys
import zipfile

from absl import app, flags, logging

from nettailor_tf import decathlon
from nettailor_tf.common import atomic

FLAGS = flags.FLAGS

flags.DEFINE_list("predictions", None, "decathlon_test_predictions.json files or glob "
                  "patterns (quote them), one file per domain.")
flags.DEFINE_string("output", None, "The results file to write: results.json, or "
                    "results.zip for a ZIP holding results.json (what the server takes).")
flags.DEFINE_bool("require_all_domains", True, "Refuse a results file that lacks some of the "
                  "ten domains (the challenge scores all ten).")


def _fail(message: str) -> None:
    print(f"nettailor_tf.decathlon_results: error: {message}", file=sys.stderr)
    sys.exit(2)


def _expand(patterns: list[str]) -> list[str]:
    paths = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            _fail(f"--predictions: {pattern!r} matches no file")
        paths.extend(found)
    return paths


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag")
    if not FLAGS.predictions:
        _fail("--predictions is required: the decathlon_test_predictions.json files")
    if not FLAGS.output:
        _fail("--output is required: results.json or results.zip")
    paths = _expand(FLAGS.predictions)
    as_zip = FLAGS.output.endswith(".zip")
    try:
        records = decathlon.merge_task_predictions(
            paths, require_all_domains=FLAGS.require_all_domains)
    except ValueError as err:
        _fail(str(err))
    text = decathlon.submission_text(records)
    try:
        if as_zip:
            with atomic.replacing_file(FLAGS.output) as tmp:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                    archive.writestr("results.json", text)
        else:
            atomic.write_text(FLAGS.output, text)
    except OSError as err:
        _fail(f"--output={FLAGS.output}: {err.strerror or err}")
    domains = sorted(decathlon.read_submission(records))
    logging.info("wrote %d predictions of %d domains (%s) to %s", len(records), len(domains),
                 ", ".join(domains), os.path.abspath(FLAGS.output))


def run():
    app.run(main)


if __name__ == "__main__":
    run()

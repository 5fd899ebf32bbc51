"""How well the latency table predicts whole networks, at any image size.

    python benchmarks/latency_prediction.py --workdir=runs/quickstart --image_size=160

For each task of a finished workdir, its pruned plan and the teacher's
network are built at --image_size (float32 time does not depend on the
weights' values, so the backbone's random initial weights stand in), exported
to float32 .tflite as the export stage does, and timed with the LiteRT
interpreter (1 thread, interleaved rounds); the table for that size is
measured (or read from the cache; `--cache_dir=EMPTY_FOLDER` measures it
now) and its prediction printed beside each.
Prints one JSON line per network and a last line with the largest error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nettailor_tf import config as config_lib  # noqa: E402  (after the path above)


def predicted_and_measured(workdir: str, image_size: int, threads: int = 1, runs: int = 200,
                           cache_dir: str | None = None) -> list[dict]:
    from exporters import latency as latency_lib
    from exporters import savedmodel
    from nettailor_tf import backbones, prune
    from nettailor_tf import latency_measure
    from nettailor_tf import quiet
    from nettailor_tf import student as student_lib
    from nettailor_tf.workdir import Workdir

    with open(os.path.join(workdir, "settings.json"), encoding="utf-8") as f:
        settings = json.load(f)
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    name = settings["backbone"]
    max_skip = config_lib.parse_max_skip(str(settings["max_skip"]))
    table, _ = latency_measure.cached_table(name, image_size, threads, max_skip, cache_dir)
    paths = Workdir(workdir)
    backbone = backbones.build_backbone(name)
    networks = {}
    for task, entry in report["tasks"].items():
        plan, _ = prune.load_plan(paths.plan(task))
        networks[(task, "NetTailor")] = plan
        networks[(task, "teacher")] = student_lib.Plan.backbone_only(len(plan.blocks))
    files = {}
    with tempfile.TemporaryDirectory(prefix="nettailor_prediction_") as folder:
        for (task, network), plan in networks.items():
            content = latency_measure.whole_network_content(
                backbone, plan, image_size, report["tasks"][task]["num_classes"])
            path = os.path.join(folder, f"{task}_{network}.tflite")
            with open(path, "wb") as f:
                f.write(content)
            files[(task, network)] = (path, savedmodel.SERVING_KEY)
        image = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3),
                                                  dtype=np.uint8)
        with quiet.native_stderr_filtered():
            measured = latency_lib.measure_many(files, image, threads, runs=runs)
    rows = []
    for (task, network), plan in networks.items():
        predicted = table.predict_ms(plan)
        latency = measured[(task, network)]
        rows.append({"task": task, "network": network, "image_size": image_size,
                     "predicted_ms": round(predicted, 4), "measured_ms": round(latency.median_ms, 4),
                     "error": round(predicted / latency.median_ms - 1, 4),
                     "other_load_cores": latency.other_load_cores, "busy": latency.busy})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--image_size", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--cache_dir", default=None,
                        help="where the table is cached (default: the user's cache); an empty "
                             "folder measures it now, next to the networks: the fair check on "
                             "a machine whose speed drifts")
    args = parser.parse_args(argv)
    rows = predicted_and_measured(args.workdir, args.image_size, args.threads, args.runs,
                                  args.cache_dir)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"largest_error": max(abs(r["error"]) for r in rows),
                      "busy": any(r["busy"] for r in rows)}))


if __name__ == "__main__":
    main()

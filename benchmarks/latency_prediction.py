"""How well the latency table predicts whole networks, at any image size.

    python benchmarks/latency_prediction.py --workdir=runs/quickstart --image_size=64 \
        --random_plans=4

For each task of a finished workdir, its pruned plan and the teacher's
network are built at --image_size (float32 time does not depend on the
weights' values, so the backbone's random initial weights stand in), and
with --random_plans=N as many pruned networks drawn from the full student
with another seed than the table's own calibration networks (held out: the
table is never fitted on a network it is checked against).  Each is exported
to float32 .tflite as the export stage does and timed with the LiteRT
interpreter (1 thread) in the same rounds and under the same load check as a
table measured now; `--cache_dir` instead reads the table from that cache
(measuring it there if missing) and times the networks after it.
Prints one JSON line per network and a last line with the largest error.
With --own_passes, each network's parts are also timed in passes over every
branch of the full student (as the table times them) and in passes over only
its own branches, and their sums printed beside it: where the two differ,
the table's passes, not the parts, are what over-counts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nettailor_tf.settings import config as config_lib  # noqa: E402  (after the path above)

HELD_OUT_SEED = 1  # the table's own calibration networks use seed 0


def networks_of(workdir: str, random_plans: int = 0) -> tuple[dict, dict, dict]:
    """(settings, {(task, network): plan}, {task: classes}) of a finished workdir."""
    from nettailor_tf.latency import measure
    from nettailor_tf.model import pruning, student_network
    from nettailor_tf.run.workdir import Workdir

    with open(os.path.join(workdir, "settings.json"), encoding="utf-8") as f:
        settings = json.load(f)
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    paths = Workdir(workdir)
    networks, classes = {}, {}
    for task, entry in report["tasks"].items():
        plan, _ = pruning.load_plan(paths.plan(task))
        networks[(task, "NetTailor")] = plan
        networks[(task, "teacher")] = student_network.Plan.backbone_only(len(plan.blocks))
        classes[task] = entry["num_classes"]
    if random_plans:
        max_skip = config_lib.parse_max_skip(str(settings["max_skip"]))
        drawn = measure.sample_plans(len(plan.blocks), max_skip, random_plans,
                                     seed=HELD_OUT_SEED)
        for index, sample in enumerate(drawn.values()):
            networks[("held_out", f"random{index}")] = sample
        classes["held_out"] = 10
    return settings, networks, classes


def predicted_and_measured(workdir: str, image_size: int, threads: int = 1, runs: int = 200,
                           cache_dir: str | None = None, random_plans: int = 0,
                           table_out: str | None = None) -> list[dict]:
    from exporters import savedmodel, timing
    from nettailor_tf.common import quiet
    from nettailor_tf.latency import measure
    from nettailor_tf.latency.table import plan_as_dict
    from nettailor_tf.model import backbones

    settings, networks, classes = networks_of(workdir, random_plans)
    name = settings["backbone"]
    max_skip = config_lib.parse_max_skip(str(settings["max_skip"]))
    backbone = backbones.build_backbone(name)
    files = {}
    with tempfile.TemporaryDirectory(prefix="nettailor_prediction_") as folder:
        for (task, network), plan in networks.items():
            content = measure.whole_network_content(backbone, plan, image_size,
                                                    classes[task])
            path = os.path.join(folder, f"{task}_{network}.tflite")
            with open(path, "wb") as f:
                f.write(content)
            files[(task, network)] = (path, savedmodel.SERVING_KEY)
        if cache_dir is None:
            table, measured = measure.measure_table_beside(
                name, image_size, threads, max_skip, files, runs)
        else:
            table, _ = measure.cached_table(name, image_size, threads, max_skip,
                                            cache_dir)
            image = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3),
                                                      dtype=np.uint8)
            with quiet.native_stderr_filtered():
                measured = timing.measure_many(files, image, threads, runs=runs)
    if table_out:
        table.save(table_out)
    rows = []
    for (task, network), plan in networks.items():
        predicted = table.predict_ms(plan)
        latency = measured[(task, network)]
        rows.append({"task": task, "network": network, "image_size": image_size,
                     "predicted_ms": round(predicted, 4), "measured_ms": round(latency.median_ms, 4),
                     "error": round(predicted / latency.median_ms - 1, 4),
                     "other_load_cores": latency.other_load_cores, "busy": latency.busy,
                     "table_other_load_cores": table.other_load_cores,
                     "plan": plan_as_dict(plan),
                     "table_calibration": table.calibration().as_dict()})
    return rows


def own_passes(workdir: str, image_size: int, rows: list[dict], threads: int = 1,
               runs: int = 200) -> list[dict]:
    """Each network of `rows`: its parts summed as the table's passes time
    them and as passes over only its own branches time them."""
    from nettailor_tf.latency import measure
    from nettailor_tf.latency.table import plan_view

    with open(os.path.join(workdir, "settings.json"), encoding="utf-8") as f:
        settings = json.load(f)
    plans = {(r["task"], r["network"]): plan_view(r["plan"]) for r in rows}
    sums = measure.parts_by_pass(
        settings["backbone"], image_size, threads,
        config_lib.parse_max_skip(str(settings["max_skip"])), plans, runs)
    return [{"task": r["task"], "network": r["network"], "measured_ms": r["measured_ms"],
             "parts_every_branch_pass_ms": round(sums[(r["task"], r["network"])][0], 4),
             "parts_own_pass_ms": round(sums[(r["task"], r["network"])][1], 4)} for r in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--image_size", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--random_plans", type=int, default=0,
                        help="held-out pruned networks drawn from the full student, on top of "
                             "the workdir's")
    parser.add_argument("--cache_dir", default=None,
                        help="read the table from this cache (measured there if missing) and "
                             "time the networks after it; default: measure it now, in the same "
                             "rounds as the networks")
    parser.add_argument("--table_out", default=None,
                        help="also write the table here (to refit it offline)")
    parser.add_argument("--own_passes", action="store_true",
                        help="also sum each network's parts timed in passes over every branch "
                             "and over only its own (a diagnosis; a minute more)")
    args = parser.parse_args(argv)
    rows = predicted_and_measured(args.workdir, args.image_size, args.threads, args.runs,
                                  args.cache_dir, args.random_plans, args.table_out)
    for row in rows:
        print(json.dumps(row))
    if args.own_passes:
        for row in own_passes(args.workdir, args.image_size, rows, args.threads, args.runs):
            print(json.dumps(row))
    print(json.dumps({"largest_error": max(abs(r["error"]) for r in rows),
                      "busy": any(r["busy"] for r in rows)}))


if __name__ == "__main__":
    main()

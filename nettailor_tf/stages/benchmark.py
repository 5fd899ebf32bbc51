"""The benchmark stage: LiteRT latency of every exported .tflite file (1
thread and every core, interleaved rounds, marked busy when other processes
took CPU meanwhile), the latency table's prediction for each network beside
it, and for the bundle its signatures' latency, its memory and the plots.

The prediction's table is measured here, once every task is timed, with the
float32 files of every task timed in the same rounds as its branches and
under the same load check: on this project's shared 2-core machine a table
timed minutes apart from the files (the cached one) was off by 47-77%, and
one timed right after them, in the same stage, by +54-71% on one run and
-14 to +24% on the next.
"""
from __future__ import annotations

import os

from absl import logging

from exporters import timing
from exporters import memory as memory_lib
from exporters import savedmodel
from nettailor_tf.run import artifacts, deployment_plots as visualize
from nettailor_tf.latency import measure as latency_measure
from nettailor_tf.latency.table import default_cache_dir
from nettailor_tf.common import quiet
from nettailor_tf.model import pruning
from nettailor_tf.model import student_network
from nettailor_tf.settings.config import Config
from nettailor_tf.run.report import Report
from nettailor_tf.stages import recommend
from nettailor_tf.run.workdir import Workdir


def _threads() -> list[int]:
    return sorted({1, timing.all_cores()})


def run_benchmark(config: Config, strategy, task, report: Report) -> bool:
    """Latency of every TFLite file of the task (1 thread and all cores)."""
    del strategy
    parts = {"nettailor": report.get(task.name, "tflite"),
             "teacher": report.get(task.name, "teacher_tflite")}
    if not all(parts.values()):
        raise artifacts.StageError(f"{task.name}: nothing exported yet; run --stages=export first")
    entries = {(network, variant): entry for network, part in parts.items()
               for variant, entry in part.items()}
    if all("latency_ms" in e for e in entries.values()):
        logging.info("%s: benchmark stage already done; skipping", task.name)
        return True
    logging.info("%s: benchmark stage: timing %d TFLite files, %d runs each", task.name,
                 len(entries), config.benchmark_runs)
    image = recommend.benchmark_image(config, task)
    files = {name: (os.path.join(config.workdir, e["path"]), savedmodel.SERVING_KEY)
             for name, e in entries.items()}
    with quiet.native_stderr_filtered():
        results = {t: timing.measure_many(files, image, t, config.benchmark_warmup,
                                               config.benchmark_runs) for t in _threads()}
    costs = {"nettailor": report.get(task.name, "pruned"),
             "teacher": report.get(task.name, "teacher")}
    cores = timing.all_cores()
    for (network, variant), entry in entries.items():
        entry["latency"] = {str(t): results[t][(network, variant)].as_dict() for t in results}
        entry["latency_ms"] = results[1][(network, variant)].median_ms
        entry["latency_ms_all_cores"] = results[cores][(network, variant)].median_ms
        entry["flops"] = costs[network]["flops"]
        entry["params"] = costs[network].get("params_total", costs[network].get("params"))
        logging.debug("%s: %s %s: %.3f ms (1 thread), %.3f ms (%d threads)", task.name,
                      network, variant, entry["latency_ms"], entry["latency_ms_all_cores"], cores)
    ratios = ""
    if "float32" in parts["nettailor"] and "float32" in parts["teacher"]:
        ratio = parts["nettailor"]["float32"]["latency_ms"] / parts["teacher"]["float32"][
            "latency_ms"]
        flops_ratio = costs["nettailor"]["flops"] / costs["teacher"]["flops"]
        report.task(task.name)["latency_ratio_float32"] = ratio
        report.task(task.name)["flops_ratio"] = flops_ratio
        ratios = (f"; NetTailor/teacher float32: latency {ratio:.3f}, multiply-adds "
                  f"{flops_ratio:.3f}")
    logging.info("%s: latency at 1 thread, ms, median [p10, p90]: %s%s", task.name, ", ".join(
        f"{network} {variant} {_spread(entry['latency']['1'])}"
        for (network, variant), entry in entries.items()), ratios)
    report.save()
    return True


def _prediction_files(config: Config, tasks, report: Report) -> dict:
    """{(task, 'pruned' or 'teacher'): (float32 .tflite, signature)} of every
    network the table predicts."""
    files = {}
    for task in tasks:
        for part, exported in (("pruned", "tflite"), ("teacher", "teacher_tflite")):
            entry = (report.get(task.name, exported) or {}).get("float32")
            if entry and report.get(task.name, part) is not None:
                files[(task.name, part)] = (os.path.join(config.workdir, entry["path"]),
                                            savedmodel.SERVING_KEY)
    return files


def predict_latencies(config: Config, tasks, report: Report) -> None:
    """The float32 latency a 1-thread latency table of this machine predicts
    for every task's pruned network and teacher, the table measured now with
    those files timed in its rounds; each prediction's error against that
    timing (`predicted_latency_error`) and against the benchmark's
    (`predicted_latency_error_benchmark`)."""
    files = _prediction_files(config, tasks, report)
    paths = Workdir(config.workdir)
    done = all("predicted_latency_error" in report.get(t, part) for t, part in files)
    if not files or (done and os.path.exists(paths.latency_prediction_table)):
        return
    logging.info("latency table: measuring one for the predictions, with the %d float32 files "
                 "timed in its rounds", len(files))
    # The branches' files come from the latency cache when a run (this
    # one's latency-priced student, or an earlier run) converted them.
    table, measured = latency_measure.measure_table_beside(
        config.backbone, config.image_size, 1, config.max_skip, files,
        cache_dir=config.latency_cache_dir or default_cache_dir())
    table.save(paths.latency_prediction_table)
    table.source = paths.relative(paths.latency_prediction_table)
    plans = {name: pruning.load_plan(paths.plan(name))[0] for name, _ in files}
    for (name, part), latency in measured.items():
        plan = (plans[name] if part == "pruned"
                else student_network.Plan.backbone_only(len(plans[name].blocks)))
        predicted = table.predict_ms(plan)
        benchmark = report.get(name, "tflite" if part == "pruned" else "teacher_tflite")[
            "float32"].get("latency_ms")
        report.get(name, part).update(
            predicted_latency_ms=round(predicted, 5),
            predicted_latency_measured_ms=round(latency.median_ms, 5),
            predicted_latency_error=round(predicted / latency.median_ms - 1, 4),
            predicted_latency_error_benchmark=(round(predicted / benchmark - 1, 4)
                                               if benchmark else None))
        logging.info("%s: latency table predicts %.3f ms for the %s float32 network, %+.0f%% "
                     "of its time in the table's rounds (%.3f ms)", name, predicted, part,
                     100 * (predicted / latency.median_ms - 1), latency.median_ms)
    busy = (table.other_load_cores is not None
            and table.other_load_cores > timing.BUSY_CORES)
    report.data["latency_prediction_table"] = {
        "fingerprint": table.fingerprint(), "device": table.device, "threads": table.threads,
        "path": table.source, "other_load_cores": table.other_load_cores, "busy": busy,
        "format": table.format, "calibration": table.calibration().as_dict()}
    if busy:
        logging.warning("the latency table and the files it predicts were timed while other "
                        "processes kept %.2f cores busy: the predictions and their errors are "
                        "busy-machine figures", table.other_load_cores)


def _spread(latency: dict) -> str:
    return f"{latency['median_ms']:.3f} [{latency['p10_ms']:.3f}, {latency['p90_ms']:.3f}]"


def benchmark_bundle(config: Config, tasks, report: Report) -> None:
    """Latency of each signature of the bundle files, and the summary plot."""
    bundle = report.data.get("bundle")
    if bundle:
        image = recommend.benchmark_image(config, tasks[0])
        files = {(variant, task.name): (os.path.join(config.workdir, info["path"]),
                                        info["tasks"][task.name]["signature"])
                 for variant, info in bundle["variants"].items() for task in tasks}
        measured = timing.measure_many(files, image, 1, config.benchmark_warmup,
                                            config.benchmark_runs)
        bundle["latency"] = {variant: {task.name: measured[(variant, task.name)].median_ms
                                       for task in tasks} for variant in bundle["variants"]}
        bundle["latency_other_load_cores"] = next(iter(measured.values())).other_load_cores
        if "float32" in bundle["variants"]:
            bundle["memory_mb"] = _bundle_memory(config, tasks, report, bundle)
            logging.info("bundle: peak memory running every task once (MB over a %.1f MB "
                         "runtime): separate files %.1f, bundle %.1f, bundle with XNNPACK's "
                         "weight cache in memory %.1f", *(bundle["memory_mb"][k] for k in (
                             "baseline", "separate_files", "bundle", "bundle_in_memory_cache")))
    predict_latencies(config, tasks, report)
    paths = Workdir(config.workdir)
    visualize.plot_deployment(paths.deployment_png, report.data)
    report.data["deployment_png"] = paths.relative(paths.deployment_png)
    if visualize.latency_prediction_points(report.data):
        visualize.plot_latency_prediction(paths.latency_prediction_png, report.data)
        report.data["latency_prediction_png"] = paths.relative(paths.latency_prediction_png)
    report.save()


def _bundle_memory(config: Config, tasks, report: Report, bundle: dict) -> dict:
    """Peak memory of running every task once: separate float32 files
    against the float32 bundle, without XNNPACK's weight cache, with it in a
    file and with it in memory (one process each: about two seconds apiece)."""
    separate = [os.path.join(config.workdir, report.get(task.name, "tflite")["float32"]["path"])
                for task in tasks]
    return memory_lib.bundle_memory(
        separate, os.path.join(config.workdir, bundle["variants"]["float32"]["path"]),
        repeats=1)

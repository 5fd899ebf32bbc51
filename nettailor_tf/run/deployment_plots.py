"""Deployment plots of a finished run, from report.json: accuracy against
multiply-adds and against LiteRT latency per task (deployment.png), and the
latency the cost model predicted against the latency measured
(latency_prediction.png).

Plain Python and matplotlib (the Agg canvas, no pyplot global state); no
TensorFlow.
"""
from __future__ import annotations

from matplotlib.figure import Figure

from nettailor_tf.common import atomic


def _save_png(fig, path: str) -> None:
    with atomic.replacing_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)


_VARIANT_MARKERS = {"float32": "o", "float16": "s", "dynamic": "D", "int8": "^",
                    "int8_weights": "v", "int4_weights": "<", "mixed": "P"}


def plot_deployment(path: str, report: dict) -> None:
    """Accuracy against multiply-adds and against 1-thread LiteRT latency, per
    task: the teacher and each NetTailor TFLite variant (from report.json)."""
    fig = Figure(figsize=(11, 4.2))
    by_flops, by_latency = fig.subplots(1, 2)
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    for index, (name, task) in enumerate(report.get("tasks", {}).items()):
        color = colors[index % len(colors)]
        for network, part, filled in (("teacher", task.get("teacher_tflite") or {}, False),
                                      ("NetTailor", task.get("tflite") or {}, True)):
            for variant, entry in part.items():
                marker = _VARIANT_MARKERS.get(variant, "o")
                style = dict(marker=marker, s=46, edgecolors=color,
                             facecolors=color if filled else "none",
                             label=f"{name} {network} {variant}")
                if entry.get("flops") is not None:
                    by_flops.scatter(entry["flops"] / 1e6, 100 * entry["accuracy"], **style)
                if entry.get("latency_ms") is not None:
                    by_latency.scatter(entry["latency_ms"], 100 * entry["accuracy"], **style)
    by_flops.set_xlabel("multiply-adds per image (M)")
    by_latency.set_xlabel("latency, batch 1, 1 thread (ms)")
    for ax in (by_flops, by_latency):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = by_latency.get_legend_handles_labels()
    if not handles:
        handles, labels = by_flops.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(f"Deployment: {report.get('backbone')} at {report.get('image_size')} px "
                 "(hollow: teacher, filled: NetTailor)", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.78, bottom=0.13, top=0.88, wspace=0.25)
    _save_png(fig, path)


def latency_prediction_points(report: dict) -> list[dict]:
    """(task, network, variant, predicted, measured, error, load) of every
    timed file whose network has a predicted float32 latency (report.json's
    `predicted_latency_ms`): `measured_ms` is the benchmark's 1-thread
    median, `error` predicted / measured - 1, `other_load_cores` that
    timing's load check; a float32 file also has `table_rounds_ms`, its
    time in the latency table's own rounds, and `table_rounds_error`."""
    points = []
    for name, task in report.get("tasks", {}).items():
        for network, cost, part in (("teacher", task.get("teacher") or {},
                                     task.get("teacher_tflite") or {}),
                                    ("NetTailor", task.get("pruned") or {},
                                     task.get("tflite") or {})):
            predicted = cost.get("predicted_latency_ms")
            for variant, entry in part.items():
                if predicted is None or not entry.get("latency_ms"):
                    continue
                timed = (entry.get("latency") or {}).get("1") or {}
                point = {"task": name, "network": network, "variant": variant,
                         "predicted_ms": predicted, "measured_ms": entry["latency_ms"],
                         "error": predicted / entry["latency_ms"] - 1,
                         "other_load_cores": timed.get("other_load_cores"),
                         "busy": bool(timed.get("busy"))}
                beside = cost.get("predicted_latency_measured_ms")
                if variant == "float32" and beside:
                    point.update(table_rounds_ms=beside, table_rounds_error=predicted / beside - 1)
                points.append(point)
    return points


def plot_latency_prediction(path: str, report: dict, band: float = 0.1) -> None:
    """Measured 1-thread latency of every file against the float32 latency the
    latency table predicts for its network, with the identity and a +-`band`
    band (the quantised variants show how far each moves from float32); a
    float32 file's legend gives its prediction's error and a busy timing."""
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    points = latency_prediction_points(report)
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    tasks = list(dict.fromkeys(p["task"] for p in points))
    for p in points:
        color = colors[tasks.index(p["task"]) % len(colors)]
        filled = p["network"] == "NetTailor"
        ax.scatter(p["predicted_ms"], p["measured_ms"], s=46, zorder=3,
                   marker=_VARIANT_MARKERS.get(p["variant"], "o"), edgecolors=color,
                   facecolors=color if filled else "none",
                   label=f"{p['task']} {p['network']} {p['variant']}" + (
                       f" ({p['error']:+.0%}{', busy' if p['busy'] else ''})"
                       if p["variant"] == "float32" else ""))
        if "table_rounds_ms" in p:  # the same network timed in the table's rounds
            ax.scatter(p["predicted_ms"], p["table_rounds_ms"], s=40, zorder=3, marker="x",
                       color=color, label=f"{p['task']} {p['network']} float32 in the table's "
                       f"rounds ({p['table_rounds_error']:+.0%})")
    if points:
        top = 1.15 * max(max(p["predicted_ms"], p["measured_ms"]) for p in points)
        line = [0, top]
        ax.plot(line, line, color="0.3", lw=1, zorder=2, label="measured = predicted")
        ax.fill_between(line, [0, top * (1 - band)], [0, top * (1 + band)], color="0.85",
                        alpha=0.6, zorder=1, label=f"within {band:.0%}")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
    ax.set_xlabel("predicted float32 latency, 1 thread (ms, latency table)")
    ax.set_ylabel("measured latency, 1 thread (ms, LiteRT)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(f"Latency table against the exported files: {report.get('backbone')} at "
                 f"{report.get('image_size')} px (hollow: teacher, filled: NetTailor)",
                 fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.6, bottom=0.11, top=0.9)
    _save_png(fig, path)

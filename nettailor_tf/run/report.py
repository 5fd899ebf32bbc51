"""`<workdir>/report.json` (the contract of README, "Outputs") and `report.md`.

Both files are rewritten whole through a temporary file and a rename, so a
run killed mid-write leaves the previous report, never half of one.
"""
from __future__ import annotations

import json
import os

from nettailor_tf.common import atomic
from nettailor_tf.run.deployment_plots import latency_prediction_points
from nettailor_tf.run.workdir import Workdir, WorkdirError
from nettailor_tf.settings.tuned import DIFFUSE_GATE_ENTROPY


class Report:
    """The run's results, keyed as README, "Outputs" fixes; saved after each change."""
    def __init__(self, workdir: str, backbone: str, image_size: int):
        paths = Workdir(workdir)
        self.json_path, self.md_path = paths.report_json, paths.report_md
        if os.path.exists(self.json_path):
            try:
                with open(self.json_path, encoding="utf-8") as f:
                    self.data = json.load(f)
            except ValueError as error:
                raise WorkdirError(f"{self.json_path} cannot be read ({error}); delete it and "
                                   f"run again: finished stages are read back from their "
                                   f"files and checkpoints", path=self.json_path) from None
            if (self.data.get("backbone"), self.data.get("image_size")) != (backbone, image_size):
                raise WorkdirError(
                    f"{self.json_path} belongs to a run with --backbone="
                    f"{self.data.get('backbone')} --image_size={self.data.get('image_size')}; "
                    f"use another --workdir or the same flags", path=self.json_path)
        else:
            self.data = {"backbone": backbone, "image_size": image_size, "tasks": {}}

    def task(self, name: str) -> dict:
        return self.data["tasks"].setdefault(name, {})

    def get(self, task: str, part: str) -> dict | None:
        return self.data["tasks"].get(task, {}).get(part)

    def set(self, task: str, part: str, value: dict) -> None:
        self.task(task)[part] = value
        self.save()

    def save(self) -> None:
        atomic.write_text(self.json_path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        atomic.write_text(self.md_path, render_markdown(self.data))


def _fmt_count(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _fmt_acc(a) -> str:
    return "-" if a is None else f"{100 * a:.2f}%"


def render_markdown(data: dict) -> str:
    lines = [f"# NetTailor report: {data['backbone']} at {data['image_size']} px", ""]
    for name, task in data["tasks"].items():
        lines += [f"## {name} ({task.get('num_classes', '?')} classes)", "",
                  "| network | test accuracy | validation accuracy | params | multiply-adds |",
                  "| --- | --- | --- | --- | --- |"]
        teacher = task.get("teacher")
        if teacher:
            lines.append(f"| fine-tuned teacher | {_fmt_acc(teacher['accuracy'])} | "
                         f"{_fmt_acc(teacher.get('val_accuracy'))} | "
                         f"{_fmt_count(teacher.get('params'))} | {_fmt_count(teacher.get('flops'))} |")
        student = task.get("student")
        if student:
            lines.append(f"| NetTailor student (before pruning) | {_fmt_acc(student['accuracy'])}"
                         f" | {_fmt_acc(student.get('val_accuracy'))} | - | - |")
        pruned = task.get("pruned")
        if pruned and pruned.get("accuracy_before_finetune") is not None:
            lines.append(f"| NetTailor pruned, before fine-tuning | "
                         f"{_fmt_acc(pruned['accuracy_before_finetune'])} | "
                         f"{_fmt_acc(pruned.get('val_accuracy_before_finetune'))} | - | - |")
        if pruned:
            ratio = (f" ({pruned['flops'] / teacher['flops']:.0%} of the teacher)"
                     if teacher and teacher.get("flops") else "")
            lines.append(f"| NetTailor pruned | {_fmt_acc(pruned['accuracy'])} | "
                         f"{_fmt_acc(pruned.get('val_accuracy'))} | "
                         f"{_fmt_count(pruned['params_total'])} total, "
                         f"{_fmt_count(pruned['params_task_specific'])} task-specific | "
                         f"{_fmt_count(pruned['flops'])}{ratio} |")
        cost = (pruned or {}).get("latency_cost")
        if cost:
            lines += ["", f"Priced in milliseconds (`--complexity_cost=latency`): the latency "
                          f"table measured on {cost['device']} ({cost['threads']} thread"
                          f"{'' if cost['threads'] == 1 else 's'}) predicts "
                          f"{cost['predicted_ms']:.3f} ms for the pruned network, "
                          f"{cost['fraction_of_teacher']:.0%} of the teacher's "
                          f"{cost['teacher_predicted_ms']:.3f} ms."]
        lines += [""] + [f"**Finding:** {text}" for text in findings(task)]
        lines.append("")
        if pruned:
            lines.append(f"Kept {pruned['universal_blocks_kept']} universal blocks and "
                         f"{pruned['proxies_kept']} proxies; {pruned.get('blocks_live', '?')} "
                         f"blocks still compute something.")
            lines += _decision_lines(pruned)
        if student and student.get("gate_entropy") is not None:
            lines.append(f"Student gate entropy {student['gate_entropy']:.3f} (mean over blocks, "
                         f"0: each block picks one branch, 1: uniform).")
        for stage in ("teacher", "student", "pruned"):
            part = task.get(stage) or {}
            if "train_images_per_second" in part:
                lines.append(f"{stage.capitalize()} training: {part.get('epochs')} epochs, "
                             f"{part.get('steps')} steps, "
                             f"{part['train_images_per_second']:.0f} images/s"
                             f"{_how_it_stopped(part)}.")
        if task.get("architecture_png"):
            lines += ["", f"![{name} architecture]({task['architecture_png']})"]
        lines.append("")
        lines += _deployment_table(task)
    lines += _bundle_section(data.get("bundle"))
    if data.get("deployment_png"):
        lines += [f"![accuracy against multiply-adds and latency]({data['deployment_png']})", ""]
    lines += _latency_prediction_section(data)
    submission = data.get("decathlon_submission")
    if submission:
        lines += ["## Visual Decathlon test set", "",
                  f"{submission['path']}: the challenge's results file, {submission['images']} "
                  f"test predictions of {', '.join(submission['domains'])}.", ""]
    return "\n".join(lines)


def _how_it_stopped(part: dict) -> str:
    """', converged (...)' or ', not converged ...' for a stage the plateau rule ran."""
    if part.get("stopped") not in ("plateau", "cap"):
        return ""
    if part["stopped"] == "plateau":
        return (f", converged: stopped by the plateau rule (last improvement at step "
                f"{part['best_step']}, the rate lowered {part['lr_reductions']} time(s), "
                f"validation loss {part['val_loss']:.4f})")
    return (f", **not converged**: reached its cap of {part['cap_steps']} steps still "
            f"improving (last improvement at step {part['best_step']})")


# Each training stage's report entry, and its flags' prefix.
_STAGE_FLAGS = {"teacher": "teacher", "student": "student", "pruned": "finetune"}


# Accuracy a pruned network (or a quantised file) may lose before it is called out.
PRUNED_GAP_NOTED = 0.005
# Top-1 agreement with Keras under which a quantised file is called out.
QUANTIZED_AGREEMENT = 0.98


def findings(task: dict) -> list[str]:
    """Results that are not what the method promises, in words: a student
    near chance, diffuse gates, a pruned network below its teacher, pruning
    that saved nothing, a stage that reached its cap still improving.
    Empty when all is as it should be."""
    notes = []
    teacher, student, pruned = (task.get(k) or {} for k in ("teacher", "student", "pruned"))
    classes = task.get("num_classes")
    if student.get("accuracy") is not None and classes:
        chance = 1 / classes
        if student["accuracy"] < chance + 0.5 * (teacher.get("accuracy", 1) - chance):
            notes.append(f"the student ({_fmt_acc(student['accuracy'])}) is closer to chance "
                         f"({_fmt_acc(chance)}) than to its teacher: it has not converged; "
                         f"give it more steps (--student_min_steps) or a lower --student_lr.")
    if student.get("gate_entropy") is not None and student["gate_entropy"] > DIFFUSE_GATE_ENTROPY:
        notes.append(f"the student's gates are diffuse (entropy {student['gate_entropy']:.2f}): "
                     f"pruning then cuts paths that still carry signal.")
    if pruned.get("accuracy") is not None and teacher.get("accuracy") is not None:
        gap = pruned["accuracy"] - teacher["accuracy"]
        if gap < -PRUNED_GAP_NOTED:
            notes.append(f"the pruned network is {100 * -gap:.2f} points below its teacher.")
        if teacher.get("flops") and pruned.get("flops", 0) >= teacher["flops"]:
            notes.append("pruning saved no multiply-adds: the pruned network costs as much as "
                         "its teacher.")
    for part, flag in _STAGE_FLAGS.items():
        entry = task.get(part) or {}
        if entry.get("stopped") == "plateau" and entry.get("best_step") == 0:
            loss = entry.get("val_loss")
            notes.append(f"the {flag} stage never improved on its starting weights and ends "
                         f"with them (validation loss {loss if loss is None else round(loss, 4)}"
                         f"): its training only made them worse; try a lower --{flag}_lr.")
        if entry.get("converged") is False:
            notes.append(f"the {flag} stage reached its cap of {entry['cap_steps']} steps "
                         f"still improving (last at step {entry['best_step']}): it has not "
                         f"converged; raise --{flag}_epochs or --{flag}_min_steps.")
    notes += _search_findings(pruned)
    busy_threads, load = _busy_latencies(task)
    if busy_threads:
        notes.append(f"the latencies at {' and '.join(busy_threads)} thread(s) were timed while "
                     f"other processes kept {load:.1f} cores busy: read them as upper bounds, "
                     f"and time again on a quiet machine (--restart_from=benchmark).")
    mixed = ((task.get("tflite") or {}).get("mixed") or {}).get("mixed") or {}
    if mixed and not mixed.get("met_budget", True):
        notes.append(f"the mixed file misses its budget even with all {mixed['layers']} layers "
                     f"kept in {mixed['kept_as']} ({_fmt_acc(mixed['selection_accuracy'])} "
                     f"against float32's {_fmt_acc(mixed['selection_float32_accuracy'])} on "
                     f"the selection split): these weights need more than "
                     f"{mixed['kept_as']}; ship float16 or float32.")
    reference = (task.get("tflite") or {}).get("float32", {}).get("accuracy")
    for variant, entry in (task.get("tflite") or {}).items():
        said = _quantisation_damage(variant, entry, reference)
        if said:
            notes.append(f"the {variant} file {' and '.join(said)}: quantisation changed its "
                         f"predictions.")
    return notes


def _decision_lines(pruned: dict) -> list[str]:
    """How the prune search chose, and the pruned network against its
    teacher, each with its evidence (paired differences, points)."""
    def paired(entry: dict) -> str:
        return (f"{100 * entry['difference']:+.2f} +- {100 * entry['standard_error']:.2f} "
                f"points on {entry['images']} images")

    lines = []
    search = pruned.get("prune_search") or {}
    if search.get("rule") and "damage" in search:
        held = (f"the allowance {100 * search['allowance']:.2f} points"
                if search["rule"] == "allowance" else
                " and ".join(f"{name} {search[key]}" for name, key in (
                    ("--flops_budget", "flops_budget"),
                    ("--latency_budget_ms", "latency_budget_ms")) if search.get(key)))
        lines.append(f"Prune search ({search['rule']}): N={search['chosen']} universal blocks "
                     f"cut; as pruned, the student's accuracy minus this network's was "
                     f"{paired(search['damage'])}, held to {held}.")
    test = (pruned.get("vs_teacher") or {}).get("test")
    if test:
        lines.append(f"Against its teacher on the test images, image by image: "
                     f"{paired(test)} (90% bounds {100 * test['lower']:+.2f} to "
                     f"{100 * test['upper']:+.2f}).")
    return lines


def _search_findings(pruned: dict) -> list[str]:
    """What the prune search could not do, and a pruned network that the
    test images show, with confidence, to be below its teacher."""
    notes = []
    search = pruned.get("prune_search") or {}
    if search and not search.get("met", search.get("met_tolerance", True)):
        if search.get("rule") == "budget":
            notes.append(f"the budget is out of reach: the leanest network the gates allow "
                         f"costs {search.get('flops_fraction', float('nan')):.2f} of the "
                         f"teacher's multiply-adds, and that is what was kept.")
        else:
            notes.append("even cutting no universal block (only the weak proxies) loses more "
                         "than the allowance against the unpruned student: nothing was cut.")
    test = (pruned.get("vs_teacher") or {}).get("test")
    if test and test["upper"] < -PRUNED_GAP_NOTED:
        notes.append(f"on the test images the pruned network is below its teacher with "
                     f"confidence: {100 * test['difference']:+.2f} points, at best "
                     f"{100 * test['upper']:+.2f} (paired, {test['images']} images).")
    return notes


def _quantisation_damage(variant: str, entry: dict, reference: float | None) -> list[str]:
    """What quantisation did to a file's predictions and accuracy, when it
    went past what is noted (one finding per file, and its marked row)."""
    if variant == "float32":
        return []
    said = []
    agreement = entry.get("top1_agreement")
    if agreement is not None and agreement < QUANTIZED_AGREEMENT:
        said.append(f"agrees with its Keras model on {_fmt_acc(agreement)} of the test images "
                    f"only")
    accuracy = entry.get("accuracy")
    if None not in (accuracy, reference) and accuracy < reference - PRUNED_GAP_NOTED:
        said.append(f"loses {100 * (reference - accuracy):.2f} points of accuracy against the "
                    f"float32 one")
    return said


def _fmt_latency(entry: dict, threads: str | None) -> str:
    """'median [p10, p90]', marked when other processes were busy meanwhile."""
    timed = entry.get("latency") or {}
    if threads is None:  # all cores: the largest thread count timed
        threads = max(timed, key=int, default=None)
    found = timed.get(threads)
    if not found:
        return "-"
    text = f"{found['median_ms']:.3f} [{found['p10_ms']:.3f}, {found['p90_ms']:.3f}]"
    return text + " (busy)" if found.get("busy") else text


def _busy_latencies(task: dict) -> tuple[list[str], float]:
    """The thread counts whose timing ran beside other work, and the most
    cores that work took."""
    threads, load = set(), 0.0
    for part in ("tflite", "teacher_tflite"):
        for entry in (task.get(part) or {}).values():
            for count, found in (entry.get("latency") or {}).items():
                if found.get("busy"):
                    threads.add(count)
                    load = max(load, found.get("other_load_cores") or 0.0)
    return sorted(threads, key=int), load


def _deployment_table(task: dict) -> list[str]:
    rows = [("teacher", task.get("teacher_savedmodel"), "SavedModel"),
            *[("teacher", e, v) for v, e in (task.get("teacher_tflite") or {}).items()],
            ("NetTailor", task.get("savedmodel"), "SavedModel"),
            *[("NetTailor", e, v) for v, e in (task.get("tflite") or {}).items()]]
    rows = [r for r in rows if r[1]]
    if not rows:
        return []
    lines = ["### On device (LiteRT, batch 1)", "",
             "| network | format | size | test accuracy | top-1 agreement with Keras | "
             "latency 1 thread, ms: median [p10, p90] | all cores |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    reference = (task.get("tflite") or {}).get("float32", {}).get("accuracy")
    for network, entry, variant in rows:
        damaged = network == "NetTailor" and _quantisation_damage(variant, entry, reference)
        shown = f"**{variant} (finding)**" if damaged else variant
        lines.append(f"| {network} | {shown} | {entry['bytes'] / 1e6:.2f} MB | "
                     f"{_fmt_acc(entry.get('accuracy'))} | {_fmt_acc(entry.get('top1_agreement'))}"
                     f" | {_fmt_latency(entry, '1')} | {_fmt_latency(entry, None)} |")
    if task.get("latency_ratio_float32") is not None:
        lines += ["", f"float32 NetTailor / teacher: latency {task['latency_ratio_float32']:.2f}, "
                      f"multiply-adds {task['flops_ratio']:.2f}."]
    return lines + _recommended_lines(task.get("recommended")) + [""]


def _recommended_lines(choice: dict | None) -> list[str]:
    """The file to ship, and the figures it was chosen on (export stage)."""
    if not choice:
        return []
    found = choice["candidates"]

    def described(variant: str) -> str:
        c = found[variant]
        return (f"{variant} ({c['bytes'] / 1e6:.2f} MB, {c['latency_ms']:.3f} ms, "
                f"{_fmt_acc(c['selection_accuracy'])} on {choice['selection_split']})")

    return ["", f"**Recommended:** {choice['recommended_path']}, "
                f"{described(choice['recommended'])}: "
                f"the fastest file at 1 thread within {100 * choice['tolerance']:.2f} points of "
                f"float32's {_fmt_acc(found['float32']['selection_accuracy'])} on the "
                f"{choice['selection_split']} split and not slower than float32 with every "
                f"core. Smallest within the tolerance: "
                f"{choice['smallest_path']}, {described(choice['smallest'])}."]


def _bundle_section(bundle: dict | None) -> list[str]:
    if not bundle:
        return []
    lines = ["## Multi-task bundle", "",
             f"One SavedModel ({bundle['savedmodel_path']}, {bundle['savedmodel_variables']} "
             f"variables) and one .tflite per variant, a signature per task "
             f"({', '.join(bundle['signatures'].values())}). Universal parameters used by any "
             f"task: {_fmt_count(bundle['universal_params'])}; task-specific: "
             + ", ".join(f"{k} {_fmt_count(v)}" for k, v in bundle["task_specific_params"].items())
             + ".", "",
             "| variant | size | weights shared | weights per task | universal layers stored "
             "per task | per task: accuracy / agreement |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant, info in bundle["variants"].items():
        per_task = "; ".join(f"{k} {_fmt_acc(t['accuracy'])} / {_fmt_acc(t['top1_agreement'])}"
                             for k, t in info["tasks"].items())
        own = "; ".join(f"{k} {b / 1e6:.2f} MB"
                        for k, b in info.get("task_weight_bytes", {}).items()) or "?"
        shared = info.get("shared_weight_bytes")
        copies = info.get("universal_copies")
        lines.append(f"| {variant} | {info['bytes'] / 1e6:.2f} MB | "
                     f"{'?' if shared is None else f'{shared / 1e6:.2f} MB'} | {own} | "
                     f"{'?' if copies is None else (', '.join(copies) or 'none')} | {per_task} |")
    if bundle.get("recommended"):
        lines += ["", f"Recommended bundle: {bundle['recommended']['path']} "
                      f"({bundle['recommended']['variant']}: the fastest variant every task's "
                      f"recommendation accepts)."]
    if bundle.get("bytes") is not None:
        lines += ["", f"float32 bundle {bundle['bytes'] / 1e6:.2f} MB; bound 1.1 x 4 B x "
                      f"(universal + task-specific parameters) = "
                      f"{bundle['size_bound_bytes'] / 1e6:.2f} MB: "
                      f"{'within' if bundle['within_size_bound'] else 'OVER'}."]
    memory = bundle.get("memory_mb")
    if memory:
        lines += ["", "Peak memory of a fresh process running every task once (float32, "
                      f"1 thread; MB above the runtime's {memory['baseline']:.1f} MB):", "",
                  "| | per-task files | bundle |", "| --- | --- | --- |",
                  f"| plain | {memory['separate_files']:.1f} | {memory['bundle']:.1f} |",
                  f"| XNNPACK weight cache | {memory['separate_files_weight_cache']:.1f} | "
                  f"{memory['bundle_weight_cache']:.1f} |"]
        if "bundle_in_memory_cache" in memory:  # (reports from before it was measured lack it)
            lines.append(f"| XNNPACK weight cache in memory (`:memory`, no file) | "
                         f"{memory['separate_files_in_memory_cache']:.1f} | "
                         f"{memory['bundle_in_memory_cache']:.1f} |")
    return lines + [""]


def _latency_prediction_section(data: dict) -> list[str]:
    """The latency table's float32 predictions against each file timed in
    the table's own rounds and by the benchmark, each with its error and
    the load check of the timing."""
    points = [p for p in latency_prediction_points(data) if p["variant"] == "float32"]
    if not points:
        return []
    table = data.get("latency_prediction_table") or {}
    fit = table.get("calibration") or {}
    load = table.get("other_load_cores")
    lines = ["## Predicted against measured latency", "",
             f"Float32, 1 thread; predictions from the latency table "
             f"{table.get('fingerprint', '?')[:12]} ({table.get('device', '?')}), each branch "
             f"timed as a signature of one .tflite, interleaved with "
             f"{fit.get('networks', '?')} whole networks it is calibrated on "
             f"(largest error on them {_percent(fit.get('max_error'))}) and with the files "
             f"below, under one load check (other processes: "
             f"{'?' if load is None else f'{load:.2f}'} cores). The benchmark's figures were "
             f"timed at another moment: compare a prediction with the first.", ""]
    if table.get("busy"):
        lines += [f"**Timed on a busy machine** (other processes kept {load:.2f} cores "
                  f"busy): the predictions and their errors are busy-machine figures.", ""]
    lines += ["| task | network | predicted ms | in the table's rounds, ms | error | "
              "benchmark, ms | error | benchmark's other load (cores) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        rounds = p.get("table_rounds_ms")
        other = p["other_load_cores"]
        lines.append(f"| {p['task']} | {p['network']} | {p['predicted_ms']:.3f} | "
                     + (f"{rounds:.3f} | {p['table_rounds_error']:+.0%} | " if rounds
                        else "? | ? | ")
                     + f"{p['measured_ms']:.3f} | {p['error']:+.0%} | "
                     f"{'?' if other is None else f'{other:.2f}'}"
                     f"{' (busy)' if p['busy'] else ''} |")
    if data.get("latency_prediction_png"):
        lines += ["", f"![predicted against measured latency]({data['latency_prediction_png']})"]
    return lines + [""]


def _percent(value) -> str:
    return "?" if value is None else f"{value:.0%}"

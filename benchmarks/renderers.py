"""Markdown from the committed results in docs/results/: one function per table.

Each renderer takes the parsed JSON of one results file and returns markdown:
a whole page, or the text between two marker comments of a page
(`benchmarks/render_docs.py` holds the registry of which file renders where).
Pure Python and the standard library only, so that the check that every
rendered table equals its JSON (tests/test_render_docs.py) runs in a moment.

Also `machine()`, the description of this machine that a benchmark writes
into its results file.
"""
from __future__ import annotations

import os
import platform

RENDER_COMMAND = "python benchmarks/render_docs.py"


def _cpuinfo() -> tuple[str, set]:
    """(model name, feature flags) of this machine's CPU."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def machine() -> str:
    """'CPU model, N cores, AVX-512' (or 'AVX2', or nothing) of this machine."""
    model, flags = _cpuinfo()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return ", ".join(part for part in (model, f"{os.cpu_count()} cores", vector) if part)


def _points(value: float) -> str:
    return f"{100 * value:.2f}"


def _mean_sd(stat: dict | None, kind: str = "percent") -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if kind == "percent":
        return f"{100 * stat['mean']:.2f} ± {100 * (stat.get('std') or 0.0):.2f}"
    return f"{stat['mean']:.3f} ± {(stat.get('std') or 0.0):.3f}"


def _provenance(results: dict) -> str:
    """'Measured with `command` on MACHINE, DATE, code C.'"""
    parts = [f"Measured with `{results['command']}`" if results.get("command") else "Measured",
             f"on {results['machine']}", results["date"]]
    if results.get("code"):
        parts.append(f"code {results['code']}")
    return " ".join(parts[:2]) + ", " + ", ".join(parts[2:]) + "."


def _generated(results_file: str) -> str:
    return (f"<!-- Rendered from {results_file} by `{RENDER_COMMAND}`; edit the JSON, "
            f"not this table. -->")


# --- the seed study and the evaluation suite (benchmarks/seeds.py) ------------------

# (key of benchmarks/seeds.py's summary, column heading, percent or fraction)
SEED_COLUMNS = (
    ("teacher", "teacher", "percent"),
    ("student", "student", "percent"),
    ("pruned_before_finetune", "pruned, before fine-tuning", "percent"),
    ("pruned", "pruned", "percent"),
    ("pruned_flops_fraction", "pruned multiply-adds (of the teacher's)", "fraction"),
    ("student_gate_entropy", "student gate entropy", "fraction"),
)


def task_rows(results: dict) -> list[tuple[str, dict]]:
    """(task, row) pairs, sorted by task, from 'tasks' ({task: row}) or 'rows'
    ([{"task": ..., ...}], what benchmarks/seeds.py prints one line each)."""
    if isinstance(results.get("tasks"), dict):
        return sorted(results["tasks"].items())
    return sorted(((row["task"], row) for row in results["rows"]), key=lambda item: item[0])


def _seed_table(results: dict) -> list[str]:
    rows = task_rows(results)
    columns = [c for c in SEED_COLUMNS if any(c[0] in row for _, row in rows)]
    head = ["task"] + [c[1] for c in columns] + ["worst seed, pruned - teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for task, row in rows:
        gaps = [g for g in row.get("pruned_minus_teacher") or [] if g is not None]
        worst = f"{100 * min(gaps):+.2f}" if gaps else "-"
        lines.append("| " + " | ".join([task] + [_mean_sd(row.get(key), kind)
                                                 for key, _, kind in columns] + [worst]) + " |")
    return lines


def seed_study_table(results: dict) -> str:
    """The table of a seed study alone: mean ± sd over seeds, per task, and each
    seed's teacher / student / pruned accuracy."""
    lines = [f"Seeds {', '.join(str(s) for s in results['seeds'])}: mean ± sample standard "
             "deviation over seeds (test accuracy in %; multiply-adds as a fraction of the "
             "teacher's; gate entropy 0 = decisive, 1 = uniform).", ""]
    lines += _seed_table(results)
    lines += ["", "Per seed (teacher / student / pruned, %):", ""]
    for task, row in task_rows(results):
        seeds = row.get("seeds") or results["seeds"]
        per_seed = []
        for i, seed in enumerate(seeds):
            values = [(row.get(m) or {}).get("values", [None] * len(seeds))[i]
                      for m in ("teacher", "student", "pruned")]
            per_seed.append(f"seed {seed}: " + " / ".join(
                "-" if v is None else f"{100 * v:.2f}" for v in values))
        lines.append(f"- {task}: " + "; ".join(per_seed))
    return "\n".join(lines) + "\n"


def seed_study_page(results: dict) -> str:
    """docs/seed_study.md."""
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = ["# Seed study of the quickstart settings", "",
             _generated("docs/results/seed_study.json"), "",
             "The teacher, student, prune and finetune stages of the quickstart, once per "
             "seed; each seed draws its own validation split, initialisation and data order, "
             "so each trains its own teacher.", "",
             _provenance(results) + (f" CPU kernels: {results['cpu_kernels']}."
                                     if results.get("cpu_kernels") else ""), "",
             f"Which seeds did what: the defaults were chosen on the development tasks "
             f"mnist5k and digits with seeds 0 and 1, on their validation splits; seeds "
             f"{seeds} chose nothing and are only reported here.", "", ""]
    return "\n".join(lines) + seed_study_table(results)


def seed_study_summary(results: dict) -> str:
    """The README's results table: teacher and pruned accuracy and the pruned
    network's multiply-adds, mean ± sd per task, with machine and date."""
    seeds = results["seeds"]
    span = (f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1))
            and len(seeds) > 2 else ", ".join(str(s) for s in seeds))
    lines = [_generated("docs/results/seed_study.json"),
             "", "| task | teacher, test % | pruned, test % | pruned multiply-adds, of the "
             "teacher's |", "| --- | --- | --- | --- |"]
    for task, row in task_rows(results):
        lines.append(f"| {task} | {_mean_sd(row.get('teacher'))} | {_mean_sd(row.get('pruned'))}"
                     f" | {_mean_sd(row.get('pruned_flops_fraction'), 'fraction')} |")
    lines += ["", f"Mean ± standard deviation over seeds {span}; {results['machine']}, "
              f"{results['date']}; `{results['command']}`."]
    return "\n".join(lines) + "\n"


def prune_signals_page(results: dict) -> str:
    """docs/prune_signals.md: one row per task, seed and candidate."""
    lines = ["# Which signal predicts a pruned network's fine-tuned accuracy", "",
             _generated("docs/results/prune_signals.json"), "",
             f"Measured with `{results['command']}` on {results['machine']}, "
             f"{results['date']}, code {results['code']}. Accuracies in percent; damage and "
             f"differences in points; +- is one standard error of the paired difference.", "",
             "| task | seed | N | multiply-adds of the teacher's | zero-shot validation "
             "accuracy | zero-shot damage (train + validation) | fine-tuned validation, "
             "minus teacher | fine-tuned test | fine-tuned test, minus teacher |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in sorted(results["rows"], key=lambda r: (r["task"], r["seed"], r["n"])):
        zero, tuned = row["zero_shot"], row["fine_tuned"]
        damage = zero["pool_damage"]
        lines.append(
            f"| {row['task']} | {row['seed']} | {row['n']} | {row['flops_fraction']:.3f} | "
            f"{_points(zero['val_accuracy'])} | {_points(damage['difference'])} +- "
            f"{_points(damage['standard_error'])} ({damage['images']} images) | "
            f"{_points(tuned['val_vs_teacher']['difference'])} +- "
            f"{_points(tuned['val_vs_teacher']['standard_error'])} | "
            f"{_points(tuned['test_accuracy'])} | "
            f"{_points(tuned['test_vs_teacher']['difference'])} +- "
            f"{_points(tuned['test_vs_teacher']['standard_error'])} |")
    return "\n".join(lines) + "\n"


# --- the teacher's plateau rule (docs/method.md) ------------------------------------

def teacher_plateau_table(results: dict) -> str:
    """Teacher stage under a fixed schedule and under the plateau rule."""
    lines = [_generated("docs/results/teacher_plateau.json"), "",
             _provenance(results) + " " + results["note"], "",
             "| task | schedule | flags added | steps | validation | test | stage time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        flags = " ".join(f"`{f}`" for f in row["flags"]) or "none"
        steps = f"{row['steps']:,}" + (f" ({row['stopped']})" if row.get("stopped") else "")
        minutes = row.get("stage_minutes")
        time = (f"{minutes:.1f} min" + (f" {row['time_note']}" if row.get("time_note") else "")
                if minutes is not None else row.get("time_note", "-"))
        lines.append(f"| {row['task']} | {row['schedule']} | {flags} | {steps} | "
                     f"{_points(row['validation_accuracy'])}% | {_points(row['test_accuracy'])}% "
                     f"| {time} |")
    return "\n".join(lines) + "\n"


# --- settings compared on the development tasks (benchmarks/collect_runs.py) --------

def development_runs_table(results: dict, results_file: str) -> str:
    """Per setting: each run's choice and accuracies, then the setting's mean
    validation gap to the teacher (what the choice was made on)."""
    # Files collected before the column existed have no validation loss.
    losses = any(row.get("pruned_val_loss") is not None for row in results["rows"])
    lines = [_generated(results_file), "", _provenance(results) + " " + results["note"], "",
             "| setting | seed | task | N | multiply-adds | fine-tune steps | "
             "validation: teacher / pruned |" + (" pruned: validation loss |" if losses
                                                 else "") + " test: teacher / pruned |",
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if losses else "") + " --- |"]
    labels = list(dict.fromkeys(row["label"] for row in results["rows"]))
    for row in results["rows"]:
        steps = f"{row['finetune_steps']:,}" + (f" ({row['stopped']})" if row.get("stopped")
                                                 else "")
        loss = row.get("pruned_val_loss")
        lines.append(f"| {row['label']} | {row['seed']} | {row['task']} | {row['chosen']} | "
                     f"{row['flops_fraction']:.3f} | {steps} | "
                     f"{_points(row['teacher_val'])} / {_points(row['pruned_val'])} | "
                     + (f"{'-' if loss is None else f'{loss:.4f}'} | " if losses else "")
                     + f"{_points(row['teacher_test'])} / {_points(row['pruned_test'])} |")
    lines += ["", "| setting | flags added | mean multiply-adds | mean validation gap to the "
              "teacher (points) | mean test gap (points) |", "| --- | --- | --- | --- | --- |"]
    for label in labels:
        rows = [r for r in results["rows"] if r["label"] == label]
        flags = " ".join(f"`{f}`" for f in rows[0]["flags"]) or "none"
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        lines.append(
            f"| {label} | {flags} | {mean([r['flops_fraction'] for r in rows]):.3f} | "
            f"{100 * mean([r['pruned_val'] - r['teacher_val'] for r in rows]):+.2f} | "
            f"{100 * mean([r['pruned_test'] - r['teacher_test'] for r in rows]):+.2f} |")
    return "\n".join(lines) + "\n"


def finetune_plateau_table(results: dict) -> str:
    return development_runs_table(results, "docs/results/finetune_plateau.json")


def finetune_shorter_table(results: dict) -> str:
    return development_runs_table(results, "docs/results/finetune_shorter.json")


# --- the multi-task bundle (the `bundle` object of report.json) ---------------------

def _mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB"


def bundle_table(results: dict) -> str:
    """Shared and per-task weight bytes of each bundle variant."""
    bundle = results["bundle"]
    tasks = sorted(bundle["task_specific_params"])
    lines = [_generated("docs/results/bundle.json"), "",
             _provenance(results) + " " + results["note"], "",
             "| bundle | size | weights shared | " + " | ".join(f"{t} only" for t in tasks)
             + " | universal layers stored per task | " + " | ".join(
                 f"{t} test accuracy" for t in tasks) + " |",
             "|" + " --- |" * (4 + 2 * len(tasks))]
    for name, variant in bundle["variants"].items():
        copies = ", ".join(f"`{c}`" for c in variant["universal_copies"]) or "none"
        lines.append("| " + " | ".join(
            [name, _mb(variant["bytes"]), _mb(variant["shared_weight_bytes"])]
            + [_mb(variant["task_weight_bytes"][t]) for t in tasks] + [copies]
            + [f"{_points(variant['tasks'][t]['accuracy'])}%" for t in tasks]) + " |")
    bound = bundle["size_bound_bytes"]
    lines += ["", f"The float32 bundle's bound (1.1 x 4 bytes x its parameters): {_mb(bound)}."]
    return "\n".join(lines) + "\n"


# (label, suffix of the keys of bundle.memory_mb) for each way of loading
MEMORY_WAYS = (("plain (no weight cache)", ""),
               ("XNNPACK weight cache in a file", "_weight_cache"),
               ("XNNPACK weight cache in memory (`:memory`, no file)", "_in_memory_cache"))


def bundle_memory_table(results: dict) -> str:
    """Peak memory of running every task once, each way, and where it sat."""
    memory = results["memory_mb"]
    plain = memory["separate_files"]
    lines = [_generated("docs/results/bundle_memory.json"), "",
             _provenance(results) + " " + results["note"], "",
             f"MB above a process that only loaded the runtime ({memory['baseline']:.1f} MB); "
             f"each the median of {memory['repeats']} fresh processes:", "",
             "| float32, 1 thread | separate per-task files | bundle | bundle / separate, "
             "same way | bundle / separate plain |", "| --- | --- | --- | --- | --- |"]
    for label, suffix in MEMORY_WAYS:
        separate, bundle = memory["separate_files" + suffix], memory["bundle" + suffix]
        lines.append(f"| {label} | {separate:.1f} | {bundle:.1f} | {bundle / separate:.2f} | "
                     f"{bundle / plain:.2f} |")
    lines += ["", "Where the memory sat at the end of the run (MB): the model files' mapped "
              "pages, the weight cache's pages and anonymous memory above the baseline's "
              "(packed weights when no cache holds them, arenas, runtime state); the rest of "
              "each peak is mostly the runtime libraries' pages, touched when it first runs.",
              "",
              "| way | model file pages | weight cache pages | anonymous |",
              "| --- | --- | --- | --- |"]
    for label, suffix in MEMORY_WAYS:
        for files in ("separate_files", "bundle"):
            part = memory["breakdown"][files + suffix]
            lines.append(f"| {files.replace('_', ' ')}, {label} | {part['model_files']:.1f} | "
                         f"{part['weight_cache']:.1f} | {part['anonymous']:.1f} |")
    return "\n".join(lines) + "\n"


# --- training speed (benchmarks/train_step.py, benchmarks/input_pipeline.py) --------

def training_speed_table(results: dict) -> str:
    """One row per command: what it printed, as ranges over repeated runs."""
    lines = [_generated("docs/results/training_speed.json"), "",
             f"On {results['machine']}. {results['note']}", "",
             "| command | code, date | figures |", "| --- | --- | --- |"]
    for row in results["rows"]:
        lines.append(f"| `{row['command']}` | {row['code']}, {row['date']} | {row['figures']} |")
    return "\n".join(lines) + "\n"


# --- latency predictions (benchmarks/latency_prediction.py) -------------------------

def latency_prediction_table(results: dict) -> str:
    """Each network's predicted and measured float32 latency, per run of the
    benchmark (its JSON lines), with the load check and the table's fit; the
    error of the earlier two-factor model on the same timings beside it."""
    runs = results["runs"]
    lines = [_generated("docs/results/latency_prediction.json"), "",
             _provenance(results) + " " + results["note"], "",
             "| network | " + " | ".join(f"{r['label']}: predicted / measured ms (error)"
                                        for r in runs) + " |",
             "|" + " --- |" * (1 + len(runs))]
    names = list(dict.fromkeys(row["network"] for run in runs for row in run["rows"]))
    for name in names:
        cells = []
        for run in runs:
            row = next((r for r in run["rows"] if r["network"] == name), None)
            cells.append("" if row is None else f"{row['predicted_ms']:.3f} / "
                         f"{row['measured_ms']:.3f} ({row['error']:+.1%}; two factors "
                         f"{row['two_factor_error']:+.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for run in runs:
        fit = run["calibration"]
        lines.append(f"- {run['label']}: other processes kept {run['other_load_cores']:.2f} "
                     f"cores busy while the table and the networks were timed (in the same "
                     f"rounds); the fit, on {fit['networks']} networks: factor "
                     f"{fit['base']:.3f} + {fit['slope']:.3f} x share, largest error on them "
                     f"{fit['max_error']:.1%}; largest error on the networks above "
                     f"{max(abs(r['error']) for r in run['rows']):.1%}.")
    return "\n".join(lines + _own_passes(results.get("own_passes") or [])) + "\n"


def _own_passes(rows: list[dict]) -> list[str]:
    """The diagnosis (`--own_passes`): a network's parts summed as the
    table's passes time them and as passes over its own branches do."""
    if not rows:
        return []
    lines = ["", "Each network's parts (less one Invoke each, plus one), timed in passes over "
             "every branch of the full student (as the table times them) and in passes over "
             "only its own branches (the run with `--own_passes`):", "",
             "| network | measured ms | parts, every-branch passes | parts, own passes |",
             "| --- | --- | --- | --- |"]
    for row in rows:
        measured = row["measured_ms"]
        name = (f"held-out {row['network']}" if row["task"] == "held_out"
                else f"{row['task']} {'pruned' if row['network'] == 'NetTailor' else 'teacher'}")
        lines.append(f"| {name} | {measured:.3f} | {row['parts_every_branch_pass_ms']:.3f} "
                     f"({row['parts_every_branch_pass_ms'] / measured - 1:+.0%}) | "
                     f"{row['parts_own_pass_ms']:.3f} "
                     f"({row['parts_own_pass_ms'] / measured - 1:+.0%}) |")
    return lines


# --- the evaluation suite (benchmarks/eval_suite.py) --------------------------------

# A pruned network this far below its teacher (accuracy, fraction) is a finding.
GAP_FINDING = 0.015
# A student within this many points of chance (fraction) is a finding.
CHANCE_MARGIN = 0.10


def _issues(data: dict) -> list[tuple[str, int, str]]:
    """(task, seed, sentence) for every pruned network more than GAP_FINDING
    below its teacher and every student within CHANCE_MARGIN of chance."""
    out = []
    for task, row in data["tasks"].items():
        chance = 1.0 / row["classes"] if row.get("classes") else None
        for seed, gap, student in zip(data["seeds"], row["pruned_minus_teacher"],
                                      row["student"]["values"]):
            # 1e-9: three test images of 200 are 1.5 points, not a finding.
            if gap is not None and gap < -GAP_FINDING - 1e-9:
                out.append((task, seed, f"{task}, seed {seed}: the pruned network ends "
                                        f"{100 * -gap:.1f} points below its teacher (more "
                                        f"than {100 * GAP_FINDING:.1f})."))
            if chance is not None and student is not None and student < chance + CHANCE_MARGIN:
                out.append((task, seed, f"{task}, seed {seed}: the student reaches "
                                        f"{100 * student:.1f}%, near chance "
                                        f"({100 * chance:.1f}%)."))
    return out


def eval_suite_findings(data: dict) -> list[str]:
    return [text for _, _, text in _issues(data)]


def _flagged(data: dict) -> set:
    """{(task, seed)} with a finding."""
    return {(task, seed) for task, seed, _ in _issues(data)}


def _cell(stat: dict, percent: bool) -> str:
    if stat["mean"] is None:
        return "-"
    if percent:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def eval_suite_page(data: dict) -> str:
    """docs/eval_suite.md from the suite's JSON."""
    seed_list = ", ".join(str(s) for s in data["seeds"])
    lines = [
        "# Evaluation suite", "",
        "Rendered by `python benchmarks/eval_suite.py --render=docs/results/eval_suite.json` "
        "from the committed results; do not edit by hand.", "",
        "The defaults (flags/quickstart.cfg and the library's) were chosen on the "
        f"development tasks {' and '.join(data['development_tasks'])} with seeds 0 and 1, "
        "and reported there with seeds 10-14 (docs/seed_study.md). The tasks below "
        "took no part in choosing them, and the seeds below were never used for "
        "tuning: they show what a user can expect on a task of their own. The tasks "
        "are image folders written by `benchmarks/make_eval_suite.py` from data "
        "installed with the project, nothing downloaded:", ""]
    for task, row in data["tasks"].items():
        lines.append(f"- `{task}`: {row['classes']} classes, {row['train_images']} training "
                     f"and {row['test_images']} test images: {row['description']}")
    lines += [
        "",
        "Each run holds out 10% of the training images as its validation split, "
        "on which every choice is made; the test split is fixed and only measured.", "",
        f"Measured with `{data['command']}` on {data['machine']['cpu']} "
        f"({data['machine']['cores']} cores), {data['date']}, code {data['code']}. "
        f"Seeds {seed_list}: mean ± sample standard deviation of the test accuracy (%) "
        "and of the pruned network's multiply-adds as a fraction of its teacher's."
        + (f" {data['note']}" if data.get("note") else ""), "",
        "| task | teacher | student | pruned | multiply-adds of the teacher's | "
        "pruned - teacher per seed (points) |",
        "| --- | --- | --- | --- | --- | --- |"]
    flagged = _flagged(data)
    for task, row in data["tasks"].items():
        gaps = ", ".join("-" if g is None else
                         (f"**{100 * g:+.1f}**" if (task, s) in flagged else f"{100 * g:+.1f}")
                         for s, g in zip(data["seeds"], row["pruned_minus_teacher"]))
        count = sum(1 for t, _ in flagged if t == task)
        name = f"{task} **({count} of {len(data['seeds'])} seeds: findings)**" if count else task
        lines.append(f"| {name} | {_cell(row['teacher'], True)} | {_cell(row['student'], True)} "
                     f"| {_cell(row['pruned'], True)} | "
                     f"{_cell(row['pruned_flops_fraction'], False)} | {gaps} |")
    lines += ["", "Per seed (teacher / student / pruned %, multiply-adds fraction):", ""]
    for task, row in data["tasks"].items():
        parts = []
        for i, seed in enumerate(data["seeds"]):
            accs = [row[c]["values"][i] for c in ("teacher", "student", "pruned")]
            flops = row["pruned_flops_fraction"]["values"][i]
            mark = " (finding)" if (task, seed) in flagged else ""
            parts.append(f"seed {seed}: " + " / ".join(
                "-" if v is None else f"{100 * v:.1f}" for v in accs)
                + ("" if flops is None else f", {flops:.2f}") + mark)
        lines.append(f"- {task}: " + "; ".join(parts))
    found = eval_suite_findings(data)
    lines += ["", "## Findings", ""]
    if found:
        lines += [f"- {text}" for text in found]
    else:
        lines.append(f"None: no pruned network more than {100 * GAP_FINDING:.1f} points below "
                     f"its teacher, no student within {100 * CHANCE_MARGIN:.0f} points of "
                     "chance.")
    if data.get("minutes_per_seed"):
        lines += ["", "Minutes per seed, all tasks in one process, on the machine above "
                  "(shared with other training jobs, so slower than alone), per invocation "
                  "of the command line that ran stages (an invocation skips the stages an "
                  "earlier one finished):", ""]
        for seed, record in data["minutes_per_seed"].items():
            lines.append(f"- seed {seed}: " + "; ".join(
                f"`--stages={stages}` {m:.1f}" for stages, m in record.items()))
    return "\n".join(lines) + "\n"

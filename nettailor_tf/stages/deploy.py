"""The deployment stages: `export` (SavedModel + TFLite files, checked for
parity) and `benchmark` (LiteRT latency), per task and for the multi-task
bundle.

Every .tflite file takes one uint8 image [1, S, S, 3] at the trained size
(a static input; the SavedModels take any size), and every export carries
its class names (`labels.txt`; `labels_<signature>.txt` in the bundle).

Each export directory is built aside and renamed into place whole
(nettailor_tf/atomic.py), with a manifest (`export.json`) that records the
fingerprint of the weights it came from: a finished export is skipped, a
stale one (the weights changed since) is rebuilt, and a run killed after the
rename but before the report was written takes the entries from the
manifest instead of exporting again.
"""
from __future__ import annotations

import hashlib
import json
import os

import keras
import numpy as np
from absl import logging

from exporters import latency as latency_lib
from exporters import memory as memory_lib
from exporters import parity, savedmodel, tflite
from nettailor_tf import artifacts, atomic, quiet
from nettailor_tf import backbones as backbones_lib
from nettailor_tf import data as data_lib
from nettailor_tf import prune as prune_lib
from nettailor_tf import visualize
from nettailor_tf.config import Config
from nettailor_tf.data.tasks import label_names
from nettailor_tf.report import Report
from nettailor_tf.workdir import Workdir

MANIFEST = "export.json"
# Bumped when the exported files change form (2: static .tflite input and
# labels files), so that an export of an older form is made again.
EXPORT_FORMAT = 2


def export_dir(config: Config, task) -> str:
    return Workdir(config.workdir).export_dir(task.name)


def bundle_dir(config: Config) -> str:
    return Workdir(config.workdir).bundle_dir


def _rel(config: Config, path: str) -> str:
    return os.path.relpath(path, config.workdir)


# --- the networks to export ------------------------------------------------------

def trained_files(config: Config, task, teacher: bool = True) -> list[str]:
    """The files of the trained task (the pruned network's plan and weights,
    and the teacher's), or a StageError naming the first one missing."""
    workdir = Workdir(config.workdir)
    paths = [workdir.plan(task.name), workdir.pruned_state(task.name)]
    if teacher:
        paths.append(workdir.teacher_weights(task.name))
    for path in paths:
        if not os.path.exists(path):
            raise artifacts.StageError(f"{task.name}: no {os.path.basename(path)} in "
                                       f"{os.path.dirname(path)}; run the teacher, student, "
                                       f"prune and finetune stages first (same --workdir)",
                                       path=path)
    return paths


def file_fingerprint(paths: list[str], settings: dict) -> str:
    """sha256 of `settings` and the bytes of `paths`."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _export_settings(config: Config) -> dict:
    return {"format": EXPORT_FORMAT, "variants": list(config.export_variants),
            "teacher_variants": list(config.teacher_variants),
            "calibration_images": config.calibration_images,
            "parity_max_images": config.parity_max_images,
            "parity_min_agreement": config.parity_min_agreement, "seed": config.seed}


def nettailor_endpoint(config: Config, task, universal: prune_lib.UniversalLayers | None = None
                       ) -> savedmodel.Endpoint:
    """The pruned, fine-tuned static network of `task`, ready to serve."""
    student, _, _ = artifacts.fine_tuned_network(config, task)
    model = prune_lib.static_model(student, universal=universal,
                                   name=f"nettailor_{savedmodel.signature_key(task.name)}")
    return savedmodel.Endpoint(model, config.image_size, task.augment != "none")


def teacher_endpoint(config: Config, task) -> savedmodel.Endpoint:
    folded = artifacts.frozen_teacher(config, task)
    model = keras.Model(folded.inputs, folded.outputs[0], name="teacher")
    return savedmodel.Endpoint(model, config.image_size, task.augment != "none")


def calibration_images(config: Config, task) -> list[np.ndarray]:
    """uint8 batches from the task's own training pipeline (first epoch)."""
    batch = min(32, config.calibration_images)
    batches = []
    taken = 0
    for images, _ in data_lib.train_pipeline(task, config.image_size, batch, epoch=0,
                                             seed=config.seed):
        batches.append(np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8))
        taken += len(images)
        if taken >= config.calibration_images:
            break
    return batches


def _test_batches(config: Config, task):
    return lambda: parity.raw_test_batches(task.test, max_images=config.parity_max_images or None)


# --- export stage: one task ------------------------------------------------------

def run_export(config: Config, strategy, task, report: Report) -> bool:
    """Writes <task>/export/: SavedModels and TFLite files of NetTailor and the
    teacher, each run on the test split against its Keras model."""
    del strategy  # exports run on the default device
    inputs = trained_files(config, task)
    fingerprint = file_fingerprint(inputs, _export_settings(config))
    final = export_dir(config, task)
    atomic.recover(final)
    manifest = _read_manifest(final)
    if manifest and manifest.get("fingerprint") == fingerprint:
        if report.get(task.name, "tflite") is None:
            _report_task_export(config, task, report, manifest)
        logging.info("%s: export stage already done (%s); skipping", task.name, final)
        return True
    logging.info("%s: exporting to %s", task.name, final)
    nettailor, teacher = nettailor_endpoint(config, task), teacher_endpoint(config, task)
    with atomic.staged_directory(final) as staging:
        manifest = _export_task(config, task, nettailor, teacher, staging, final)
        manifest["fingerprint"] = fingerprint
        atomic.write_text(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    _report_task_export(config, task, report, manifest)
    return True


def _read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tflite_interface(config: Config) -> dict:
    """What every signature of the .tflite files takes and returns (output index order)."""
    shape = [1, config.image_size, config.image_size, 3]
    return {"tflite_input": {"name": savedmodel.INPUT_NAME, "shape": shape, "dtype": "uint8"},
            "tflite_outputs": list(savedmodel.OUTPUT_NAMES)}


def _keras_predictors(name: str, endpoint: savedmodel.Endpoint) -> dict:
    """The Keras references: on the raw images (for the SavedModels) and on
    the images resized to the model's size (what the .tflite files get)."""
    keras_predict = parity.keras_predictor(endpoint)
    return {name: keras_predict, f"{name}_resized": parity.resized(keras_predict,
                                                                    endpoint.image_size)}


def _export_task(config, task, nettailor, teacher, staging, final) -> dict:
    networks = {"nettailor": (nettailor, config.export_variants),
                "teacher": (teacher, config.teacher_variants)}
    predictors = {}
    files = {}  # artefact name -> (network, format, file name)
    for network, (endpoint, variants) in networks.items():
        predictors.update(_keras_predictors(f"{network}_keras", endpoint))
        sm_name = f"{network}_savedmodel"
        savedmodel.write_savedmodel(os.path.join(staging, sm_name),
                                    {savedmodel.SERVING_KEY: endpoint})
        predictors[sm_name] = parity.savedmodel_predictor(os.path.join(staging, sm_name))
        files[sm_name] = (network, "savedmodel", sm_name)
        calibration = None
        converted = {}
        with tflite.static_savedmodel({savedmodel.SERVING_KEY: endpoint}) as static_path:
            # float32 first: the weight-only variants quantise its bytes.
            for variant in sorted(variants, key=lambda v: v != "float32"):
                if variant == "int8" and calibration is None:
                    calibration = calibration_images(config, task)
                content = tflite.convert(static_path, [savedmodel.SERVING_KEY], variant,
                                         (lambda c=calibration: c), converted.get("float32"))
                converted[variant] = content
                name = f"{network}_{variant}.tflite"
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(content)
                predictors[f"{network}_{variant}"] = parity.tflite_predictor(
                    os.path.join(staging, name), num_threads=latency_lib.all_cores())
                files[f"{network}_{variant}"] = (network, variant, name)
    savedmodel.write_labels(os.path.join(staging, savedmodel.LABELS_FILE), label_names(task))
    with quiet.native_stderr_filtered():  # LiteRT's "Created ... delegate" on first use
        outcome = parity.run_all(predictors, _test_batches(config, task))
    entries = {}
    for artefact, (network, variant, name) in files.items():
        reference = f"{network}_keras" + ("" if variant == "savedmodel" else "_resized")
        agreement = outcome.agreement(artefact, reference)
        if variant in ("float32", "savedmodel"):
            parity.check_agreement(f"{task.name}: {name}", agreement, config.parity_min_agreement)
        path = os.path.join(final, name)
        size = (atomic.directory_bytes(os.path.join(staging, name)) if variant == "savedmodel"
                else os.path.getsize(os.path.join(staging, name)))
        entries[artefact] = {"path": _rel(config, path), "bytes": size,
                             "top1_agreement": agreement, "accuracy": outcome.accuracy(artefact)}
        if variant != "savedmodel":
            with open(os.path.join(staging, name), "rb") as f:
                contents = tflite.inspect(f.read())
            entries[artefact]["weight_types"] = contents.weight_types[savedmodel.SERVING_KEY]
        logging.debug("%s: %-26s %9.2f MB  accuracy %.4f  agreement %.4f", task.name, name,
                      size / 1e6, entries[artefact]["accuracy"], agreement)
    logging.info("%s: exported %s", task.name, ", ".join(
        f"{files[artefact][2]} {e['bytes'] / 1e6:.2f} MB {100 * e['accuracy']:.2f}%"
        for artefact, e in entries.items()))
    return {"task": task.name, "test_images": int(len(outcome.labels)),
            "keras_accuracy": {n: outcome.accuracy(f"{n}_keras") for n in networks},
            # The Keras networks fed what the .tflite files get (resized to S x S).
            "keras_accuracy_resized": {n: outcome.accuracy(f"{n}_keras_resized")
                                       for n in networks},
            "labels": savedmodel.LABELS_FILE, **_tflite_interface(config),
            "artefacts": entries}


def _report_task_export(config: Config, task, report: Report, manifest: dict) -> None:
    artefacts = manifest["artefacts"]
    report.task(task.name)["tflite"] = {
        v: artefacts[f"nettailor_{v}"] for v in config.export_variants}
    report.task(task.name)["teacher_tflite"] = {
        v: artefacts[f"teacher_{v}"] for v in config.teacher_variants}
    report.task(task.name)["savedmodel"] = artefacts["nettailor_savedmodel"]
    report.task(task.name)["teacher_savedmodel"] = artefacts["teacher_savedmodel"]
    folder = export_dir(config, task)
    report.task(task.name)["export"] = {
        "test_images": manifest["test_images"], "keras_accuracy": manifest["keras_accuracy"],
        "keras_accuracy_resized": manifest["keras_accuracy_resized"],
        "dir": _rel(config, folder),
        "labels": _rel(config, os.path.join(folder, manifest["labels"])),
        "tflite_input": manifest["tflite_input"], "tflite_outputs": manifest["tflite_outputs"]}
    report.save()


# --- export stage: the multi-task bundle ---------------------------------------------

def universal_params(config: Config, tasks) -> int:
    """Parameters of the universal layers that at least one task keeps."""
    backbone = backbones_lib.build_backbone(config.backbone)
    kept = set()
    for task in tasks:
        plan, _ = prune_lib.load_plan(Workdir(config.workdir).plan(task.name))
        kept |= {l for l, b in enumerate(plan.blocks) if b.universal}
    layers = [backbone.stem] + [backbone.blocks[l] for l in sorted(kept)]
    if not backbone.head_task_specific:
        layers.append(backbone.head)
    return backbones_lib.count_params(layers)


def export_bundle(config: Config, tasks, report: Report) -> None:
    """Writes <workdir>/bundle/: one SavedModel and one .tflite per variant
    with a signature per task, the universal weights stored once."""
    inputs = [p for task in tasks for p in trained_files(config, task)]
    settings = {**_export_settings(config), "tasks": [t.name for t in tasks],
                "bundle_variants": list(config.bundle_variants)}
    fingerprint = file_fingerprint(inputs, settings)
    final = bundle_dir(config)
    atomic.recover(final)
    manifest = _read_manifest(final)
    exported_before = bool(manifest and manifest.get("fingerprint") == fingerprint)
    if not exported_before:
        logging.info("bundle: exporting %d tasks to %s", len(tasks), final)
        with atomic.staged_directory(final) as staging:
            task_params = {t.name: int(report.get(t.name, "pruned")["params_task_specific"])
                           for t in tasks}
            manifest = _export_bundle(config, tasks, staging, final, task_params)
            bundle = manifest["bundle"]
            # What the same tasks cost as separate files, and as one
            # fine-tuned network per task (the teachers).
            for variant, info in bundle["variants"].items():
                if variant in config.export_variants:
                    info["separate_files_bytes"] = sum(
                        report.get(t.name, "tflite")[variant]["bytes"] for t in tasks)
            bundle["teachers_float32_bytes"] = sum(
                report.get(t.name, "teacher_tflite")["float32"]["bytes"] for t in tasks)
            manifest["fingerprint"] = fingerprint
            atomic.write_text(os.path.join(staging, MANIFEST),
                              json.dumps(manifest, indent=1) + "\n")
    else:
        logging.info("bundle: already exported (%s); skipping", final)
    # Latencies measured on these same files stay; new files have none yet.
    old = report.data.get("bundle", {}) if exported_before else {}
    report.data["bundle"] = {**manifest["bundle"],
                             **({"latency": old["latency"]} if "latency" in old else {})}
    report.save()


def _export_bundle(config, tasks, staging, final, task_params: dict) -> dict:
    universal = prune_lib.UniversalLayers()
    endpoints = {savedmodel.signature_key(t.name): nettailor_endpoint(config, t, universal)
                 for t in tasks}
    if len(set(endpoints)) != len(tasks):
        raise artifacts.StageError("bundle: two task names map to one signature key: "
                                + ", ".join(t.name for t in tasks))
    sm_path = os.path.join(staging, "savedmodel")
    savedmodel.write_savedmodel(sm_path, endpoints)
    stored = savedmodel.stored_variables(sm_path)
    labels = {}
    for task, key in zip(tasks, endpoints):
        name = savedmodel.bundle_labels_file(key)
        savedmodel.write_labels(os.path.join(staging, name), label_names(task))
        labels[task.name] = _rel(config, os.path.join(final, name))
    used = {id(w): w for e in endpoints.values() for w in e.model.weights}
    # Common calibration for every signature: the same images give the
    # shared universal layers the same quantisation parameters in every task.
    calibration = ([b for t in tasks for b in calibration_images(config, t)]
                   if "int8" in config.bundle_variants else None)
    variants = {}
    converted = {}
    with tflite.static_savedmodel(endpoints) as static_path:
        # float32 first: the weight-only variants quantise its bytes.
        for v in sorted(config.bundle_variants, key=lambda v: v != "float32"):
            converted[v] = tflite.convert(static_path, list(endpoints), v, lambda: calibration,
                                          converted.get("float32"))
    for variant, content in converted.items():
        name = f"bundle_{variant}.tflite"
        with open(os.path.join(staging, name), "wb") as f:
            f.write(content)
        contents = tflite.inspect(content)
        variants[variant] = {"path": _rel(config, os.path.join(final, name)),
                             "bytes": len(content), "weight_bytes": contents.weight_bytes,
                             "weight_buffers": contents.weight_buffers,
                             "shared_buffers": contents.shared_buffers,
                             "weight_types": contents.weight_types, "tasks": {}}
        if variant == "int8":
            # TensorFlow issue 52145: a signature the calibration missed stays
            # float without an error.  Count the float weights per signature.
            left = {key: tflite.float_weights(contents, key) for key in endpoints}
            variants[variant]["float_weights_per_signature"] = left
            variants[variant]["every_signature_quantized"] = not any(left.values())
    for task, key in zip(tasks, endpoints):
        predictors = {**_keras_predictors("keras", endpoints[key]),
                      "savedmodel": parity.savedmodel_predictor(sm_path, key)}
        for variant in variants:
            predictors[variant] = parity.tflite_predictor(
                os.path.join(staging, f"bundle_{variant}.tflite"), key, latency_lib.all_cores())
        with quiet.native_stderr_filtered():
            outcome = parity.run_all(predictors, _test_batches(config, task))
        for name in ["savedmodel", *variants]:
            agreement = outcome.agreement(name, "keras" if name == "savedmodel"
                                          else "keras_resized")
            if name in ("savedmodel", "float32"):
                parity.check_agreement(f"bundle {name}, signature {key}", agreement,
                                       config.parity_min_agreement)
            if name != "savedmodel":
                variants[name]["tasks"][task.name] = {
                    "signature": key, "top1_agreement": agreement,
                    "accuracy": outcome.accuracy(name)}
    shared_params = universal_params(config, tasks)
    bound = 1.1 * 4 * (shared_params + sum(task_params.values()))
    float32 = variants.get("float32")
    bundle = {
        "savedmodel_path": _rel(config, os.path.join(final, "savedmodel")),
        "savedmodel_bytes": atomic.directory_bytes(sm_path),
        "savedmodel_variables": len(stored),
        "savedmodel_variable_values": int(sum(np.prod(s) for s in stored.values())),
        "keras_variables": len(used),
        "tflite_path": float32["path"] if float32 else None,
        "bytes": float32["bytes"] if float32 else None,
        "universal_params": shared_params, "task_specific_params": task_params,
        "size_bound_bytes": int(bound),
        "within_size_bound": bool(float32 and float32["bytes"] <= bound),
        "unshared_universal_layers": universal.unshared,
        "signatures": {t.name: k for t, k in zip(tasks, endpoints)},
        # Keras's ExportArchive adds it for TF Serving: an alias of the first task.
        "savedmodel_default_signature": next(iter(endpoints)),
        "labels": labels, **_tflite_interface(config), "variants": variants,
    }
    logging.info("bundle: %d signatures, float32 %s bytes (bound %d), SavedModel %d variables",
                 len(endpoints), bundle["bytes"], bound, len(stored))
    return {"bundle": bundle}


# --- benchmark stage ------------------------------------------------------------------

def _benchmark_image(config: Config, task) -> np.ndarray:
    """One real test image [1, S, S, 3], the static input of the .tflite files."""
    for images, _ in data_lib.eval_pipeline(task, config.image_size, 1):
        return np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)
    raise artifacts.StageError(f"{task.name}: the test split is empty")


def _threads() -> list[int]:
    return sorted({1, latency_lib.all_cores()})


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
    image = _benchmark_image(config, task)
    files = {name: (os.path.join(config.workdir, e["path"]), savedmodel.SERVING_KEY)
             for name, e in entries.items()}
    with quiet.native_stderr_filtered():
        results = {t: latency_lib.measure_many(files, image, t, config.benchmark_warmup,
                                               config.benchmark_runs) for t in _threads()}
    costs = {"nettailor": report.get(task.name, "pruned"),
             "teacher": report.get(task.name, "teacher")}
    cores = latency_lib.all_cores()
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


def _spread(latency: dict) -> str:
    return f"{latency['median_ms']:.3f} [{latency['p10_ms']:.3f}, {latency['p90_ms']:.3f}]"


def benchmark_bundle(config: Config, tasks, report: Report) -> None:
    """Latency of each signature of the bundle files, and the summary plot."""
    bundle = report.data.get("bundle")
    if bundle:
        image = _benchmark_image(config, tasks[0])
        files = {(variant, task.name): (os.path.join(config.workdir, info["path"]),
                                        info["tasks"][task.name]["signature"])
                 for variant, info in bundle["variants"].items() for task in tasks}
        measured = latency_lib.measure_many(files, image, 1, config.benchmark_warmup,
                                            config.benchmark_runs)
        bundle["latency"] = {variant: {task.name: measured[(variant, task.name)].median_ms
                                       for task in tasks} for variant in bundle["variants"]}
        bundle["latency_other_load_cores"] = next(iter(measured.values())).other_load_cores
        if "float32" in bundle["variants"]:
            bundle["memory_mb"] = _bundle_memory(config, tasks, report, bundle)
            logging.info("bundle: peak memory running every task once (MB over a %.1f MB "
                         "runtime): separate files %.1f, bundle %.1f, bundle with XNNPACK's "
                         "weight cache %.1f", *(bundle["memory_mb"][k] for k in (
                             "baseline", "separate_files", "bundle", "bundle_weight_cache")))
    png = os.path.join(config.workdir, "deployment.png")
    visualize.plot_deployment(png, report.data)
    report.data["deployment_png"] = _rel(config, png)
    report.save()


def _bundle_memory(config: Config, tasks, report: Report, bundle: dict) -> dict:
    """Peak memory of running every task once: separate float32 files
    against the float32 bundle, with and without XNNPACK's weight cache
    (one process each: about a second apiece)."""
    separate = [os.path.join(config.workdir, report.get(task.name, "tflite")["float32"]["path"])
                for task in tasks]
    return memory_lib.bundle_memory(
        separate, os.path.join(config.workdir, bundle["variants"]["float32"]["path"]),
        repeats=1)


BUNDLE_FINISHERS = {"export": export_bundle, "benchmark": benchmark_bundle}

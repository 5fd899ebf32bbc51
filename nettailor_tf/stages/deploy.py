"""The export stage: SavedModel + TFLite files, checked for parity, per task
and for the multi-task bundle (the `benchmark` stage times them:
stages/benchmark.py).

Every .tflite file takes one uint8 image [1, S, S, 3] at the trained size
(a static input; the SavedModels take any size), and every export carries
its class names (`labels.txt`; `labels_<signature>.txt` in the bundle).

Each export directory is built aside and renamed into place whole
(nettailor_tf/common/atomic.py), with a manifest (`export.json`) that records the
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

from exporters import timing
from exporters import mixed, parity, savedmodel, tflite
from nettailor_tf.run import artifacts
from nettailor_tf.common import atomic, quiet
from nettailor_tf.model import backbones as backbones_lib
from nettailor_tf import data as data_lib
from nettailor_tf.model import pruning
from nettailor_tf.model import static_graph
from nettailor_tf.settings.config import Config
from nettailor_tf.settings.stage_settings import stage_settings
from nettailor_tf.data.tasks import label_names
from nettailor_tf.run.report import Report
from nettailor_tf.stages import recommend
from nettailor_tf.run.workdir import Workdir

MANIFEST = "export.json"
# Bumped when the exported files change form (2: static .tflite input and
# labels files; 3: gate scales the converter cannot fold into universal
# weights, and a recommended file), so that an export of an older form is
# made again.
EXPORT_FORMAT = 3


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
    """What the exported files depend on besides the trained weights: the
    files' format and every setting declared to change the export stage."""
    return {"format": EXPORT_FORMAT, **stage_settings(config, "export")}


def nettailor_endpoint(config: Config, task, universal: static_graph.UniversalLayers | None = None
                       ) -> savedmodel.Endpoint:
    """The pruned, fine-tuned static network of `task`, ready to serve."""
    student, _, _ = artifacts.fine_tuned_network(config, task)
    model = static_graph.static_model(student, universal=universal,
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
        manifest["recommended"] = _recommendation(config, task, staging, manifest)
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


def _keras_predictors(name: str, endpoint: savedmodel.Endpoint, serve) -> dict:
    """The Keras references: on the raw images (for the SavedModels) and on
    the images resized to the model's size (what the .tflite files get);
    `serve` is the endpoint's serving function `write_savedmodel` traced."""
    keras_predict = parity.keras_predictor(endpoint, serve)
    return {name: keras_predict, f"{name}_resized": parity.resized(keras_predict,
                                                                    endpoint.image_size)}


def _export_task(config, task, nettailor, teacher, staging, final) -> dict:
    networks = {"nettailor": (nettailor, config.export_variants),
                "teacher": (teacher, config.teacher_variants)}
    predictors = {}
    files = {}  # artefact name -> (network, format, file name)
    choices = {}  # network -> what its mixed variant kept out of int4
    for network, (endpoint, variants) in networks.items():
        sm_name = f"{network}_savedmodel"
        serve = savedmodel.write_savedmodel(os.path.join(staging, sm_name),
                                            {savedmodel.SERVING_KEY: endpoint})
        predictors.update(_keras_predictors(f"{network}_keras", endpoint,
                                            serve[savedmodel.SERVING_KEY]))
        predictors[sm_name] = parity.savedmodel_predictor(os.path.join(staging, sm_name))
        files[sm_name] = (network, "savedmodel", sm_name)
        calibration = None
        converted = {}
        with tflite.static_savedmodel({savedmodel.SERVING_KEY: endpoint}) as static_path:
            converter = tflite.Converter(static_path, [savedmodel.SERVING_KEY])
            # float32 first: the weight-only variants quantise its bytes.
            for variant in sorted(variants, key=lambda v: v != "float32"):
                if variant == "int8" and calibration is None:
                    calibration = calibration_images(config, task)
                if variant == "mixed":
                    choice = _mixed(config, task, converted["float32"])
                    content = choice.content
                    choices[network] = choice.summary()
                else:
                    content = converter.convert(variant, (lambda c=calibration: c),
                                                converted.get("float32"))
                converted[variant] = content
                name = f"{network}_{variant}.tflite"
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(content)
                predictors[f"{network}_{variant}"] = parity.tflite_predictor(
                    os.path.join(staging, name), num_threads=1)
                files[f"{network}_{variant}"] = (network, variant, name)
    savedmodel.write_labels(os.path.join(staging, savedmodel.LABELS_FILE), label_names(task))
    with quiet.native_stderr_filtered():  # LiteRT's "Created ... delegate" on first use
        outcome = parity.run_all(predictors, _test_batches(config, task),
                                 workers=timing.all_cores())
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
        if variant == "mixed":
            entries[artefact]["mixed"] = choices[network]
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


def _mixed(config: Config, task, float_content: bytes):
    """The mixed variant: int4 weights, with the layers that cost accuracy kept."""
    images, labels = recommend.selection_images(config, task)
    kept_bits = None if config.mixed_kept_as == "float32" else 8
    with quiet.native_stderr_filtered():
        # Every core: the choice runs the file some 60 times; its outputs do
        # not depend on the thread count.
        choice = mixed.convert_mixed(float_content, images, labels,
                                      config.mixed_accuracy_budget, kept_bits,
                                      timing.all_cores())
    logging.info("%s: mixed variant: %d of %d layers kept in %s, %s accuracy %.4f against "
                 "float32 %.4f (budget %.4f; all int4 would read %.4f)", task.name,
                 len(choice.kept_layers), choice.layers, config.mixed_kept_as,
                 config.selection_split, choice.accuracy, choice.float_accuracy,
                 choice.budget, choice.all_int4_accuracy)
    return choice


def _recommendation(config: Config, task, staging: str, manifest: dict) -> dict:
    """`recommend.recommend` over the task's NetTailor files, with their paths."""
    artefacts = manifest["artefacts"]
    files = {v: {"path": os.path.join(staging, f"nettailor_{v}.tflite"),
                 "bytes": artefacts[f"nettailor_{v}"]["bytes"]} for v in config.export_variants}
    found = recommend.candidates(config, task, files, recommend.benchmark_image(config, task))
    choice = recommend.recommend(config, task, found)
    for which in ("recommended", "smallest"):
        choice[f"{which}_path"] = artefacts[f"nettailor_{choice[which]}"]["path"]
    return choice


def _report_task_export(config: Config, task, report: Report, manifest: dict) -> None:
    artefacts = manifest["artefacts"]
    report.task(task.name)["tflite"] = {
        v: artefacts[f"nettailor_{v}"] for v in config.export_variants}
    report.task(task.name)["teacher_tflite"] = {
        v: artefacts[f"teacher_{v}"] for v in config.teacher_variants}
    report.task(task.name)["savedmodel"] = artefacts["nettailor_savedmodel"]
    report.task(task.name)["teacher_savedmodel"] = artefacts["teacher_savedmodel"]
    report.task(task.name)["recommended"] = manifest.get("recommended")
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
        plan, _ = pruning.load_plan(Workdir(config.workdir).plan(task.name))
        kept |= {l for l, b in enumerate(plan.blocks) if b.universal}
    layers = [backbone.stem] + [backbone.blocks[l] for l in sorted(kept)]
    if not backbone.head_task_specific:
        layers.append(backbone.head)
    return backbones_lib.count_params(layers)


def export_bundle(config: Config, tasks, report: Report) -> None:
    """Writes <workdir>/bundle/: one SavedModel and one .tflite per variant
    with a signature per task, the universal weights stored once."""
    inputs = [p for task in tasks for p in trained_files(config, task)]
    chosen = recommend.bundle_variant({t.name: report.get(t.name, "recommended") for t in tasks})
    variants = [chosen if v == "recommended" else v for v in config.bundle_variants]
    variants = list(dict.fromkeys(variants))  # float32 recommended: once
    settings = {**_export_settings(config), "tasks": [t.name for t in tasks],
                "bundle_variants": variants}
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
            manifest = _export_bundle(config, tasks, staging, final, task_params, variants)
            bundle = manifest["bundle"]
            bundle["recommended"] = {"variant": chosen, "path": bundle["variants"].get(
                chosen, {}).get("path")}
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


def _bundle_files(config, tasks, endpoints: dict, staging: str, final: str,
                  bundle_variants) -> dict:
    """Converts and writes bundle_<variant>.tflite; {variant: what the file
    holds and shares}, each task's `tasks` entry still empty."""
    # Common calibration for every signature: the same images give the
    # shared universal layers the same quantisation parameters in every task
    # wherever their input is; `tflite.convert` makes the int8 kernels of the
    # rest one buffer (the int32 biases follow each task's input scale).
    calibration = ([b for t in tasks for b in calibration_images(config, t)]
                   if "int8" in bundle_variants else None)
    variants = {}
    converted = {}
    with tflite.static_savedmodel(endpoints) as static_path:
        converter = tflite.Converter(static_path, list(endpoints))
        # float32 first: the weight-only variants quantise its bytes.
        for v in sorted(bundle_variants, key=lambda v: v != "float32"):
            converted[v] = converter.convert(v, lambda: calibration, converted.get("float32"))
    for variant, content in converted.items():
        name = f"bundle_{variant}.tflite"
        with open(os.path.join(staging, name), "wb") as f:
            f.write(content)
        contents = tflite.inspect(content)
        shares = tflite.sharing(content).summary()
        for per_task in ("task_weight_bytes", "universal_task_weight_bytes"):
            shares[per_task] = {t.name: shares[per_task].get(key, 0)
                                for t, key in zip(tasks, endpoints)}
        variants[variant] = {"path": _rel(config, os.path.join(final, name)),
                             "bytes": len(content), "weight_bytes": contents.weight_bytes,
                             "weight_buffers": contents.weight_buffers,
                             "shared_buffers": contents.shared_buffers, **shares,
                             "weight_types": contents.weight_types, "tasks": {}}
        if variant == "int8":
            # TensorFlow issue 52145: a signature the calibration missed stays
            # float without an error.  Count the float weights per signature.
            left = {key: tflite.float_weights(contents, key) for key in endpoints}
            variants[variant]["float_weights_per_signature"] = left
            variants[variant]["every_signature_quantized"] = not any(left.values())
    return variants


def _export_bundle(config, tasks, staging, final, task_params: dict, bundle_variants) -> dict:
    universal = static_graph.UniversalLayers()
    endpoints = {savedmodel.signature_key(t.name): nettailor_endpoint(config, t, universal)
                 for t in tasks}
    if len(set(endpoints)) != len(tasks):
        raise artifacts.StageError("bundle: two task names map to one signature key: "
                                + ", ".join(t.name for t in tasks))
    sm_path = os.path.join(staging, "savedmodel")
    serve = savedmodel.write_savedmodel(sm_path, endpoints)
    stored = savedmodel.stored_variables(sm_path)
    labels = {}
    for task, key in zip(tasks, endpoints):
        name = savedmodel.bundle_labels_file(key)
        savedmodel.write_labels(os.path.join(staging, name), label_names(task))
        labels[task.name] = _rel(config, os.path.join(final, name))
    used = {id(w): w for e in endpoints.values() for w in e.model.weights}
    variants = _bundle_files(config, tasks, endpoints, staging, final, bundle_variants)
    for task, key in zip(tasks, endpoints):
        predictors = {**_keras_predictors("keras", endpoints[key], serve[key]),
                      "savedmodel": parity.savedmodel_predictor(sm_path, key)}
        for variant in variants:
            predictors[variant] = parity.tflite_predictor(
                os.path.join(staging, f"bundle_{variant}.tflite"), key, num_threads=1)
        with quiet.native_stderr_filtered():
            outcome = parity.run_all(predictors, _test_batches(config, task),
                                     workers=timing.all_cores())
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
        # Read from the files: a universal layer stored per task in any
        # variant, and the layers built per task in Keras (per-task BN).
        "unshared_universal_layers": sorted(
            set(universal.unshared) | {c for info in variants.values()
                                       for c in info["universal_copies"]}),
        "signatures": {t.name: k for t, k in zip(tasks, endpoints)},
        # Keras's ExportArchive adds it for TF Serving: an alias of the first task.
        "savedmodel_default_signature": next(iter(endpoints)),
        "labels": labels, **_tflite_interface(config), "variants": variants,
    }
    logging.info("bundle: %d signatures, float32 %s bytes (bound %d), SavedModel %d variables",
                 len(endpoints), bundle["bytes"], bound, len(stored))
    return {"bundle": bundle}

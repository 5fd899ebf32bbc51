"""The export and benchmark stages end to end: an image-folder task and a
mocked tfds task on the tiny backbone, trained for one short epoch per stage,
then exported, parity-checked, bundled and timed; and what an app developer
gets: labels files, static .tflite inputs, named outputs, the predict command
and the BUILD.md snippet run on those files."""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from ai_edge_litert.interpreter import Interpreter
from helpers import run_in_process
from report_keys import documented, key_paths
from PIL import Image

from exporters import parity, savedmodel, tflite
from nettailor_tf import predict, stages
from nettailor_tf import data as data_lib
from nettailor_tf.latency import table as latency_table
from nettailor_tf.settings import tuned
from nettailor_tf.settings.config import Config
from nettailor_tf.stages import deploy, recommend
from nettailor_tf.training.train import Schedule

ONE_EPOCH = Schedule(epochs=1, batch_size=16, learning_rate=0.05, decay_epochs=1)
SIZE = 16
# A folder task ("objects": class folders written in this order, labels are
# the sorted names) and a mocked tfds one (ClassLabel names "0".."9").
FOLDER_CLASSES = ("zebra", "apple", "mango")
LABELS = {"objects": ["apple", "mango", "zebra"], "mnist": [str(d) for d in range(10)]}
NAMES = ("objects", "mnist")
TASKS = []  # the specs, set by the `folder` fixture


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 pictures per class at the model's size, each class its own tint."""
    root = tmp_path_factory.mktemp("pictures") / "objects"
    rng = np.random.default_rng(0)
    for index, name in enumerate(FOLDER_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 160, (SIZE, SIZE, 3))
            pixels[..., index] += 90
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    TASKS[:] = [f"folder:{root}", "tfds:mnist"]
    return root


def _config(workdir, **overrides):
    values = dict(workdir=str(workdir), tasks=tuple(TASKS), backbone="tiny",
                  backbone_weights="random",
                  image_size=SIZE, teacher=ONE_EPOCH, student=ONE_EPOCH, finetune=ONE_EPOCH,
                  prune_universal=1, prune_proxy_threshold=0.2, log_every=100,
                  checkpoint_every=100, calibration_images=32, benchmark_runs=50,
                  benchmark_warmup=2,
                  # Every variant (int4_weights and mixed are off by default),
                  # and the bundle's int8 beside the recommended one.
                  export_variants=tflite.VARIANTS,
                  bundle_variants=("float32", "int8", "recommended"))
    values.update(overrides)
    config = Config(**values)
    config.validate()
    return config


@pytest.fixture(scope="module")
def mocked():
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mocked, folder):
    """A workdir after teacher, student, prune and finetune."""
    workdir = tmp_path_factory.mktemp("deploy") / "run"
    config = _config(workdir, stages=("teacher", "student", "prune", "finetune"))
    stages.run(config, tf.distribute.get_strategy())
    return workdir


# Images each Keras reference predictor was given during `exported`'s export,
# one entry per predictor made.
KERAS_REFERENCE_IMAGES = []


@pytest.fixture(scope="module")
def exported(trained, mocked):
    config = _config(trained, stages=("export", "benchmark"))
    real = parity.keras_predictor

    def counted(endpoint, serve=None):
        assert serve is not None, "a Keras reference traced its network again"
        predict = real(endpoint, serve)
        index = len(KERAS_REFERENCE_IMAGES)
        KERAS_REFERENCE_IMAGES.append(0)

        def run(images):
            KERAS_REFERENCE_IMAGES[index] += len(images)
            return predict(images)
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parity, "keras_predictor", counted)
        stages.run(config, tf.distribute.get_strategy())
    return trained


def _report(workdir):
    return json.loads((workdir / "report.json").read_text())


def test_report_holds_every_artefact_with_its_parity_and_latency(exported):
    report = _report(exported)
    for name in NAMES:
        task = report["tasks"][name]
        assert set(task["tflite"]) == set(tflite.VARIANTS)
        entries = list(task["tflite"].values()) + [task["teacher_tflite"]["float32"]]
        for entry in entries:
            assert set(entry) >= {"path", "bytes", "latency_ms", "top1_agreement", "accuracy"}
            path = exported / entry["path"]
            assert path.is_file() and path.stat().st_size == entry["bytes"]
            assert entry["latency_ms"] > 0 and entry["latency_ms_all_cores"] > 0
            one = entry["latency"]["1"]
            assert one["p10_ms"] <= one["median_ms"] == entry["latency_ms"] <= one["p90_ms"]
            assert one["other_load_cores"] >= 0 and isinstance(one["busy"], bool)
            assert 0 <= entry["accuracy"] <= 1
        for entry in (task["tflite"]["float32"], task["teacher_tflite"]["float32"],
                      task["savedmodel"], task["teacher_savedmodel"]):
            assert entry["top1_agreement"] >= 0.995
        # The file computes what the Keras model computes on the same images
        # (resized to the static input's size, as an app feeds it).
        assert task["tflite"]["float32"]["accuracy"] == task["export"][
            "keras_accuracy_resized"]["nettailor"]
        assert task["tflite"]["int8"]["weight_types"].get("FLOAT32", 0) == 0
        mixed = task["tflite"]["mixed"]["mixed"]
        assert 0 <= mixed["kept_layers"] <= mixed["layers"] and mixed["kept_as"] == "int8"
        assert mixed["budget"] >= 0.005 and mixed["met_budget"] == (
            mixed["selection_accuracy"] >= mixed["selection_float32_accuracy"] - mixed["budget"])
        assert task["tflite"]["float32"]["bytes"] < task["teacher_tflite"]["float32"]["bytes"]
        assert task["latency_ratio_float32"] > 0
        # One of four universal blocks cut, proxies over 0.2 kept: cheaper
        # than the teacher, by the report's own multiply-add counts.
        assert task["flops_ratio"] == pytest.approx(task["pruned"]["flops"]
                                                    / task["teacher"]["flops"])
        assert task["flops_ratio"] < 1
        # The latency table's float32 prediction for each network sits beside
        # what was measured; the pruned network is predicted cheaper.
        assert 0 < task["pruned"]["predicted_latency_ms"] < task["teacher"]["predicted_latency_ms"]
        # ...and how far off each was, against the file timed in the
        # table's rounds and against the benchmark's timing.
        for part, files in (("pruned", "tflite"), ("teacher", "teacher_tflite")):
            entry = task[part]
            assert entry["predicted_latency_error"] == pytest.approx(
                entry["predicted_latency_ms"] / entry["predicted_latency_measured_ms"] - 1,
                abs=1e-3)
            assert entry["predicted_latency_error_benchmark"] == pytest.approx(
                entry["predicted_latency_ms"] / task[files]["float32"]["latency_ms"] - 1,
                abs=1e-3)
    table = report["latency_prediction_table"]
    assert table["threads"] == 1 and len(table["fingerprint"]) == 64
    assert table["calibration"]["networks"] >= 3 and table["busy"] in (True, False)
    # The table itself is kept in the workdir, as the report names it.
    kept = latency_table.LatencyTable.load(str(pathlib.Path(exported) / table["path"]))
    assert kept.fingerprint() == table["fingerprint"]


def test_each_keras_reference_runs_once_over_the_test_split_for_all_its_files(exported):
    """A task's export compares a dozen files with two Keras networks, the
    bundle each signature with one: every network's predictor (made from the
    serving function the SavedModel write traced, `counted` checks) sees
    each test image twice, raw and resized, whatever the number of files."""
    report = _report(exported)
    test_images = {t: report["tasks"][t]["export"]["test_images"] for t in NAMES}
    # nettailor and teacher per task, then one network per bundle signature.
    expected = [2 * test_images[t] for t in NAMES for _ in range(2)] + \
               [2 * test_images[t] for t in NAMES]
    assert sorted(KERAS_REFERENCE_IMAGES) == sorted(expected)


def test_every_key_of_the_written_report_is_documented(exported):
    """The report this run wrote (every stage, every variant, the bundle),
    not a stored copy that ages with the code."""
    report = _report(exported)
    paths = key_paths(report)
    assert {"tasks.<task>.student.gates", "bundle.memory_mb.bundle_weight_cache",
            "tasks.<task>.tflite.<variant>.latency.<threads>.median_ms",
            "tasks.<task>.tflite.<variant>.mixed.kept_layers",
            "bundle.variants.<variant>.weight_types.<signature>.<TYPE>"} <= paths, \
        "the run wrote less than every stage's keys"
    missing = sorted(paths - documented())
    assert not missing, f"docs/report_json.md does not document: {missing}"


def test_each_task_names_its_recommended_and_smallest_file(exported):
    """The export stage ran every file on the validation split and timed it:
    the recommended file is the fastest within the tolerance of float32's
    accuracy, the smallest the smallest such; export.json says the same, and
    the bundle is built in the fastest variant every task accepts."""
    report = _report(exported)
    for name in NAMES:
        choice = report["tasks"][name]["recommended"]
        manifest = json.loads((exported / report["tasks"][name]["export"]["dir"]
                               / "export.json").read_text())
        assert manifest["recommended"] == choice
        found = choice["candidates"]
        assert set(found) == set(tflite.VARIANTS) and choice["selection_split"] == "validation"
        floor = found["float32"]["selection_accuracy"] - choice["tolerance"] - 1e-9
        ok = [v for v, c in found.items() if c["selection_accuracy"] >= floor]
        assert choice["acceptable"] == ok and "float32" in ok
        scales = [v for v in ok if found[v]["latency_ms_all_cores"]
                  <= tuned.ALL_CORES_MARGIN * found["float32"]["latency_ms_all_cores"]]
        assert choice["no_slower_with_every_core"] == scales and "float32" in scales
        assert found[choice["recommended"]]["latency_ms"] == min(
            found[v]["latency_ms"] for v in scales)
        assert found[choice["smallest"]]["bytes"] == min(found[v]["bytes"] for v in ok)
        for which in ("recommended", "smallest"):
            path = exported / choice[f"{which}_path"]
            assert path.name == f"nettailor_{choice[which]}.tflite" and path.is_file()
            assert found[choice[which]]["bytes"] == path.stat().st_size
    chosen = report["bundle"]["recommended"]
    assert chosen["variant"] in report["bundle"]["variants"]
    assert chosen["path"] == report["bundle"]["variants"][chosen["variant"]]["path"]
    for name in NAMES:
        assert chosen["variant"] in report["tasks"][name]["recommended"][
            "no_slower_with_every_core"]


def test_bundle_shares_the_universal_weights(exported):
    bundle = _report(exported)["bundle"]
    assert set(bundle) >= {"savedmodel_path", "tflite_path", "bytes", "universal_params",
                           "task_specific_params"}
    assert set(bundle["task_specific_params"]) == set(NAMES)
    assert bundle["savedmodel_variables"] == bundle["keras_variables"]
    # The tiny network's weights (45 kB) are smaller than a .tflite file's
    # graph description, so the whole-file bound is checked on the real
    # quickstart; here the weights alone must fit 4 bytes per parameter.
    float32 = bundle["variants"]["float32"]
    params = bundle["universal_params"] + sum(bundle["task_specific_params"].values())
    assert float32["weight_bytes"] <= 4 * params, (float32, params)
    assert float32["shared_buffers"] > 0
    assert float32["bytes"] < float32["separate_files_bytes"]
    assert bundle["variants"]["int8"]["every_signature_quantized"]
    for variant in bundle["variants"].values():
        assert set(variant["tasks"]) == set(NAMES)
        # Read from the file: every universal layer both tasks run is one
        # buffer, and the weights each task reads alone are counted.
        assert variant["universal_copies"] == [] and variant["universal_ops_shared"] > 0
        assert variant["shared_weight_bytes"] > 0
        assert set(variant["task_weight_bytes"]) == set(NAMES)
        assert all(b > 0 for b in variant["task_weight_bytes"].values())
    assert bundle["unshared_universal_layers"] == []
    for info in bundle["variants"]["float32"]["tasks"].values():
        assert info["top1_agreement"] >= 0.995
    assert set(bundle["latency"]["float32"]) == set(NAMES)
    sm = tf.saved_model.load(str(exported / bundle["savedmodel_path"]))
    # The tasks, and the alias ExportArchive adds for TF Serving (documented).
    assert set(sm.signatures) == {"objects", "mnist", "serving_default"}
    assert bundle["savedmodel_default_signature"] == "objects"


def test_markdown_and_plot(exported):
    text = (exported / "report.md").read_text()
    assert "On device (LiteRT, batch 1)" in text and "Multi-task bundle" in text
    assert (exported / "deployment.png").stat().st_size > 10_000
    assert "## Predicted against measured latency" in text
    assert "| objects | NetTailor |" in text
    assert text.count("**Recommended:**") == 2 and "Recommended bundle: bundle/" in text
    assert "| weights shared | weights per task |" in text
    assert (exported / "latency_prediction.png").stat().st_size > 10_000


def test_a_second_run_skips_and_a_lost_report_entry_comes_from_the_manifest(exported, mocked,
                                                                             caplog):
    report_path = exported / "report.json"
    report = _report(exported)
    export = exported / "tasks" / "objects" / "export"
    mtime = (export / "nettailor_float32.tflite").stat().st_mtime_ns
    del report["tasks"]["objects"]["tflite"]  # as if killed before the report write
    report_path.write_text(json.dumps(report))
    with caplog.at_level("INFO", logger="absl"):
        stages.run(_config(exported, stages=("export",)), tf.distribute.get_strategy())
    messages = [r.getMessage() for r in caplog.records]
    assert any("export stage already done" in m for m in messages), messages
    assert (export / "nettailor_float32.tflite").stat().st_mtime_ns == mtime
    restored = _report(exported)["tasks"]["objects"]["tflite"]
    assert set(restored) == set(tflite.VARIANTS)


def test_a_failing_export_keeps_the_previous_one(exported, mocked, monkeypatch):
    """Injected failure at the int8 conversion of a new export (new settings):
    the previous export directory and its manifest stay as they were."""
    export = exported / "tasks" / "mnist" / "export"
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    manifest = (export / "export.json").read_text()
    real = tflite.Converter.convert

    def failing(converter, variant, calibration=None, float_content=None):
        if variant == "int8":
            raise tflite.ConversionError("injected failure")
        return real(converter, variant, calibration, float_content)

    monkeypatch.setattr(tflite.Converter, "convert", failing)
    config = _config(exported, stages=("export",), tasks=("tfds:mnist",), calibration_images=16)
    with pytest.raises(tflite.ConversionError, match="injected"):
        stages.run(config, tf.distribute.get_strategy())
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before
    assert (export / "export.json").read_text() == manifest
    assert not [p for p in (exported / "tasks" / "mnist").iterdir()
                if p.name.startswith(".export")]


def test_an_export_that_disagrees_with_keras_is_discarded(trained, mocked, monkeypatch,
                                                          tmp_path):
    """A float32 file whose answers differ from the Keras model's fails the
    export, and nothing is left where the next run would read it."""
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("export", "bundle"))
    real = parity.tflite_predictor

    def scrambled(path, key="serving_default", num_threads=None):
        predict = real(path, key, num_threads)
        if path.endswith("nettailor_float32.tflite"):
            return lambda images: np.roll(predict(images), 1, axis=-1)
        return predict

    monkeypatch.setattr(parity, "tflite_predictor", scrambled)
    config = _config(workdir, stages=("export",), tasks=("tfds:mnist",))
    with pytest.raises(parity.ParityError, match="nettailor_float32.tflite: top-1 agreement"):
        stages.run(config, tf.distribute.get_strategy())
    assert sorted(p.name for p in (workdir / "tasks" / "mnist").iterdir()
                  if "export" in p.name) == []


def test_export_before_training_is_a_one_line_cli_error(tmp_path, capsys):
    code, err = run_in_process(capsys, f"--workdir={tmp_path}", "--tasks=digits",
                               "--stages=export", "--backbone=tiny", "--backbone_weights=random",
                               "--image_size=16")
    assert code == 2
    assert err.strip().startswith("nettailor_tf: error: digits: no plan.json"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag,message", [
    ("--export_variants=float32,int4", "unknown TFLite variant 'int4'; accepted: float32,"),
    ("--export_variants=int8", "must include float32"),
    ("--bundle_variants=float16", "--bundle_variants must include float32"),
    ("--benchmark_runs=10", "--benchmark_runs=10: must be >= 50"),
    ("--parity_min_agreement=1.5", "--parity_min_agreement=1.5: must be in [0, 1]"),
])
def test_bad_export_flags_are_one_line_errors(tmp_path, capsys, flag, message):
    code, err = run_in_process(capsys, f"--workdir={tmp_path}", "--tasks=digits",
                               "--backbone=tiny", "--backbone_weights=random", "--image_size=16",
                               flag)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


# --- what an app developer gets --------------------------------------------------

def test_every_export_carries_its_class_names(exported):
    report = _report(exported)
    for name in NAMES:
        export = exported / "tasks" / name / "export"
        assert sorted(p.name for p in export.iterdir()) == sorted(
            ["export.json", "labels.txt", "nettailor_savedmodel", "teacher_savedmodel",
             "teacher_float32.tflite"] + [f"nettailor_{v}.tflite" for v in tflite.VARIANTS])
        assert (export / "labels.txt").read_text().splitlines() == LABELS[name]
        assert report["tasks"][name]["export"]["labels"] == f"tasks/{name}/export/labels.txt"
    bundle = report["bundle"]
    assert bundle["labels"] == {name: f"bundle/labels_{name}.txt" for name in NAMES}
    for name, path in bundle["labels"].items():
        assert (exported / path).read_text().splitlines() == LABELS[name]


def _signature_runners(path):
    interpreter = Interpreter(model_path=str(path))
    return interpreter, {key: interpreter.get_signature_runner(key)
                         for key in interpreter.get_signature_list()}


def test_tflite_files_take_one_static_uint8_image_and_name_their_outputs(exported):
    report = _report(exported)
    files = [(exported / e["path"], ["serving_default"]) for name in NAMES
             for part in ("tflite", "teacher_tflite")
             for e in report["tasks"][name][part].values()]
    files += [(exported / v["path"], list(NAMES)) for v in report["bundle"]["variants"].values()]
    # Per task: every NetTailor variant and the teacher's float32.
    assert len(files) == 2 * (len(tflite.VARIANTS) + 1) + len(report["bundle"]["variants"])
    assert "int8" in str(files) and "int4_weights" in str(files)
    for path, keys in files:
        interpreter, runners = _signature_runners(path)
        assert list(runners) == sorted(keys), path  # the converter sorts the keys
        for key, runner in runners.items():
            (name, details), = runner.get_input_details().items()
            assert name == "images" and details["dtype"] == np.uint8, (path, details)
            assert details["shape"].tolist() == [1, SIZE, SIZE, 3]
            assert details["shape_signature"].tolist() == [1, SIZE, SIZE, 3]
            assert details["name"] == f"{key}_images:0"  # benchmark_model's --input_layer
            outputs = runner.get_output_details()
            assert set(outputs) == {"logits", "probabilities"}
            assert all(o["dtype"] == np.float32 and o["shape"][0] == 1 for o in outputs.values())
        # Index-based APIs see subgraph 0, the first key in sorted order:
        # output 0 logits, 1 probabilities.
        first = runners[min(keys)].get_output_details()
        assert interpreter.get_input_details()[0]["name"] == f"{min(keys)}_images:0"
        assert [d["index"] for d in interpreter.get_output_details()] == [
            first["logits"]["index"], first["probabilities"]["index"]], path
    assert report["tasks"]["objects"]["export"]["tflite_input"] == {
        "name": "images", "shape": [1, SIZE, SIZE, 3], "dtype": "uint8"}
    assert report["bundle"]["tflite_outputs"] == ["logits", "probabilities"]
    # The SavedModels stay any-size, for servers.
    signature = tf.saved_model.load(
        str(exported / report["tasks"]["mnist"]["savedmodel"]["path"])).signatures[
            "serving_default"]
    spec = signature.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, None, None, 3] and spec.dtype == tf.uint8
    assert set(signature.structured_outputs) == {"logits", "probabilities"}


@pytest.fixture(scope="module")
def pictures(folder, tmp_path_factory):
    """A test picture at the model's size, and a larger JPEG that the static
    files get resized on the host."""
    root = tmp_path_factory.mktemp("predict")
    small = folder / "mango" / "03.png"
    big = root / "big.jpg"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)).save(big, quality=95)
    return [str(small), str(big)]


@pytest.fixture(scope="module")
def keras_answers(exported, mocked, pictures):
    """Top-1 label of the Keras networks per (task, picture): on the picture
    as it is (the SavedModels' input) and resized to S x S (the .tflite files')."""
    config = _config(exported)
    answers = {}
    for spec, name in zip(TASKS, NAMES):
        endpoint = deploy.nettailor_endpoint(config, data_lib.load_task(spec))
        raw = parity.keras_predictor(endpoint)
        resized = parity.resized(raw, SIZE)
        for picture in pictures:
            image = np.asarray(Image.open(picture).convert("RGB"))[None]
            answers[name, picture] = {kind: LABELS[name][int(np.argmax(f(image)[0]))]
                                      for kind, f in (("raw", raw), ("resized", resized))}
    return answers


def _predict(capsys, *args):
    capsys.readouterr()
    code = predict.main(["predict", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("model,task,kind", [
    ("tasks/objects/export/nettailor_float32.tflite", None, "resized"),
    ("tasks/mnist/export/nettailor_int8.tflite", None, "resized"),
    ("tasks/objects/export/nettailor_savedmodel", None, "raw"),
    ("bundle/bundle_float32.tflite", None, "resized"),
    ("bundle/bundle_float32.tflite", "mnist", "resized"),
    ("bundle/savedmodel", None, "raw"),
])
def test_predict_prints_the_top_classes_of_each_task(exported, pictures, keras_answers, capsys,
                                                     model, task, kind):
    args = [f"--model={exported / model}", *(f"--image={p}" for p in pictures), "--top_k=2"]
    lines = _predict(capsys, *args, *([f"--task={task}"] if task else []))
    tasks = [task] if task else (NAMES if model.startswith("bundle") else [model.split("/")[1]])
    assert [line["image"] for line in lines] == pictures
    for line in lines:
        assert set(line) == {"image", "tasks", "latency_ms", "peak_memory_mb"}
        assert line["latency_ms"] > 0 and line["peak_memory_mb"] > 50
        assert sorted(line["tasks"]) == sorted(tasks)
        for name, answer in line["tasks"].items():
            top = answer["top"]
            assert [t["label"] in LABELS[name] for t in top] == [True, True]
            assert top[0]["probability"] >= top[1]["probability"] > 0
            if "int8" not in model:  # the quantised file may differ; parity measures how often
                assert top[0]["label"] == keras_answers[name, line["image"]][kind], (name, line)


def test_the_build_md_python_snippet_runs_on_the_bundle(exported, pictures, keras_answers,
                                                        tmp_path):
    text = (pathlib.Path(__file__).resolve().parents[1] / "BUILD.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- python-bundle-snippet[^\n]*-->\n```python\n(.*?)```", text,
                     re.S).group(1)
    assert "bundle, task, picture = " in code

    def snippet(task, picture):
        edited = re.sub(r"(?m)^bundle, task, picture = .*$",
                        f"bundle, task, picture = {str(exported / 'bundle')!r}, {task!r}, "
                        f"{picture!r}", code)
        run = subprocess.run([sys.executable, "-c", edited], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    # At the model's size (PIL's resize is then a copy): the Keras network's answer.
    assert snippet("objects", pictures[0]) == keras_answers["objects", pictures[0]]["raw"]
    assert snippet("mnist", pictures[1]) in LABELS["mnist"]  # resized by PIL


def test_the_bundle_memory_benchmark_measures_every_way(exported):
    """benchmarks/bundle_memory.py on this run's files: fresh processes, one per way."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    try:
        import bundle_memory
    finally:
        sys.path.pop(0)
    result = bundle_memory.workdir_memory(str(exported), repeats=1)
    assert result["tasks"] == 2 and result["baseline"] > 10
    for way in ("separate_files", "separate_files_weight_cache", "separate_files_in_memory_cache",
                "bundle", "bundle_weight_cache", "bundle_in_memory_cache"):
        assert -5 < result[way] < 500, (way, result)
        assert result["breakdown"][way]["model_files"] >= 0


def _benchmark_module(name):
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_the_latency_prediction_benchmark_times_each_network_beside_its_table(exported,
                                                                              tmp_path):
    """benchmarks/latency_prediction.py on this run's plans, at another size:
    a table measured for that size, each pruned network and teacher timed."""
    rows = _benchmark_module("latency_prediction").predicted_and_measured(
        str(exported), 24, runs=50, cache_dir=str(tmp_path / "tables"))
    assert {(r["task"], r["network"]) for r in rows} == {
        (t, n) for t in NAMES for n in ("NetTailor", "teacher")}
    for row in rows:
        assert row["image_size"] == 24 and row["predicted_ms"] > 0 and row["measured_ms"] > 0
        # (the printed figures are rounded to 0.1 us: a tiny network's are tens of us)
        assert row["error"] == pytest.approx(row["predicted_ms"] / row["measured_ms"] - 1,
                                             abs=0.02)
    # One table (beside it, the folder of its converted files).
    assert len(list((tmp_path / "tables").glob("*.json"))) == 1


def test_the_workdir_comparison_times_the_same_files_together(exported, tmp_path):
    """benchmarks/compare_workdirs.py: this run against a copy of it."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    rows = _benchmark_module("compare_workdirs").compare([str(exported), str(copy)], runs=50,
                                                         rounds=5)
    assert [r["task"] for r in rows] == list(NAMES)
    for row in rows:
        first, second = (row["workdirs"][str(w)] for w in (exported, copy))
        assert first["ratio_to_first"] == 1.0
        assert second["ratio_to_first"] == pytest.approx(
            second["median_ms"] / first["median_ms"], abs=0.02)
        assert first["accuracy"] == second["accuracy"] == _report(exported)["tasks"][
            row["task"]]["pruned"]["accuracy"]


def test_restart_from_benchmark_times_the_files_again(exported, caplog):
    """A figure timed on a busy machine is timed again on request, without
    exporting anything again."""
    before = _report(exported)
    export_json = exported / "tasks" / NAMES[0] / "export" / "export.json"
    exported_at = export_json.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="absl"):
        stages.run(_config(exported, stages=("export", "benchmark"), restart_from="benchmark"),
                   tf.distribute.get_strategy())
    messages = [r.getMessage() for r in caplog.records]
    assert any("benchmark stage: timing" in m for m in messages)
    assert not any("benchmark stage already done" in m for m in messages)
    assert export_json.stat().st_mtime_ns == exported_at  # not exported again
    after = _report(exported)
    # (Earlier tests here may have re-exported, leaving the entry untimed.)
    entry_before = before["tasks"][NAMES[0]]["tflite"]["float32"].get("latency")
    entry_after = after["tasks"][NAMES[0]]["tflite"]["float32"]["latency"]
    assert entry_after["1"]["median_ms"] > 0 and entry_after != entry_before
    assert "memory_mb" in after["bundle"] and after["bundle"]["latency"]
    # The predictions are made again, from a table timed with the files anew.
    assert any("measuring one for the predictions" in m for m in messages)
    assert after["latency_prediction_table"]["fingerprint"] != before.get(
        "latency_prediction_table", {}).get("fingerprint")


def test_the_benchmark_stage_records_the_bundles_memory(exported):
    # Other tests here re-export the bundle: benchmark it again first.
    stages.run(_config(exported, stages=("benchmark",)), tf.distribute.get_strategy())
    memory = _report(exported)["bundle"]["memory_mb"]
    assert set(memory) >= {"baseline", "separate_files", "separate_files_weight_cache",
                           "separate_files_in_memory_cache", "bundle", "bundle_weight_cache",
                           "bundle_in_memory_cache", "breakdown"}
    assert memory["tasks"] == 2 and memory["baseline"] > 10
    assert "XNNPACK weight cache in memory" in (exported / "report.md").read_text()

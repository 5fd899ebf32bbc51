"""The export and benchmark stages end to end: two mocked tfds tasks on the
tiny backbone, trained for one short epoch per stage, then exported,
parity-checked, bundled and timed."""
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import run_in_process

from exporters import parity, tflite
from nettailor_tf import stages
from nettailor_tf.config import Config
from nettailor_tf.train import Schedule

ONE_EPOCH = Schedule(epochs=1, batch_size=16, learning_rate=0.05, decay_epochs=1)
TASKS = ("tfds:svhn_cropped", "tfds:mnist")
NAMES = ("svhn_cropped", "mnist")


def _config(workdir, **overrides):
    values = dict(workdir=str(workdir), tasks=TASKS, backbone="tiny", backbone_weights="random",
                  image_size=16, teacher=ONE_EPOCH, student=ONE_EPOCH, finetune=ONE_EPOCH,
                  prune_universal=1, prune_proxy_threshold=0.2, log_every=100,
                  checkpoint_every=100, calibration_images=32, benchmark_runs=50,
                  benchmark_warmup=2)
    values.update(overrides)
    config = Config(**values)
    config.validate()
    return config


@pytest.fixture(scope="module")
def mocked():
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mocked):
    """A workdir after teacher, student, prune and finetune."""
    workdir = tmp_path_factory.mktemp("deploy") / "run"
    config = _config(workdir, stages=("teacher", "student", "prune", "finetune"))
    stages.run(config, tf.distribute.get_strategy())
    return workdir


@pytest.fixture(scope="module")
def exported(trained, mocked):
    config = _config(trained, stages=("export", "benchmark"))
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
            assert 0 <= entry["accuracy"] <= 1
        for entry in (task["tflite"]["float32"], task["teacher_tflite"]["float32"],
                      task["savedmodel"], task["teacher_savedmodel"]):
            assert entry["top1_agreement"] >= 0.995
        # The file computes what the Keras model computes on the same images.
        assert task["tflite"]["float32"]["accuracy"] == task["export"]["keras_accuracy"][
            "nettailor"]
        assert task["tflite"]["int8"]["weight_types"].get("FLOAT32", 0) == 0
        assert task["tflite"]["float32"]["bytes"] < task["teacher_tflite"]["float32"]["bytes"]
        assert task["latency_ratio_float32"] > 0
        # One of four universal blocks cut, proxies over 0.2 kept: cheaper
        # than the teacher, by the report's own multiply-add counts.
        assert task["flops_ratio"] == pytest.approx(task["pruned"]["flops"]
                                                    / task["teacher"]["flops"])
        assert task["flops_ratio"] < 1


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
    for info in bundle["variants"]["float32"]["tasks"].values():
        assert info["top1_agreement"] >= 0.995
    assert set(bundle["latency"]["float32"]) == set(NAMES)
    sm = tf.saved_model.load(str(exported / bundle["savedmodel_path"]))
    assert set(sm.signatures) >= {"svhn_cropped", "mnist"}


def test_markdown_and_plot(exported):
    text = (exported / "report.md").read_text()
    assert "On device (LiteRT, batch 1)" in text and "Multi-task bundle" in text
    assert (exported / "deployment.png").stat().st_size > 10_000


def test_a_second_run_skips_and_a_lost_report_entry_comes_from_the_manifest(exported, mocked,
                                                                             caplog):
    report_path = exported / "report.json"
    report = _report(exported)
    export = exported / "tasks" / "svhn_cropped" / "export"
    mtime = (export / "nettailor_float32.tflite").stat().st_mtime_ns
    del report["tasks"]["svhn_cropped"]["tflite"]  # as if killed before the report write
    report_path.write_text(json.dumps(report))
    with caplog.at_level("INFO", logger="absl"):
        stages.run(_config(exported, stages=("export",)), tf.distribute.get_strategy())
    messages = [r.getMessage() for r in caplog.records]
    assert any("export stage already done" in m for m in messages), messages
    assert (export / "nettailor_float32.tflite").stat().st_mtime_ns == mtime
    restored = _report(exported)["tasks"]["svhn_cropped"]["tflite"]
    assert set(restored) == set(tflite.VARIANTS)


def test_a_failing_export_keeps_the_previous_one(exported, mocked, monkeypatch):
    """Injected failure at the int8 conversion of a new export (new settings):
    the previous export directory and its manifest stay as they were."""
    export = exported / "mnist" / "export"
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    manifest = (export / "export.json").read_text()
    real = tflite.convert

    def failing(path, keys, variant, calibration=None):
        if variant == "int8":
            raise tflite.ConversionError("injected failure")
        return real(path, keys, variant, calibration)

    monkeypatch.setattr(tflite, "convert", failing)
    config = _config(exported, stages=("export",), tasks=("tfds:mnist",), calibration_images=16)
    with pytest.raises(tflite.ConversionError, match="injected"):
        stages.run(config, tf.distribute.get_strategy())
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before
    assert (export / "export.json").read_text() == manifest
    assert not [p for p in (exported / "mnist").iterdir() if p.name.startswith(".export")]


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
    assert sorted(p.name for p in (workdir / "mnist").iterdir()
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

"""Serving SavedModels: uint8 images of any size in, logits and probabilities
out, and a multi-task bundle that stores each universal weight once."""
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_static_models

from exporters import parity, savedmodel
from nettailor_tf import data as data_lib
from nettailor_tf.model.student_network import BlockPlan, Plan

SIZE = 16
# Two tasks that keep different universal blocks (0, 2 and 0, 1, 3) and proxies.
PLAN_A = Plan([BlockPlan(True, []), BlockPlan(False, [0]), BlockPlan(True, [1]),
               BlockPlan(False, [3, 2])])
PLAN_B = Plan([BlockPlan(True, [0]), BlockPlan(True, []), BlockPlan(False, [1]),
               BlockPlan(True, [3])])


@pytest.fixture(scope="module")
def tasks():
    models, universal = tiny_static_models([PLAN_A, PLAN_B], image_size=SIZE)
    return models, universal


@pytest.mark.parametrize("crop", [False, True])
def test_preprocess_equals_the_evaluation_pipeline_when_upscaling(crop):
    """In-graph resize (and centre crop) = data/pipeline.py's eval transform for inputs
    no larger than the model's size, i.e. no antialiasing involved."""
    images = np.random.default_rng(0).integers(0, 256, (3, 11, 13, 3), dtype=np.uint8)
    ours = savedmodel.preprocess(tf.constant(images), SIZE, crop).numpy()
    expected = np.stack([data_lib.eval_transform(tf.constant(i), "crop" if crop else "none",
                                                 SIZE).numpy() for i in images])
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_savedmodel_serves_uint8_images_of_any_size(tasks, tmp_path):
    ((model, _), _), _ = tasks
    endpoint = savedmodel.Endpoint(model, SIZE, crop=False)
    path = str(tmp_path / "sm")
    savedmodel.write_savedmodel(path, {savedmodel.SERVING_KEY: endpoint})
    signature = tf.saved_model.load(path).signatures[savedmodel.SERVING_KEY]
    assert signature.structured_input_signature[1]["images"].dtype == tf.uint8
    rng = np.random.default_rng(1)
    for shape in [(2, 16, 16, 3), (1, 9, 30, 3), (3, 40, 21, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        out = signature(images=tf.constant(images))
        expected = model(savedmodel.preprocess(tf.constant(images), SIZE, False)).numpy()
        np.testing.assert_allclose(out["logits"].numpy(), expected, rtol=1e-5, atol=1e-5)
        assert out["logits"].shape == (shape[0], 5)
        np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)


def test_bundle_stores_each_universal_weight_once(tasks, tmp_path):
    (model_a, _), (model_b, _) = tasks[0]
    universal = tasks[1]
    assert universal.unshared == []
    endpoints = {"task_a": savedmodel.Endpoint(model_a, SIZE, False),
                 "task_b": savedmodel.Endpoint(model_b, SIZE, True)}
    path = str(tmp_path / "bundle")
    savedmodel.write_savedmodel(path, endpoints)

    # The two networks share the stem and universal block 0 as the same variables.
    ids_a = {id(v) for v in model_a.weights}
    shared = [v for v in model_b.weights if id(v) in ids_a]
    assert len(shared) >= 4  # stem conv + bias, block 0's two convs' kernels...
    distinct = {id(v): v for v in model_a.weights + model_b.weights}
    stored = savedmodel.stored_variables(path)
    assert len(stored) == len(distinct)
    # Byte-level proof: every shared universal value is on disk exactly once.
    reader = tf.train.load_checkpoint(f"{path}/variables/variables")
    values = [reader.get_tensor(k) for k in stored]
    for variable in shared:
        copies = sum(v.shape == tuple(variable.shape) and np.array_equal(v, variable.numpy())
                     for v in values)
        assert copies == 1, variable.path

    # Both signatures work from the one file and match their Keras models.
    loaded = tf.saved_model.load(path)
    images = np.random.default_rng(2).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    for key, endpoint in endpoints.items():
        out = loaded.signatures[key](images=tf.constant(images))["logits"].numpy()
        expected = endpoint.model(savedmodel.preprocess(tf.constant(images), SIZE,
                                                        endpoint.crop)).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_separate_exports_store_the_universal_weights_twice(tasks, tmp_path):
    """The control for the test above: without a bundle, each file has its own copy."""
    (model_a, _), (model_b, _) = tasks[0]
    sizes = 0
    for name, model in (("a", model_a), ("b", model_b)):
        path = str(tmp_path / name)
        savedmodel.write_savedmodel(path, {savedmodel.SERVING_KEY:
                                           savedmodel.Endpoint(model, SIZE, False)})
        sizes += len(savedmodel.stored_variables(path))
    bundle = str(tmp_path / "bundle")
    savedmodel.write_savedmodel(bundle, {"a": savedmodel.Endpoint(model_a, SIZE, False),
                                         "b": savedmodel.Endpoint(model_b, SIZE, False)})
    assert len(savedmodel.stored_variables(bundle)) < sizes


def test_universal_layers_with_different_values_are_not_shared():
    """Per-task universal statistics (universal_bn='task') cannot be shared:
    the second task gets its own copy, recorded in `unshared`."""
    from nettailor_tf.model import backbones, static_graph
    from nettailor_tf.model.student_network import build_student

    backbone = backbones.build_backbone("tiny")
    universal = static_graph.UniversalLayers()
    first = static_graph.static_model(build_student(backbone, 3, PLAN_A, "frozen", SIZE),
                                      universal=universal)
    backbone.blocks[0].conv1.bn.moving_mean.assign(np.full(8, 0.5, np.float32))
    second = static_graph.static_model(build_student(backbone, 3, PLAN_A, "frozen", SIZE),
                                       universal=universal)
    assert universal.unshared == ["block0"]
    shared = {id(v) for v in first.weights} & {id(v) for v in second.weights}
    assert shared  # the stem and block 2 still are


def test_the_written_serving_functions_serve_the_keras_model_untraced_again(tasks, tmp_path,
                                                                             monkeypatch):
    """`write_savedmodel` returns the serving functions it traced: the Keras
    reference (`parity.keras_predictor`) runs them without tracing the
    network again, with the answers of a function of its own."""
    ((model_a, _), (model_b, _)), _ = tasks
    endpoints = {"task_a": savedmodel.Endpoint(model_a, SIZE, crop=False),
                 "task_b": savedmodel.Endpoint(model_b, SIZE, crop=True)}
    served = savedmodel.write_savedmodel(str(tmp_path / "sm"), endpoints)
    assert set(served) == set(endpoints)
    traces = []
    real_preprocess = savedmodel.preprocess
    monkeypatch.setattr(savedmodel, "preprocess",
                        lambda *args: traces.append(args) or real_preprocess(*args))
    images = np.random.default_rng(3).integers(0, 256, (5, 21, 19, 3), dtype=np.uint8)
    for key, endpoint in endpoints.items():
        reused = parity.keras_predictor(endpoint, served[key])(images)
        assert traces == [], key
        fresh = parity.keras_predictor(endpoint)(images)
        assert len(traces) == 1, key
        traces.clear()
        np.testing.assert_array_equal(reused, fresh)


def test_signature_key_is_a_valid_identifier():
    assert savedmodel.signature_key("visual_domain_decathlon/dtd") == "visual_domain_decathlon_dtd"
    assert savedmodel.signature_key("102flowers") == "task_102flowers"


def test_static_savedmodel_takes_one_image_at_the_models_size(tasks, tmp_path):
    """What the .tflite files are converted from: [1, S, S, 3] uint8, the same
    graph and the same named outputs."""
    ((model, _), _), _ = tasks
    endpoint = savedmodel.Endpoint(model, SIZE, crop=True)
    path = str(tmp_path / "static")
    savedmodel.write_savedmodel(path, {savedmodel.SERVING_KEY: endpoint}, static=True)
    signature = tf.saved_model.load(path).signatures[savedmodel.SERVING_KEY]
    spec = signature.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [1, SIZE, SIZE, 3] and spec.dtype == tf.uint8
    assert sorted(signature.structured_outputs) == list(savedmodel.OUTPUT_NAMES)
    image = np.random.default_rng(4).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    expected = model(savedmodel.preprocess(tf.constant(image), SIZE, True)).numpy()
    np.testing.assert_allclose(signature(images=tf.constant(image))["logits"].numpy(), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (40, 23), (7, 12)])
def test_fit_to_input_resizes_as_the_evaluation_pipeline(shape):
    images = np.random.default_rng(5).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    fitted = savedmodel.fit_to_input(images, SIZE, SIZE)
    assert fitted.dtype == np.uint8 and fitted.shape == (2, SIZE, SIZE, 3)
    for image, ours in zip(images, fitted):
        expected = data_lib.eval_transform(tf.constant(image), "none", SIZE).numpy()
        np.testing.assert_array_equal(ours, np.clip(np.round(expected), 0, 255))
    if shape == (SIZE, SIZE):
        assert np.array_equal(fitted, images)


def test_labels_files_hold_one_name_per_line(tmp_path):
    path = str(tmp_path / savedmodel.LABELS_FILE)
    savedmodel.write_labels(path, ["Ägypten", "b c", "7"])
    assert open(path, "rb").read() == "Ägypten\nb c\n7\n".encode()
    assert savedmodel.read_labels(path) == ["Ägypten", "b c", "7"]
    assert savedmodel.bundle_labels_file("visual_domain_decathlon_dtd") == \
        "labels_visual_domain_decathlon_dtd.txt"

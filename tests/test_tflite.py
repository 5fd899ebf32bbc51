"""TFLite variants of the serving graph, what the converter keeps shared in a
multi-signature bundle, and whether int8 reaches every signature."""
import gc

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from helpers import tiny_inverted_residual_backbone, tiny_static_models

from exporters import savedmodel, tflite
from nettailor_tf.model.student_network import BlockPlan, Plan

SIZE = 16
PLAN_A = Plan([BlockPlan(True, []), BlockPlan(False, [0]), BlockPlan(True, [1]),
               BlockPlan(False, [3, 2])])
PLAN_B = Plan([BlockPlan(True, [0]), BlockPlan(True, []), BlockPlan(False, [1]),
               BlockPlan(True, [3])])
RNG = np.random.default_rng(0)
CALIBRATION = [RNG.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    (a, _), (b, _) = tiny_static_models([PLAN_A, PLAN_B], image_size=SIZE)[0]
    root = tmp_path_factory.mktemp("tflite")
    endpoints = {"task_a": savedmodel.Endpoint(a, SIZE, False),
                 "task_b": savedmodel.Endpoint(b, SIZE, False)}
    paths = {}
    for key, endpoint in endpoints.items():
        paths[key] = str(root / key)
        savedmodel.write_savedmodel(paths[key], {savedmodel.SERVING_KEY: endpoint})
    paths["bundle"] = str(root / "bundle")
    savedmodel.write_savedmodel(paths["bundle"], endpoints)
    return endpoints, paths


def _run(content, key, images):
    interpreter = Interpreter(model_content=content)
    return interpreter.get_signature_runner(key)(images=images)


# The largest logit error allowed, as a fraction of the largest logit: about
# twice the worst of 30 random image batches on these models (measured 2e-7,
# 6e-4, 1.1e-3 and 0.034), so that a real change shows: full-integer int8
# instead of dynamic-range (0.02-0.03) breaks `dynamic`, calibrating on
# half-bright images (0.30-0.63) breaks `int8`.
@pytest.mark.parametrize("variant,tolerance", [("float32", 1e-5), ("float16", 0.002),
                                               ("dynamic", 0.003), ("int8", 0.07)])
def test_each_variant_converts_and_matches_keras(exported, variant, tolerance):
    endpoints, paths = exported
    content = tflite.convert(paths["task_a"], [savedmodel.SERVING_KEY], variant,
                             lambda: CALIBRATION)
    contents = tflite.inspect(content)
    types = contents.weight_types[savedmodel.SERVING_KEY]
    expected_type = {"float32": "FLOAT32", "float16": "FLOAT16", "dynamic": "INT8",
                     "int8": "INT8"}[variant]
    assert types.get(expected_type, 0) > 0, types
    if variant == "int8":
        assert tflite.float_weights(contents, savedmodel.SERVING_KEY) == 0, types
    images = RNG.integers(0, 256, (3, 23, 17, 3), dtype=np.uint8)  # any size, resized inside
    out = _run(content, savedmodel.SERVING_KEY, images)
    model = endpoints["task_a"].model
    expected = model(savedmodel.preprocess(tf.constant(images), SIZE, False)).numpy()
    scale = np.abs(expected).max()
    assert np.abs(out["logits"] - expected).max() <= tolerance * scale
    assert out["logits"].dtype == np.float32 and out["probabilities"].shape == (3, 5)


def test_variants_shrink_the_file(exported):
    _, paths = exported
    sizes = {v: len(tflite.convert(paths["task_a"], [savedmodel.SERVING_KEY], v,
                                   lambda: CALIBRATION))
             for v in tflite.VARIANTS if v != "mixed"}  # mixed: tests/test_mixed.py
    assert sizes["float16"] < sizes["float32"]
    assert sizes["dynamic"] < sizes["float16"] and sizes["int8"] < sizes["float16"]
    assert sizes["int4_weights"] < sizes["int8_weights"] < sizes["float16"]


def test_bundle_keeps_shared_universal_weights_once(exported):
    """The converter merges identical constant buffers: the universal layers
    both tasks use (stem, block 0) are stored once, so the bundle is smaller
    than the two separate files, and the shared buffers are the stem's and
    block 0's (their gate is kept off their convs, so no fusion makes the
    bytes differ per task)."""
    endpoints, paths = exported
    bundle = tflite.convert(paths["bundle"], list(endpoints), "float32")
    separate = [tflite.convert(paths[k], [savedmodel.SERVING_KEY], "float32") for k in endpoints]
    contents = tflite.inspect(bundle)
    assert set(contents.weight_types) == set(endpoints)
    # Stem conv (kernel + bias) and block 0's two convs (kernels + biases).
    assert contents.shared_buffers >= 6
    saved = sum(tflite.inspect(c).weight_bytes for c in separate) - contents.weight_bytes
    stem = endpoints["task_a"].model.layers[1]  # after the InputLayer
    assert stem.name.startswith("stem")
    shared_bytes = 4 * sum(int(np.prod(v.shape)) for v in stem.weights)
    assert saved >= shared_bytes
    assert len(bundle) < sum(len(c) for c in separate)
    images = RNG.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    for key, endpoint in endpoints.items():
        expected = endpoint.model(savedmodel.preprocess(tf.constant(images), SIZE, False))
        np.testing.assert_allclose(_run(bundle, key, images)["logits"], expected.numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_int8_bundle_quantises_every_signature(exported):
    """Calibrating every signature with the same images: both subgraphs are
    int8 and the universal int8 weights are still shared."""
    endpoints, paths = exported
    content = tflite.convert(paths["bundle"], list(endpoints), "int8", lambda: CALIBRATION)
    contents = tflite.inspect(content)
    for key in endpoints:
        assert tflite.float_weights(contents, key) == 0, contents.weight_types
    assert contents.shared_buffers >= 3  # at least the int8 kernels of the shared convs


def test_int8_calibrating_one_signature_leaves_the_other_float(exported):
    """The upstream behaviour (TensorFlow issue 52145) that `convert` avoids:
    samples for one signature only leave the other in float, silently."""
    endpoints, paths = exported
    converter = tf.lite.TFLiteConverter.from_saved_model(paths["bundle"],
                                                         signature_keys=list(endpoints))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (("task_a", {"images": c}) for c in CALIBRATION)
    contents = tflite.inspect(converter.convert())
    assert tflite.float_weights(contents, "task_a") == 0
    assert tflite.float_weights(contents, "task_b") > 0


@pytest.mark.parametrize("path,keys", [("task_a", [savedmodel.SERVING_KEY]),
                                       ("bundle", ["task_a", "task_b"])])
def test_one_converter_makes_every_variant_as_a_converter_of_its_own(exported, path, keys):
    """A `Converter` loads the SavedModel once for all its variants; each
    file is byte for byte what a fresh converter makes, in an order where a
    left-over option would show (float16's types in dynamic, int8's
    calibration in the weight-only and float32 files)."""
    _, paths = exported
    order = ["float16", "dynamic", "int8", "int8_weights", "float32"]
    converter = tflite.Converter(paths[path], keys)
    together = {v: converter.convert(v, lambda: CALIBRATION) for v in order}
    for variant in order:
        alone = tflite.convert(paths[path], keys, variant, lambda: CALIBRATION)
        assert together[variant] == alone, variant


def test_a_conversion_collects_only_the_objects_it_made(exported, monkeypatch):
    """The converter's own gc.collect() runs with the process's older objects
    frozen out of it (a full collection per conversion cost 0.4-1.6 s on the
    quickstart), and they are collectable again afterwards."""
    _, paths = exported
    frozen_at_collections = []
    real_collect = gc.collect

    def collect(*args):
        frozen_at_collections.append(gc.get_freeze_count())
        return real_collect(*args)

    monkeypatch.setattr(gc, "collect", collect)
    tflite.convert(paths["task_a"], [savedmodel.SERVING_KEY], "float32")
    assert frozen_at_collections and min(frozen_at_collections) > 10_000
    assert gc.get_freeze_count() == 0


def test_bad_variant_and_missing_calibration_are_refused(exported):
    _, paths = exported
    with pytest.raises(ValueError, match="accepted: float32, float16, dynamic, int8"):
        tflite.convert(paths["task_a"], [savedmodel.SERVING_KEY], "int4")
    with pytest.raises(ValueError, match="calibration"):
        tflite.convert(paths["task_a"], [savedmodel.SERVING_KEY], "int8")


def test_static_files_take_one_uint8_image_and_list_logits_first(exported):
    """Every variant of a file converted from the static SavedModel: input
    `images` uint8 [1, S, S, 3] with no dynamic dimension; output index 0 is
    `logits`, index 1 `probabilities`; int8 calibration feeds single images."""
    endpoints, _ = exported
    with tflite.static_savedmodel(endpoints) as path:
        contents = {v: tflite.convert(path, list(endpoints), v, lambda: CALIBRATION)
                    for v in tflite.VARIANTS if v != "mixed"}  # per task: test_mixed.py
    image = RNG.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    for variant, content in contents.items():
        interpreter = Interpreter(model_content=content)
        assert list(interpreter.get_signature_list()) == ["task_a", "task_b"]
        for key, endpoint in endpoints.items():
            runner = interpreter.get_signature_runner(key)
            details = runner.get_input_details()["images"]
            assert details["dtype"] == np.uint8, variant
            assert details["shape_signature"].tolist() == [1, SIZE, SIZE, 3], variant
            outputs = runner.get_output_details()
            assert [outputs[n]["name"][-2:] for n in savedmodel.OUTPUT_NAMES] == [":0", ":1"]
            if variant == "float32":
                expected = endpoint.model(savedmodel.preprocess(tf.constant(image), SIZE, False))
                np.testing.assert_allclose(runner(images=image)["logits"], expected.numpy(),
                                           rtol=1e-4, atol=1e-4)
        first = interpreter.get_signature_runner("task_a").get_output_details()
        assert [d["index"] for d in interpreter.get_output_details()] == [
            first["logits"]["index"], first["probabilities"]["index"]]
    int8 = tflite.inspect(contents["int8"])
    assert all(tflite.float_weights(int8, key) == 0 for key in endpoints)


def test_weight_only_quantisation_keeps_the_log_quiet(exported, capfd, caplog):
    """ai-edge-quantizer's progress bar and its "Serializing model..." line
    stay out of the run's log."""
    from nettailor_tf.common import quiet

    _, paths = exported
    float_content = tflite.convert(paths["task_a"], [savedmodel.SERVING_KEY], "float32")
    quiet.quiet_python_loggers()
    capfd.readouterr()
    with caplog.at_level("INFO"):
        smaller = tflite.quantize_weights(float_content, 4)
    assert len(smaller) < len(float_content)
    assert capfd.readouterr().err == ""
    assert not [r for r in caplog.records if "ai_edge_quantizer" in r.pathname]


@pytest.mark.parametrize("variant", ["int8_weights", "int4_weights"])
def test_weight_only_bundle_keeps_the_universal_weights_shared(exported, variant):
    """ai-edge-quantizer quantises a buffer two signatures share once (it
    would duplicate it if they asked for different parameters): the
    quantised universal kernels stay stored once, and each signature still
    computes what its Keras model does, within the rounding."""
    endpoints, paths = exported
    float_content = tflite.convert(paths["bundle"], list(endpoints), "float32")
    content = tflite.convert(paths["bundle"], list(endpoints), variant,
                             float_content=float_content)
    contents, float_contents = tflite.inspect(content), tflite.inspect(float_content)
    assert contents.shared_buffers >= 3  # the stem's and block 0's kernels at least
    assert contents.weight_bytes < float_contents.weight_bytes
    for key in endpoints:
        assert contents.weight_types[key].get("INT4" if variant == "int4_weights" else "INT8")
    images = RNG.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    for key, endpoint in endpoints.items():
        expected = endpoint.model(savedmodel.preprocess(tf.constant(images), SIZE, False)).numpy()
        error = np.abs(_run(content, key, images)["logits"] - expected).max()
        # Worst of 30 batches: 0.033 (int8) and 0.18 (int4) of the largest logit.
        assert error <= (0.05 if variant == "int8_weights" else 0.4) * np.abs(expected).max()


# --- gate scales between universal convolutions --------------------------------------

# Over the inverted-residual backbone (no activation after a block): task a
# scales block 1's and block 3's outputs (read by block 2 and by the shared
# head), task b block 0's; both run the stem, block 0, block 3 and the head.
IR_PLAN_A = Plan([BlockPlan(True, []), BlockPlan(True, [1]), BlockPlan(True, []),
                  BlockPlan(True, [2])])
IR_PLAN_B = Plan([BlockPlan(True, [0]), BlockPlan(True, []), BlockPlan(False, [1]),
                  BlockPlan(True, [])])
# stem/conv, block0/{depthwise,project}, block3/{expand,depthwise,project}, head/conv
IR_SHARED_OPS = 7


# Two channels of the head's convolution (universal, read by each task's
# classifier) switched off the way a trained network's batch norm does it
# (EfficientNet-Lite0's blocks 12-15 have a few): weights near zero, so ReLU6
# outputs the bias: 0 for bias -1.5, a constant 1.0 for bias 1.0.  Their
# int32 biases would overflow at the weights' own int8 scales, and the
# converter enlarges the scales by each signature's input scale: weights
# of 1e-6 and 1e-7 make it copy the kernel per task, 1e-5 (no enlargement)
# and 1e-8 (int8 weights all 0) not.
DEAD_CHANNEL_WEIGHT = 3e-7
DEAD_CHANNEL_BIAS = {0: -1.5, 1: 1.0}


def _switch_off_channels(models):
    head = next(layer for layer in models[0][0].layers if layer.name == "head")
    conv = head.layers[0].conv  # folded: batch norm's scale in the kernel, its shift the bias
    kernel, bias = conv.kernel.numpy(), conv.bias.numpy()
    for channel, value in DEAD_CHANNEL_BIAS.items():
        kernel[..., channel] *= DEAD_CHANNEL_WEIGHT / np.abs(kernel[..., channel]).max()
        bias[channel] = value
    conv.kernel.assign(kernel)
    conv.bias.assign(bias)


def _ir_bundle(root):
    models, _ = tiny_static_models([IR_PLAN_A, IR_PLAN_B], image_size=SIZE,
                                   backbone=tiny_inverted_residual_backbone())
    _switch_off_channels(models)
    endpoints = {f"task_{n}": savedmodel.Endpoint(model, SIZE, False)
                 for n, (model, _) in zip("ab", models)}
    scales = [layer.value for model, _ in models for layer in model.layers
              if layer.name.startswith("gate")]
    assert len(scales) == 3 and all(0 < s < 0.99 for s in scales), scales
    savedmodel.write_savedmodel(str(root), endpoints, static=True)
    return endpoints, str(root)


@pytest.fixture(scope="module")
def ir_bundle(tmp_path_factory):
    return _ir_bundle(tmp_path_factory.mktemp("ir_bundle"))


@pytest.mark.parametrize("variant", ["float32", "float16", "dynamic", "int8"])
def test_each_shared_universal_layer_is_one_buffer_in_every_variant(ir_bundle, variant):
    """The universal layers both signatures run read the same buffers in both
    (an int8 file's int32 biases aside: their scale follows each task's
    activations), although a gate scale sits right before block 3's expand
    convolution and the head's (the converter would fold a multiply there
    into the shared weights), and the head has switched-off channels (whose
    int8 weights the converter scales by each task's input).  The file
    still computes each task's network."""
    endpoints, path = ir_bundle
    content = tflite.convert(path, list(endpoints), variant, lambda: CALIBRATION)
    found = tflite.sharing(content)
    assert found.copies == [] and found.universal_ops == IR_SHARED_OPS, found
    assert found.shared_bytes > 0 and set(found.task_bytes) == set(endpoints)
    own = found.universal_task_bytes
    assert all((own[key] > 0) == (variant == "int8") for key in endpoints), own
    if variant == "float32":
        images = RNG.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
        for key, endpoint in endpoints.items():
            expected = endpoint.model(savedmodel.preprocess(tf.constant(images), SIZE, False))
            got = np.concatenate([_run(content, key, image[None])["logits"] for image in images])
            np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_int8_bias_overflow_rule_copies_a_near_dead_channel_unless_shared(ir_bundle,
                                                                       monkeypatch):
    """Why `share_int8_kernels` exists: the converter alone stores the head's
    kernel per task (the switched-off channels' int8 weights follow
    each signature's input scale), and after it the file is one kernel and
    computes what the converter's file does (the constant channel: only if
    each signature's bias is requantised to the shared kernel's scale)."""
    endpoints, path = ir_bundle
    with monkeypatch.context() as patched:
        patched.setattr(tflite, "share_int8_kernels", lambda content: content)
        converted = tflite.convert(path, list(endpoints), "int8", lambda: CALIBRATION)
    assert tflite.sharing(converted).copies == ["head/conv"]
    shared = tflite.share_int8_kernels(converted)
    assert tflite.sharing(shared).copies == [] and len(shared) < len(converted)
    images = RNG.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    for key in endpoints:
        for image in images:
            np.testing.assert_array_equal(_run(shared, key, image[None])["logits"],
                                          _run(converted, key, image[None])["logits"])


def test_a_gate_as_a_plain_multiply_is_folded_into_the_shared_head(tmp_path, monkeypatch):
    """Why `static_graph.Scale` is a depthwise convolution: as a constant multiply,
    task a's gate before the head is folded into the head's convolution,
    and `sharing` names the copy."""
    from nettailor_tf.model import static_graph

    class MultiplyScale(static_graph.Scale):
        def call(self, x):
            return x * self.value

    monkeypatch.setattr(static_graph, "Scale", MultiplyScale)
    endpoints, path = _ir_bundle(tmp_path)
    found = tflite.sharing(tflite.convert(path, list(endpoints), "float32"))
    assert "head/conv" in found.copies, found

"""The mixed variant: per-layer int4 sensitivity measured in place, the
fewest layers kept out of int4 within an accuracy budget, and the file
ai-edge-quantizer makes from that choice."""
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from helpers import tiny_static_models

from exporters import mixed, savedmodel, tflite
from nettailor_tf.model.student_network import BlockPlan, Plan

SIZE = 16
PLAN = Plan([BlockPlan(True, [0]), BlockPlan(True, [0]), BlockPlan(True, [1]),
             BlockPlan(False, [3, 2])])
RNG = np.random.default_rng(1)
IMAGES = RNG.integers(0, 256, (96, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def network():
    """A tiny static network, its float32 file, and labels it gets right."""
    (model, _), = tiny_static_models([PLAN], num_classes=(6,), image_size=SIZE)[0]
    endpoint = savedmodel.Endpoint(model, SIZE, False)
    with tflite.static_savedmodel({savedmodel.SERVING_KEY: endpoint}) as folder:
        content = tflite.convert(folder, [savedmodel.SERVING_KEY], "float32")
    labels = np.argmax(mixed.logits(content, IMAGES), 1)
    return model, content, labels


def _weight_types(content):
    """{op scope: type of its stored weights} for every op with weights; a
    weight-only op reads its float weights from a DEQUANTIZE of them."""
    from ai_edge_litert import schema_py_generated as schema

    subgraph = schema.ModelT.InitFromPackedBuf(bytearray(content), 0).subgraphs[0]
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    producer = {o: op for op in subgraph.operators for o in op.outputs}
    types = {}
    for op in subgraph.operators:
        if len(op.inputs) < 2:
            continue
        weight = op.inputs[1]
        if weight in producer:
            weight = producer[weight].inputs[0]
        scope = ";".join(subgraph.tensors[i].name.decode() for i in op.outputs)
        types[scope] = names[subgraph.tensors[weight].type]
    return types


def test_weight_ops_are_the_convolutions_and_the_classifier(network):
    model, content, _ = network
    ops = mixed.weight_ops(content)
    kinds = [op.kind for op in ops]
    assert kinds.count("FULLY_CONNECTED") == 1
    kernels = [w for w in model.weights if w.name in ("kernel", "depthwise_kernel")]
    assert len(ops) == len(kernels)
    assert all(op.scope and op.shape for op in ops)
    assert len({op.scope for op in ops}) == len(ops)


def test_rounding_to_int4_leaves_16_levels_per_channel_and_only_the_op_chosen(network):
    _, content, _ = network
    ops = mixed.weight_ops(content)
    weights = RNG.normal(size=(8, 3, 3, 5)).astype(np.float32)
    rounded = mixed.fake_quantize(weights, 0, 4)
    for channel, original in zip(rounded, weights):
        assert len(np.unique(channel)) <= 16
        step = np.abs(original).max() / 7
        assert np.abs(channel - original).max() <= step / 2 + 1e-6
    patched = mixed.with_rounded_weights(content, ops[:1])
    assert len(patched) == len(content) and patched != content
    changed = [i for i, (a, b) in enumerate(zip(patched, content)) if a != b]
    # Every changed byte lies in the one weight buffer that was rounded.
    assert mixed.with_rounded_weights(patched, ops[:1]) == patched  # rounding is idempotent
    assert len(changed) <= 4 * int(np.prod(ops[0].shape))


def test_sensitivity_is_zero_for_nothing_and_grows_with_coarser_rounding(network):
    _, content, _ = network
    ops = mixed.weight_ops(content)
    scores = mixed.sensitivities(content, ops, IMAGES[:16])
    assert len(scores) == len(ops) and all(s >= 0 for s in scores)
    assert max(scores) > 0
    eight = mixed.with_rounded_weights(content, ops, 8)
    four = mixed.with_rounded_weights(content, ops, 4)
    reference = mixed.logits(content, IMAGES[:16])
    assert (np.abs(mixed.logits(eight, IMAGES[:16]) - reference).mean()
            < np.abs(mixed.logits(four, IMAGES[:16]) - reference).mean())


@pytest.mark.parametrize("kept_bits, kept_type", [(8, "INT8"), (None, "FLOAT32")])
def test_the_quantiser_keeps_the_chosen_layers_out_of_int4(network, kept_bits, kept_type):
    _, content, _ = network
    ops = mixed.weight_ops(content)
    quantized = mixed.quantize(content, ops[:2], kept_bits)
    types = _weight_types(quantized)
    for op in ops:
        assert types[op.scope] == (kept_type if op in ops[:2] else "INT4"), (op.scope, types)


@pytest.mark.parametrize("budget", [0.0, 0.05, 1.0])
def test_the_mixed_file_meets_its_budget_with_the_fewest_layers(network, budget):
    model, content, labels = network
    choice = mixed.choose_mixed(content, IMAGES, labels, budget)
    assert choice.float_accuracy == 1.0  # the labels are its own answers
    reached = np.mean(np.argmax(mixed.logits(choice.content, IMAGES), 1) == labels)
    assert reached == pytest.approx(choice.accuracy)
    # A budget under one image is held to one image.
    assert choice.budget == max(budget, 1 / len(IMAGES))
    assert choice.accuracy >= 1.0 - choice.budget and choice.summary()["met_budget"]
    if budget == 1.0:  # anything goes: all int4, which costs this network 9 of 96 images
        assert choice.kept_layers == []
        types = _weight_types(choice.content)
        assert {types[op.scope] for op in mixed.weight_ops(content)} == {"INT4"}
        assert choice.all_int4_accuracy < 1.0
        # The quantiser's file scores what the search's own int4 rounding
        # predicted (measured: the same 87 of 96), within two images.
        assert choice.accuracy == pytest.approx(choice.all_int4_accuracy, abs=2 / len(IMAGES))
    summary = choice.summary()
    assert summary["kept_layers"] == len(choice.kept_layers) <= summary["layers"]
    assert summary["kept_as"] == "int8"
    # Parity with the Keras network: the file agrees with Keras as often as it
    # agrees with the float32 file (measured: exactly), within one image.
    keras_logits = model(savedmodel.preprocess(tf.constant(IMAGES), SIZE, False)).numpy()
    agreement = np.mean(np.argmax(keras_logits, 1) == np.argmax(
        mixed.logits(choice.content, IMAGES), 1))
    assert agreement == pytest.approx(choice.accuracy, abs=1 / len(IMAGES))
    # The calling convention of every variant: one uint8 image, logits first.
    runner = Interpreter(model_content=choice.content).get_signature_runner()
    image = runner.get_input_details()[savedmodel.INPUT_NAME]
    assert image["dtype"] == np.uint8 and list(image["shape"]) == [1, SIZE, SIZE, 3]
    assert list(runner.get_output_details()) == ["logits", "probabilities"]


def test_a_budget_even_int8_misses_keeps_every_layer_without_ranking_them(network, monkeypatch):
    model, content, labels = network
    # Every layer in int8 as well as in int4 made useless: no layer can go to
    # int4, so the per-layer sensitivities are not worth measuring.
    real_fake_quantize = mixed.fake_quantize
    monkeypatch.setattr(mixed, "fake_quantize",
                        lambda weights, axis, bits=4: np.zeros_like(weights))

    def not_needed(*args, **kwargs):
        raise AssertionError("sensitivities measured though int8 already misses the budget")

    monkeypatch.setattr(mixed, "sensitivities", not_needed)
    choice = mixed.choose_mixed(content, IMAGES, labels, 0.0)
    assert choice.kept_layers == [op.scope for op in mixed.weight_ops(content)]
    assert choice.all_int4_accuracy < 1.0 - choice.budget
    # The file itself comes from the real quantiser (int8 for every layer).
    monkeypatch.setattr(mixed, "fake_quantize", real_fake_quantize)
    assert "INT4" not in set(_weight_types(choice.content).values())

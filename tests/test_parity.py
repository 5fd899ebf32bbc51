"""Parity runs: raw test images through every predictor, agreement and accuracy."""
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_static_models

from exporters import parity, savedmodel, tflite
from nettailor_tf.model.student_network import BlockPlan, Plan

SIZE = 16
PLAN = Plan([BlockPlan(True, [0]), BlockPlan(True, []), BlockPlan(False, [1]),
             BlockPlan(True, [3])])


def _dataset(shapes, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    labels = list(rng.integers(0, 5, len(shapes)))
    if len({s for s in shapes}) == 1:
        return tf.data.Dataset.from_tensor_slices((np.stack(images), np.array(labels)))
    return tf.data.Dataset.from_generator(
        lambda: zip(images, labels),
        output_signature=(tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int64)))


def test_raw_batches_batch_equal_sizes_and_pass_varying_sizes_one_by_one():
    same = list(parity.raw_test_batches(_dataset([(12, 12, 3)] * 10), batch_size=4))
    assert [len(b[0]) for b in same] == [4, 4, 2]
    assert same[0][0].dtype == np.uint8
    varying = list(parity.raw_test_batches(_dataset([(12, 12, 3), (20, 9, 3), (7, 7, 3)])))
    assert [b[0].shape for b in varying] == [(1, 12, 12, 3), (1, 20, 9, 3), (1, 7, 7, 3)]
    assert len(list(parity.raw_test_batches(_dataset([(12, 12, 3)] * 10), 4, max_images=5))) == 2


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    (model, _), = tiny_static_models([PLAN], num_classes=(5,), image_size=SIZE)[0]
    endpoint = savedmodel.Endpoint(model, SIZE, crop=True)
    root = tmp_path_factory.mktemp("parity")
    savedmodel.write_savedmodel(str(root / "sm"), {savedmodel.SERVING_KEY: endpoint})
    path = str(root / "float32.tflite")
    with open(path, "wb") as f:
        f.write(tflite.convert(str(root / "sm"), [savedmodel.SERVING_KEY], "float32"))
    return endpoint, str(root / "sm"), path


def test_exported_artefacts_agree_with_keras_on_images_of_any_size(artefacts):
    endpoint, sm_path, tflite_path = artefacts
    data = _dataset([(12, 12, 3), (30, 19, 3), (16, 16, 3), (5, 40, 3)] * 3, seed=3)
    outcome = parity.run_all(
        {"keras": parity.keras_predictor(endpoint),
         "savedmodel": parity.savedmodel_predictor(sm_path),
         "tflite": parity.tflite_predictor(tflite_path, num_threads=1)},
        lambda: parity.raw_test_batches(data))
    assert len(outcome.labels) == 12
    assert outcome.agreement("savedmodel", "keras") == 1.0
    assert outcome.agreement("tflite", "keras") == 1.0
    assert outcome.accuracy("tflite") == outcome.accuracy("keras")


def test_predictors_run_side_by_side_give_the_same_answers_in_order(artefacts):
    """workers=2 runs a batch's LiteRT predictors in two threads beside the
    TensorFlow ones: every answer must still land at its own predictor and
    image, as one at a time."""
    endpoint, sm_path, tflite_path = artefacts
    data = _dataset([(SIZE, SIZE, 3)] * 40, seed=5)

    def shifted(x):  # answers that differ per image: a mix-up shows
        return np.roll(np.eye(5)[x[:, 0, 0, 0] % 5], 1, axis=-1)

    shifted.runs_alongside = True
    outcomes = []
    for workers in (1, 2):
        predictors = {"keras": parity.keras_predictor(endpoint),
                      "savedmodel": parity.savedmodel_predictor(sm_path),
                      **{f"tflite{i}": parity.tflite_predictor(tflite_path, num_threads=1)
                         for i in range(3)},
                      "shifted": shifted}
        outcomes.append(parity.run_all(
            predictors, lambda: parity.raw_test_batches(data, batch_size=8), workers=workers))
    one, two = outcomes
    np.testing.assert_array_equal(one.labels, two.labels)
    assert one.top1.keys() == two.top1.keys()
    for name in one.top1:
        np.testing.assert_array_equal(one.top1[name], two.top1[name])
    pixels = np.concatenate([b for b, _ in parity.raw_test_batches(data)])[:, 0, 0, 0]
    np.testing.assert_array_equal(two.top1["shifted"], (pixels % 5 + 1) % 5)


def test_agreement_and_accuracy_arithmetic():
    outcome = parity.Outcome(labels=np.array([0, 1, 2, 3]),
                             top1={"a": np.array([0, 1, 2, 0]), "b": np.array([0, 1, 0, 0])})
    assert outcome.accuracy("a") == 0.75 and outcome.accuracy("b") == 0.5
    assert outcome.agreement("b", "a") == 0.75


def test_low_agreement_fails_with_the_figures():
    parity.check_agreement("x", 0.996, 0.995)
    with pytest.raises(parity.ParityError, match=r"0\.9900, below the required 0\.9950"):
        parity.check_agreement("mnist5k: nettailor_float32.tflite", 0.99, 0.995)


def test_an_empty_test_split_is_an_error():
    with pytest.raises(parity.ParityError, match="empty"):
        parity.run_all({"k": lambda x: x}, lambda: iter(()))


def test_a_static_file_gets_images_resized_on_the_host(artefacts, tmp_path):
    """A .tflite file with a static input takes images of any size through
    `tflite_predictor` (resized to S x S first, fed one at a time), and agrees
    with the Keras model fed the same resized images."""
    endpoint, _, dynamic_path = artefacts
    path = str(tmp_path / "static.tflite")
    with tflite.static_savedmodel({savedmodel.SERVING_KEY: endpoint}) as sm_path:
        with open(path, "wb") as f:
            f.write(tflite.convert(sm_path, [savedmodel.SERVING_KEY], "float32"))
    from ai_edge_litert.interpreter import Interpreter

    def shape(file):
        runner = Interpreter(model_path=file).get_signature_runner(savedmodel.SERVING_KEY)
        return parity.static_input_shape(runner)

    assert shape(path) == (1, SIZE, SIZE, 3) and shape(dynamic_path) is None
    data = _dataset([(12, 12, 3), (30, 19, 3), (16, 16, 3), (5, 40, 3)] * 2 + [(24, 24, 3)] * 3,
                    seed=4)
    keras_predict = parity.keras_predictor(endpoint)
    outcome = parity.run_all(
        {"keras_resized": parity.resized(keras_predict, SIZE),
         "static": parity.tflite_predictor(path, num_threads=1)},
        lambda: parity.raw_test_batches(data))
    assert len(outcome.labels) == 11
    assert outcome.agreement("static", "keras_resized") == 1.0
    batch = np.random.default_rng(6).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    np.testing.assert_allclose(parity.tflite_predictor(path)(batch),
                               parity.resized(keras_predict, SIZE)(batch), rtol=1e-4, atol=1e-4)

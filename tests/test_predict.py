"""`python -m nettailor_tf.predict` on a small export built here: one JSON line
per image, labels from the file next to the model, the same answer as the
Keras network, and every bad input as one line and exit code 2.

The same command on the files of a real export stage (a task's files, the
bundle, all tasks and one) is tested in test_stages_deploy.py, which trains
them once."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_static_models
from PIL import Image

from exporters import parity, savedmodel, tflite
from nettailor_tf import inference, predict
from nettailor_tf.model.student_network import BlockPlan, Plan

SIZE = 16
KEY = savedmodel.SERVING_KEY
PLAN = Plan([BlockPlan(True, [0]), BlockPlan(True, []), BlockPlan(False, [1]),
             BlockPlan(True, [3])])
LABELS = ["cat", "dog", "fox", "owl", "yak"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A task's export folder as the export stage lays it out (a crop task,
    so that the graph's own resize and crop are exercised)."""
    (model, _), = tiny_static_models([PLAN], num_classes=(5,), image_size=SIZE)[0]
    endpoint = savedmodel.Endpoint(model, SIZE, crop=True)
    root = tmp_path_factory.mktemp("export")
    savedmodel.write_savedmodel(str(root / "nettailor_savedmodel"), {KEY: endpoint})
    with tflite.static_savedmodel({KEY: endpoint}) as path:
        (root / "nettailor_float32.tflite").write_bytes(tflite.convert(path, [KEY], "float32"))
    savedmodel.write_labels(str(root / "labels.txt"), LABELS)
    (root / "export.json").write_text(json.dumps({"task": "animals"}))
    return endpoint, root


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three formats and modes: RGB PNG at the model's size, a larger
    grayscale JPEG, a smaller RGBA PNG."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    files = {"exact.png": (rng.integers(0, 256, (SIZE, SIZE, 3)), "RGB"),
             "big.jpg": (rng.integers(0, 256, (45, 31)), "L"),
             "small.png": (rng.integers(0, 256, (9, 12, 4)), "RGBA")}
    for name, (pixels, mode) in files.items():
        Image.fromarray(pixels.astype(np.uint8), mode).save(root / name)
    return [str(root / name) for name in files]


def _run(capsys, *args):
    capsys.readouterr()
    code = predict.main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _keras_top(endpoint, picture, resized):
    image = np.asarray(Image.open(picture).convert("RGB"))[None]
    predictor = parity.keras_predictor(endpoint)
    if resized:
        predictor = parity.resized(predictor, SIZE)
    logits = predictor(image)[0]
    probabilities = np.exp(logits - logits.max())
    return probabilities / probabilities.sum()


@pytest.mark.parametrize("model,resized", [("nettailor_float32.tflite", True),
                                           ("nettailor_savedmodel", False)])
def test_one_json_line_per_image_with_the_keras_answer(export, pictures, capsys, model,
                                                       resized):
    endpoint, root = export
    code, out, err = _run(capsys, f"--model={root / model}",
                          *(f"--image={p}" for p in pictures), "--top_k=3")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == pictures
    for line in lines:
        assert list(line) == ["image", "tasks", "latency_ms", "peak_memory_mb"]
        assert list(line["tasks"]) == ["animals"]  # the task name from export.json
        top = line["tasks"]["animals"]["top"]
        expected = _keras_top(endpoint, line["image"], resized)
        order = np.argsort(-expected)[:3]
        assert [t["label"] for t in top] == [LABELS[i] for i in order]
        np.testing.assert_allclose([t["probability"] for t in top], expected[order], atol=1e-4)
        assert line["latency_ms"] > 0 and line["peak_memory_mb"] > 50


def test_the_static_file_gets_the_picture_resized_once(export, pictures):
    """The .tflite file is fed the picture resized to S x S on the host (as
    the parity check feeds it), the SavedModel the picture as it is."""
    _, root = export
    model = inference.load_model(str(root / "nettailor_float32.tflite"))
    signature, = inference.select(model, None)
    assert signature.input_size == (SIZE, SIZE) and signature.labels == LABELS
    image = inference.load_image(pictures[1])
    assert image.shape == (45, 31, 3) and image.dtype == np.uint8
    fed = inference.model_input(image, signature)
    assert fed.shape == (1, SIZE, SIZE, 3)
    expected = parity.tflite_predictor(str(root / "nettailor_float32.tflite"))(image[None])
    assert np.argmax(signature.run(fed)) == np.argmax(expected)
    served, = inference.select(inference.load_model(str(root / "nettailor_savedmodel")), "animals")
    assert served.input_size is None
    assert inference.model_input(image, served).shape == (1, 45, 31, 3)


def test_top_k_beyond_the_classes_lists_them_all_and_a_task_is_picked_by_key(export, pictures,
                                                                            capsys):
    _, root = export
    code, out, _ = _run(capsys, f"--model={root / 'nettailor_float32.tflite'}",
                        f"--image={pictures[0]}", "--top_k=9", f"--task={KEY}")
    assert code == 0
    top = json.loads(out)["tasks"]["animals"]["top"]
    assert sorted(t["label"] for t in top) == LABELS
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)


def test_without_labels_the_classes_are_numbered_with_a_warning(export, pictures, capsys,
                                                                tmp_path):
    _, root = export
    shutil.copy(root / "nettailor_float32.tflite", tmp_path / "model.tflite")
    code, out, err = _run(capsys, f"--model={tmp_path / 'model.tflite'}",
                          f"--image={pictures[0]}", "--top_k=5")
    assert code == 0
    answer = json.loads(out)["tasks"]
    assert list(answer) == [KEY]  # no export.json: the signature key
    assert sorted(t["label"] for t in answer[KEY]["top"]) == [f"class_{i}" for i in range(5)]
    assert "warning: no labels_serving_default.txt or labels.txt next to the model" in err


def _bad_inputs(root, pictures, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"\0" * 64)
    short_labels = tmp_path / "short"
    short_labels.mkdir()
    shutil.copy(root / "nettailor_float32.tflite", short_labels / "m.tflite")
    (short_labels / "labels.txt").write_text("cat\ndog\n")
    model, image = f"--model={root / 'nettailor_float32.tflite'}", f"--image={pictures[0]}"
    return [
        ([f"--model={tmp_path / 'missing.tflite'}", image], "missing.tflite: no such file"),
        ([f"--model={tmp_path}", image], "not a SavedModel folder"),
        ([f"--model={text}", image], "not a SavedModel folder"),
        ([f"--model={broken}", image], "LiteRT cannot load it"),
        ([model, f"--image={text}"], "not an image PIL can read"),
        ([model, f"--image={tmp_path / 'gone.png'}"], "gone.png: no such file"),
        ([model, image, "--task=birds"], "--task=birds: "),
        ([model, image, "--top_k=0"], "--top_k=0: "),
        ([model, image, "--colour=red"], "colour"),
        ([model, image, "extra"], "unexpected arguments extra"),
        ([model], "--image is required"),
        ([image], "--model is required"),
        ([f"--model={short_labels / 'm.tflite'}", image], "has 2 class names, the model 5"),
    ]


def test_bad_inputs_are_one_line_and_exit_code_2(export, pictures, capsys, tmp_path):
    _, root = export
    for args, message in _bad_inputs(root, pictures, tmp_path):
        code, out, err = _run(capsys, *args)
        assert code == 2, (args, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nettailor_tf.predict: error: "), err
        assert message in lines[0], (message, lines[0])


def test_the_command_line_exits_2_with_one_line(pictures, tmp_path):
    """The real entry point (a bad model is named before TensorFlow loads)."""
    run = subprocess.run([sys.executable, "-m", "nettailor_tf.predict",
                          f"--model={tmp_path / 'nope'}", f"--image={pictures[0]}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == f"nettailor_tf.predict: error: --model={tmp_path / 'nope'}: " \
                                 "no such file or folder"

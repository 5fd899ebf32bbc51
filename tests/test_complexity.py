"""Analytic multiply-adds against hand counts and published figures."""
import pytest

from nettailor_tf import backbones, complexity


def test_tiny_flops_by_hand():
    backbone = backbones.build_backbone("tiny")
    parts = complexity.backbone_flops(backbone, 32)
    # Stem: 3x3 conv 3->8, stride 2 -> 16x16 outputs.
    assert parts["stem"] == 16 * 16 * 9 * 3 * 8
    same_8 = 16 * 16 * 9 * 8 * 8          # 3x3 conv 8->8 at 16x16
    assert parts["blocks"][:2] == [2 * same_8, 2 * same_8]
    # Block 2 halves the size: conv1 8->16 and the 1x1 shortcut at 8x8, conv2 16->16.
    assert parts["blocks"][2] == 8 * 8 * (9 * 8 * 16 + 9 * 16 * 16 + 8 * 16)
    assert parts["blocks"][3] == 2 * 8 * 8 * 9 * 16 * 16
    assert parts["head"] == 0  # global average pooling only
    assert complexity.classifier_flops(backbone, 32, 10) == (
        parts["stem"] + sum(parts["blocks"]) + 16 * 10)


def test_resnet34_matches_the_paper():
    # NetTailor Table 1: the ResNet-34 teacher has 21.28M parameters without
    # the classifier and about 3.6 G multiply-adds at 224 px.
    backbone = backbones.build_backbone("resnet34")
    flops = complexity.classifier_flops(backbone, 224, 1000)
    assert 3.55e9 < flops < 3.7e9
    assert round(backbones.count_params(backbone.layers) / 1e6, 2) == 21.28


@pytest.mark.parametrize("size,millions", [(64, 32.6), (96, 71.8), (224, 385.2)])
def test_efficientnet_lite0_flops(size, millions):
    backbone = backbones.build_backbone("efficientnet_lite0")
    flops = complexity.classifier_flops(backbone, size, 1000)
    assert abs(flops / 1e6 - millions) < 0.1


def test_blocks_dominate_efficientnet():
    parts = complexity.backbone_flops(backbones.build_backbone("efficientnet_lite0"), 224)
    total = parts["stem"] + sum(parts["blocks"]) + parts["head"] + 1280 * 1000
    assert 0.88 < sum(parts["blocks"]) / total < 0.92
    assert max(parts["blocks"]) / total < 0.086  # SPEC.md: "no block above 8.5%"

"""Analytic multiply-adds against hand counts and published figures."""
import pytest

from nettailor_tf.model import backbones, complexity


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
    assert max(parts["blocks"]) / total < 0.086  # the paper: "no block above 8.5%"


# --- NetTailor: branch costs and the expected complexity C (the paper) ------------

def test_tiny_branch_flops_by_hand():
    """Universal branches cost their block; a proxy H_out * W_out * C_in * C_out."""
    from nettailor_tf.model.student_network import Plan

    backbone = backbones.build_backbone("tiny")
    blocks = complexity.backbone_flops(backbone, 32)["blocks"]
    # At 32 px nodes 0..2 are 16x16x8, nodes 3..4 8x8x16; the max-pool costs nothing.
    costs = complexity.branch_flops(backbone, Plan.full(4, 3), 32)
    assert costs == [
        [blocks[0], 16 * 16 * 8 * 8],
        [blocks[1], 16 * 16 * 8 * 8, 16 * 16 * 8 * 8],
        [blocks[2], 8 * 8 * 8 * 16, 8 * 8 * 8 * 16, 8 * 8 * 8 * 16],
        [blocks[3], 8 * 8 * 16 * 16, 8 * 8 * 8 * 16, 8 * 8 * 8 * 16],
    ]
    assert complexity.universal_network_flops(backbone, 32) == 16 * 16 * 9 * 3 * 8 + sum(blocks)


def test_bottleneck_proxy_flops_by_hand():
    """ResNet-50 proxies: H * W * (C_in * hidden + hidden * C_out), hidden = max(C_out / 32, 16)."""
    from nettailor_tf.model.student_network import Plan

    backbone = backbones.build_backbone("resnet50")
    costs = complexity.branch_flops(backbone, Plan.full(16, 1), 224)
    assert costs[0][1] == 56 * 56 * (64 * 16 + 16 * 256)       # node 0: 56x56x64 -> 256
    assert costs[15][1] == 7 * 7 * (2048 * 64 + 64 * 2048)     # 7x7x2048 -> 2048, hidden 64


def _three_block_case():
    from nettailor_tf.model.student_network import BlockPlan, Plan

    # Block 0: universal (node 0), proxy from node 0.
    # Block 1: universal (node 1), proxies from node 1 and from node 0 (an older node).
    # Block 2: universal (node 2), proxy from node 2.
    plan = Plan([BlockPlan(True, [0]), BlockPlan(True, [1, 0]), BlockPlan(True, [2])])
    a = [[0.7, 0.3], [0.6, 0.25, 0.15], [0.8, 0.2]]
    c = [[0.3, 0.02], [0.25, 0.03, 0.04], [0.35, 0.05]]
    return plan, a, c


def _expected_by_hand(a, c, exact):
    # in_l: node l+1 receives nothing; out_n: no branch reads node n.
    in0 = (1 - a[0][0]) * (1 - a[0][1])
    in1 = (1 - a[1][0]) * (1 - a[1][1]) * (1 - a[1][2])
    out1 = (1 - a[1][0]) * (1 - a[1][1])              # block 1's universal and proxy 0
    out2 = (1 - a[2][0]) * (1 - a[2][1])
    # C = sum_l sum_j c_lj (alpha_lj - p_in - p_out); p_in = 1 for node 0, p_out = 1 for the
    # last block.  The proxy of block 1 that reads node 0 has p_in = 1 (exact) or in_0 (the
    # published approximation: block l-1's `in` for every branch of block l).
    p_in_old = 1.0 if exact else in0
    return (c[0][0] * (a[0][0] - 1 - out1) + c[0][1] * (a[0][1] - 1 - out1)
            + c[1][0] * (a[1][0] - in0 - out2) + c[1][1] * (a[1][1] - in0 - out2)
            + c[1][2] * (a[1][2] - p_in_old - out2)
            + c[2][0] * (a[2][0] - in1 - 1) + c[2][1] * (a[2][1] - in1 - 1))


@pytest.mark.parametrize("exact", [True, False])
def test_expected_complexity_by_hand(exact):
    """C of the paper on a 3-block plan, written out term by term."""
    import tensorflow as tf

    plan, a, c = _three_block_case()
    value = complexity.expected_complexity([tf.constant(x) for x in a], c, plan, exact=exact)
    assert float(value) == pytest.approx(_expected_by_hand(a, c, exact), rel=1e-6)


def test_exact_and_published_complexity_differ_on_older_nodes():
    """They differ by c * (1 - in_0) for the proxy reading node 0, else agree."""
    import tensorflow as tf

    from nettailor_tf.model.student_network import Plan

    plan, a, c = _three_block_case()
    alphas = [tf.constant(x) for x in a]
    exact = float(complexity.expected_complexity(alphas, c, plan, exact=True))
    published = float(complexity.expected_complexity(alphas, c, plan, exact=False))
    in0 = (1 - a[0][0]) * (1 - a[0][1])
    assert exact - published == pytest.approx(-c[1][2] * (1 - in0), rel=1e-5)
    assert abs(exact - published) > 1e-3

    one_skip = Plan.full(3, 1)  # every proxy reads the same node as its universal block
    alphas = [tf.constant([0.7, 0.3]), tf.constant([0.6, 0.4]), tf.constant([0.9, 0.1])]
    costs = [[0.3, 0.02], [0.25, 0.03], [0.35, 0.05]]
    assert float(complexity.expected_complexity(alphas, costs, one_skip, exact=True)) == \
        pytest.approx(float(complexity.expected_complexity(alphas, costs, one_skip, exact=False)))


def test_expected_complexity_gradient_is_finite():
    """C is differentiable in the gates' logits."""
    import tensorflow as tf

    plan, _, c = _three_block_case()
    logits = [tf.Variable(tf.random.normal((len(row),), seed=i)) for i, row in enumerate(c)]
    with tf.GradientTape() as tape:
        value = complexity.expected_complexity([tf.nn.softmax(z) for z in logits], c, plan)
    grads = tape.gradient(value, logits)
    assert all(g is not None and bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads)

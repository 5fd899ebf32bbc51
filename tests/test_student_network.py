"""The student: gradient routing, the pretrained-network invariant, frozen weights, plans and
copies of task weights."""
import keras
import numpy as np
from helpers import randomize_weights, task_layers
import pytest
import tensorflow as tf

from nettailor_tf.model import backbones
from nettailor_tf.model.losses import cross_entropy, mimic_loss
from nettailor_tf.model.pruning import mask_student
from nettailor_tf.model.student_network import (BatchNormRecalibrator, BlockPlan, Plan,
                                                build_student, copy_task_weights,
                                                recalibrate_batchnorm)

NUM_CLASSES = 5
IMAGE_SIZE = 32



def _tiny_backbone(seed=0):
    backbone = backbones.build_backbone("tiny")
    randomize_weights(backbone.layers, seed)  # He-normal kernels: sane activations
    return backbone


def _student(backbone, plan, universal_bn="frozen", seed=1):
    student = build_student(backbone, NUM_CLASSES, plan, universal_bn, IMAGE_SIZE)
    randomize_weights(task_layers(student), seed)
    return student


def _images(n=4, seed=0):
    images = np.random.default_rng(seed).uniform(0, 255, (n, IMAGE_SIZE, IMAGE_SIZE, 3))
    return images.astype(np.float32)


UNIVERSAL_ONLY = Plan([BlockPlan(True, []) for _ in range(4)])


# --- gradient routing ------------------------------------------------------------

def _naive_block(block, inputs, training):
    """The published two-pass form: the whole block, universal included, evaluated as is."""
    alphas = block.gate.alphas()
    branches = [block.universal(inputs[0], training=training and block.universal_training)]
    branches += [p(x, training=training) for p, x in zip(block.proxies, inputs[1:])]
    return tf.nn.relu(tf.add_n([alphas[j] * b for j, b in enumerate(branches)]))


def _naive_loss(student, images, labels, teacher_logits, teacher_endpoints):
    """CE + 10 T where each block's mimic term comes from a SECOND evaluation of the whole
    block on stop-gradient inputs (feeding nothing else)."""
    plan = student.plan
    nodes = {0: student.stem(images, training=student.universal_training)}
    routed = []
    for l in range(len(plan.blocks)):
        block = student.block(l)
        inputs = [nodes[n] for n in plan.branch_sources(l)]
        nodes[l + 1] = _naive_block(block, inputs, training=True)
        routed.append(_naive_block(block, [tf.stop_gradient(x) for x in inputs], training=True))
    logits = student.classifier(student.head(nodes[len(plan.blocks)], training=False))
    return (cross_entropy(logits, labels)
            + 10 * mimic_loss(logits, routed, teacher_logits, teacher_endpoints,
                              list(range(len(plan.blocks))), len(plan.blocks)))


@pytest.mark.parametrize("universal_bn", ["frozen", "task"])
def test_gradient_routing_equals_the_two_pass_reference(universal_bn):
    """The single-pass routing (each block evaluated once, the mimic node's gradient sent to
    the block's own weights) gives the gradients of the published two-pass computation."""
    student = _student(_tiny_backbone(), Plan.full(4, 3), universal_bn)
    rng = np.random.default_rng(2)
    images = tf.constant(_images(8))
    labels = tf.constant(rng.integers(0, NUM_CLASSES, 8))
    _, endpoints, _ = student(images, training=False)
    teacher_endpoints = [tf.constant(rng.normal(0, 1, e.shape).astype(np.float32) ** 2)
                         for e in endpoints]
    teacher_logits = tf.constant(rng.normal(0, 1, (8, NUM_CLASSES)).astype(np.float32))
    variables = student.task_variables()[0]

    with tf.GradientTape() as tape:
        logits, _, routed = student(images, training=True)
        loss = cross_entropy(logits, labels) + 10 * mimic_loss(
            logits, routed, teacher_logits, teacher_endpoints, student.live_blocks, 4)
    grads = tape.gradient(loss, variables)
    with tf.GradientTape() as tape:
        naive = _naive_loss(student, images, labels, teacher_logits, teacher_endpoints)
    naive_grads = tape.gradient(naive, variables)

    assert float(loss) == pytest.approx(float(naive), rel=1e-5)
    for g, n, v in zip(grads, naive_grads, variables):
        assert g is not None and n is not None, v.path
        assert np.all(np.isfinite(g.numpy())), v.path
        np.testing.assert_allclose(g.numpy(), n.numpy(), rtol=0, atol=1e-6, err_msg=v.path)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 1e-2  # not trivially zero

    # Without routing (mimic on the main endpoints) the gradients differ: the test can fail.
    with tf.GradientTape() as tape:
        logits, endpoints, _ = student(images, training=True, mimic=False)
        unrouted = cross_entropy(logits, labels) + 10 * mimic_loss(
            logits, endpoints, teacher_logits, teacher_endpoints, student.live_blocks, 4)
    unrouted_grads = tape.gradient(unrouted, variables)
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(unrouted_grads, grads)) > 1e-3


# --- the invariant: no proxies and alpha_universal = 1 is the pretrained network ---------

@pytest.mark.parametrize("universal_bn", ["frozen", "task"])
def test_universal_only_student_is_the_tiny_backbone(universal_bn):
    """Student endpoints and logits equal the backbone classifier's (inference mode)."""
    backbone = _tiny_backbone()
    teacher = backbones.classifier_model(backbone, NUM_CLASSES)
    student = build_student(backbone, NUM_CLASSES, UNIVERSAL_ONLY, universal_bn, IMAGE_SIZE)
    student.classifier.set_weights(teacher.get_layer("classifier").get_weights())
    images = _images()
    logits, endpoints, _ = student(images, training=False)
    teacher_logits, teacher_endpoints = teacher(images, training=False)
    assert len(endpoints) == len(teacher_endpoints) == 4
    for s, t in zip(endpoints, teacher_endpoints):
        np.testing.assert_allclose(s.numpy(), t.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits.numpy(), teacher_logits.numpy(), rtol=1e-4, atol=1e-4)


def test_universal_only_student_is_efficientnet_lite0_with_imagenet_weights():
    """The invariant on a backbone without post-block activation and with real weights."""
    backbone = backbones.build_backbone("efficientnet_lite0")
    backbones.load_backbone_weights(backbone, "imagenet")
    teacher = backbones.classifier_model(backbone, NUM_CLASSES)
    plan = Plan([BlockPlan(True, []) for _ in backbone.blocks])
    student = build_student(backbone, NUM_CLASSES, plan, "frozen", 64)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    _, endpoints, _ = student(images, training=False)
    _, teacher_endpoints = teacher(images, training=False)
    assert len(endpoints) == 16
    assert min(float(tf.reduce_min(t)) for t in teacher_endpoints) < 0  # linear bottlenecks
    for s, t in zip(endpoints, teacher_endpoints):
        np.testing.assert_allclose(s.numpy(), t.numpy(), rtol=1e-4, atol=1e-4)


# --- plans and variables ------------------------------------------------------------

def test_plan_full_sources_and_counts():
    """Proxy j reads node l - j; 45 proxies for 16 blocks at max_skip 3, 16 at 1, 136 dense."""
    assert [b.proxy_sources for b in Plan.full(4, 3).blocks] == [[0], [1, 0], [2, 1, 0], [3, 2, 1]]
    assert [b.proxy_sources for b in Plan.full(3, None).blocks] == [[0], [1, 0], [2, 1, 0]]
    assert all(b.universal for b in Plan.full(4, 3).blocks)
    assert Plan.full(4, 3).branch_sources(3) == [3, 3, 2, 1]
    assert Plan.full(16, 3).counts()["proxies_kept"] == 45  # 1 + 2 + 14 * 3 (ResNet-34)
    assert Plan.full(16, 1).counts()["proxies_kept"] == 16
    assert Plan.full(16, None).counts()["proxies_kept"] == 136  # 16 * 17 / 2
    assert Plan.full(16, 3).counts() == {"universal_blocks_kept": 16, "proxies_kept": 45,
                                         "blocks_live": 16}
    with pytest.raises(ValueError):
        Plan.full(4, 0)


# Tiny: 4 blocks; each proxy has 3 trainable variables (1x1 kernel, BN gamma, BN beta), the
# classifier 2 (kernel, bias), each block one gate (logits, not decayed); the tiny head has
# no weights.  Proxies: max_skip 1 -> 1+1+1+1 = 4; 3 -> 1+2+3+3 = 9; dense -> 1+2+3+4 = 10.
#   trainable = 3 P + 2 + 4, decayed = 3 P + 2.
@pytest.mark.parametrize("max_skip,trainable,decayed", [(1, 18, 14), (3, 33, 29), (None, 36, 32)])
def test_task_variable_counts(max_skip, trainable, decayed):
    """Exact task variables; the model's trainable weights are exactly these (universal frozen)."""
    student = build_student(_tiny_backbone(), NUM_CLASSES, Plan.full(4, max_skip), "frozen",
                            IMAGE_SIZE)
    train, decay = student.task_variables()
    assert (len(train), len(decay)) == (trainable, decayed)
    assert {id(v) for v in decay} <= {id(v) for v in train}
    assert not any(v.name == "logits" for v in decay)
    # Keras's own list adds only the gates' masses, which the student stage leaves alone.
    masses = {id(v) for v in student.mass_variables()}
    assert {id(v) for v in student.trainable_weights} == {id(v) for v in train} | masses


def test_task_parameter_count_max_skip_1_by_hand():
    """Scalars of the max_skip=1 task variables, counted by hand."""
    student = build_student(_tiny_backbone(), NUM_CLASSES, Plan.full(4, 1), "frozen", IMAGE_SIZE)
    # Proxies read node l (8, 8, 8, 16 channels) and write 8, 8, 16, 16 channels:
    # C_in * C_out + 2 C_out each.
    proxies = (8 * 8 + 16) + (8 * 8 + 16) + (8 * 16 + 32) + (16 * 16 + 32)
    classifier = 16 * NUM_CLASSES + NUM_CLASSES
    gates = 4 * 2  # universal + 1 proxy per block
    assert sum(int(np.prod(v.shape)) for v in student.task_variables()[0]) == \
        proxies + classifier + gates == 701


def _train_steps(student, steps=3):
    """A few SGD steps on CE + mimic of random targets, applied to the task variables only."""
    variables = student.task_variables()[0]
    optimizer = keras.optimizers.SGD(0.5)
    rng = np.random.default_rng(5)
    for step in range(steps):
        images = _images(4, seed=10 + step)
        labels = rng.integers(0, NUM_CLASSES, 4)
        with tf.GradientTape() as tape:
            logits, _, routed = student(images, training=True)
            targets = [tf.ones_like(r) for r in routed]
            loss = cross_entropy(logits, labels) + 10 * mimic_loss(
                logits, routed, tf.zeros_like(logits), targets, student.live_blocks, 4)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))


def _universal_variables(student, backbone):
    """Stem, universal blocks and head as the student uses them, and the backbone's own."""
    layers = [student.stem, student.head] + [b.universal for b in student.tailored
                                             if b.universal is not None]
    return [v for layer in layers + backbone.layers for v in layer.weights]


def test_frozen_universal_weights_do_not_change():
    """universal_bn='frozen': after training steps, every universal variable (and the backbone's
    BN statistics) is bit-identical, while the task variables and proxy statistics moved."""
    backbone = _tiny_backbone()
    student = _student(backbone, Plan.full(4, 3), "frozen")
    universal = _universal_variables(student, backbone)
    task = student.task_variables()[0]
    proxy_stats = [v for b in student.tailored for p in b.proxies for v in p.non_trainable_weights]
    before = [v.numpy().copy() for v in universal + task + proxy_stats]
    _train_steps(student)
    after = [v.numpy() for v in universal + task + proxy_stats]
    n = len(universal)
    for v, a, b in zip(universal, before[:n], after[:n]):
        np.testing.assert_array_equal(a, b, err_msg=v.path)
    assert all(not np.array_equal(a, b) for a, b in zip(before[n:], after[n:]))


def test_task_universal_bn_re_estimates_statistics_only():
    """universal_bn='task': universal BN moving statistics change; kernels, gamma, beta do not."""
    backbone = _tiny_backbone()
    student = _student(backbone, Plan.full(4, 3), "task")
    universal = {id(v): v for v in _universal_variables(student, backbone)}.values()
    stats = [v for v in universal if v.name in ("moving_mean", "moving_variance")]
    fixed = [v for v in universal if v.name not in ("moving_mean", "moving_variance")]
    assert len(stats) == 2 * 10 and len(fixed) == 3 * 10  # 10 ConvBN in stem + blocks
    before_stats = [v.numpy().copy() for v in stats]
    before_fixed = [v.numpy().copy() for v in fixed]
    _train_steps(student)
    for v, a in zip(fixed, before_fixed):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)
    for v, a in zip(stats, before_stats):
        assert not np.array_equal(a, v.numpy()), v.path
    # They are task state: trained with the task, not updated by the optimiser.
    assert not {id(v) for v in stats} & {id(v) for v in student.trainable_weights}


def test_resnet50_gets_bottleneck_proxies():
    """Bottleneck backbones: proxies 1x1 to max(C_out/32, 16), BN, ReLU, 1x1 to C_out, BN."""
    backbone = backbones.build_backbone("resnet50")
    student = build_student(backbone, NUM_CLASSES, Plan.full(16, 1), "frozen", 32)
    proxies = [p for b in student.tailored for p in b.proxies]
    assert len(proxies) == 16
    # Stages of 3, 4, 6, 3 blocks with 256, 512, 1024, 2048 output channels.
    outs = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert [p.out_channels for p in proxies] == outs
    assert [p.hidden_channels for p in proxies] == [max(c // 32, 16) for c in outs]
    assert [p.hidden_channels for p in proxies][::3] == [16, 16, 16, 32, 32, 64]
    for proxy, c in zip(proxies, outs):
        assert len(proxy.convs) == 2
        assert proxy.convs[0].conv.kernel.shape[-1] == max(c // 32, 16)
        assert proxy.convs[-1].conv.kernel.shape[-1] == c
    assert all(p.hidden_channels is None for p in task_layers(
        build_student(_tiny_backbone(), NUM_CLASSES, Plan.full(4, 1), "frozen", IMAGE_SIZE))[:4])


def test_build_student_validates_arguments():
    backbone = backbones.build_backbone("tiny")
    with pytest.raises(ValueError):
        build_student(backbone, NUM_CLASSES, Plan.full(3, 1))
    with pytest.raises(ValueError):
        build_student(backbone, NUM_CLASSES, Plan.full(4, 1), universal_bn="shared")


# --- copying task weights into a pruned student -------------------------------------

def test_copy_task_weights_into_the_same_plan_preserves_outputs():
    """Copying everything into a fresh student of the same plan reproduces its outputs."""
    backbone = _tiny_backbone()
    source = _student(backbone, Plan.full(4, 3), seed=3)
    target = _student(backbone, Plan.full(4, 3), seed=4)
    images = _images()
    assert not np.allclose(source(images)[0], target(images)[0])
    copy_task_weights(source, target)
    logits, endpoints, _ = target(images, training=False)
    source_logits, source_endpoints, _ = source(images, training=False)
    np.testing.assert_allclose(logits.numpy(), source_logits.numpy(), atol=1e-5)
    for a, b in zip(endpoints, source_endpoints):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


# Block 0 drops its proxy, block 1 drops its universal block and the proxy from node 1,
# block 2 keeps only the proxy from node 0, block 3 keeps universal and the proxy from node 2.
PRUNED = Plan([BlockPlan(True, []), BlockPlan(False, [0]), BlockPlan(False, [0]),
               BlockPlan(True, [2])])


def test_copy_task_weights_into_a_pruned_plan_equals_the_masked_full_student():
    """A pruned student with copied weights computes the full student with its gates masked."""
    backbone = _tiny_backbone()
    full = _student(backbone, Plan.full(4, 3), seed=6)
    pruned = _student(backbone, PRUNED, seed=7)
    copy_task_weights(full, pruned)
    images = _images()
    unmasked = full(images, training=False)[0].numpy()
    mask_student(full, PRUNED)
    assert [list(b.gate.keep.numpy()) for b in full.tailored] == [
        [1, 0], [0, 0, 1], [0, 0, 0, 1], [1, 0, 1, 0]]
    logits, endpoints, _ = pruned(images, training=False)
    full_logits, full_endpoints, _ = full(images, training=False)
    assert not np.allclose(unmasked, full_logits.numpy(), atol=1e-3)  # the mask matters
    np.testing.assert_allclose(logits.numpy(), full_logits.numpy(), atol=1e-5)
    for a, b in zip(endpoints, full_endpoints):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    for l in range(4):
        np.testing.assert_allclose(pruned.block(l).gate.alphas().numpy(),
                                   [a for a in full.block(l).gate.alphas().numpy() if a > 0],
                                   rtol=1e-6)


def test_a_pruned_copy_computes_the_students_sums_minus_the_removed_terms():
    """Each pruned gate keeps the share its surviving branches held in the student, so a
    block's output is the student's sum without the removed branches' terms (not the
    survivors scaled up to a total of 1)."""
    backbone = _tiny_backbone()
    full = _student(backbone, Plan.full(4, 3), seed=6)
    pruned = _student(backbone, PRUNED, seed=7)
    full_alphas = [a.numpy() for a in full.alphas()]
    copy_task_weights(full, pruned)
    # Block 3 keeps the universal branch (index 0) and the proxy from node 2 (index 2).
    kept = full_alphas[3][[0, 2]]
    np.testing.assert_allclose(pruned.block(3).gate.alphas().numpy(), kept, rtol=1e-6)
    assert kept.sum() < 0.999


def test_recalibrated_statistics_are_the_mean_of_the_batch_moments():
    backbone = _tiny_backbone()
    student = _student(backbone, PRUNED, seed=2)
    batches = [(_images(8, seed=s), np.zeros(8, np.int32)) for s in range(3)]
    bn = student.block(1).proxies[0].convs[-1].bn
    before = bn.moving_mean.numpy().copy()
    momentum = bn.momentum
    assert recalibrate_batchnorm(student, batches) == 3
    assert bn.momentum == momentum  # restored
    # The proxy of block 1 reads node 0 (the stem's output), which no other weight moves.
    stem_out = [student.stem(images, training=False) for images, _ in batches]
    proxy = student.block(1).proxies[0]
    pre_bn = [proxy.convs[-1].conv(x) for x in stem_out]
    expected = np.mean([tf.reduce_mean(p, axis=[0, 1, 2]).numpy() for p in pre_bn], axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(before, expected)


def test_recalibration_summed_on_the_device_equals_the_host_average_bit_for_bit():
    """The traced sums give exactly the statistics of averaging each batch's
    moments on the host (the re-estimation's first form), so moving the sum
    onto the device changed no result."""
    backbone = _tiny_backbone()
    student = _student(backbone, PRUNED, seed=3)
    batches = [(_images(8, seed=s), np.zeros(8, np.int32)) for s in range(4)]
    recalibrator = BatchNormRecalibrator(student)
    start = recalibrator.save()
    for layer in recalibrator.layers:
        layer.momentum = 0.0
    forward = tf.function(lambda images: student(images, training=True, mimic=False)[0])
    per_batch = []
    for images, _ in batches:
        forward(images)
        per_batch.append(recalibrator.save())
    for layer in recalibrator.layers:
        layer.momentum = 0.99
    sums = per_batch[0]
    for stats in per_batch[1:]:
        sums = [(m0 + m, v0 + v) for (m0, v0), (m, v) in zip(sums, stats)]
    expected = [(m / len(batches), v / len(batches)) for m, v in sums]
    for _ in range(2):  # the second call reuses the trace and starts from other statistics
        recalibrator.restore(start)
        assert recalibrator(batches) == len(batches)
        for (mean, variance), (want_mean, want_variance) in zip(recalibrator.save(), expected):
            np.testing.assert_array_equal(mean, want_mean)
            np.testing.assert_array_equal(variance, want_variance)
    assert all(layer.momentum == 0.99 for layer in recalibrator.layers)

"""Pruning: plans from gates, dead paths, the static network, its cost, task state, plans."""
import json

import keras
import numpy as np
from helpers import randomize_weights, task_layers
import pytest

from nettailor_tf.model import backbones, complexity, pruning, static_graph
from nettailor_tf.model.blocks import NetTailorBlock, Proxy
from nettailor_tf.model.gates import Gate
from nettailor_tf.model.layers import BasicBlock
from nettailor_tf.model.pruning import PruneError, prune_plan, remove_dead_paths
from nettailor_tf.model.student_network import BlockPlan, Plan, build_student, copy_task_weights

NUM_CLASSES = 5
IMAGE_SIZE = 32


def _plan(*blocks):
    """_plan((True, [0]), ...) -> Plan."""
    return Plan([BlockPlan(u, list(s)) for u, s in blocks])


def _as_tuples(plan):
    return [(b.universal, b.proxy_sources) for b in plan.blocks]


# --- prune_plan / remove_dead_paths ----------------------------------------------

def test_prune_plan_removes_smallest_universal_blocks_and_weak_proxies():
    """The N smallest alpha_universal go, and every proxy with alpha <= threshold (0.05 too)."""
    plan = Plan.full(4, 3)  # branches: [U, 0], [U, 1, 0], [U, 2, 1, 0], [U, 3, 2, 1]
    alphas = [np.array([0.90, 0.10]),
              np.array([0.30, 0.60, 0.10]),
              np.array([0.50, 0.05, 0.40, 0.05]),    # 0.05 is at the threshold: removed
              np.array([0.20, 0.06, 0.04, 0.70])]
    pruned = prune_plan(plan, alphas, num_universal=2, proxy_threshold=0.05)
    # Smallest universal alphas: block 3 (0.20) and block 1 (0.30).
    assert _as_tuples(pruned) == [(True, [0]), (False, [1, 0]), (True, [1]), (False, [3, 1])]
    # Dropping block 3's proxy from node 3 as well leaves node 3 unread: block 2 dies.
    alphas[3] = np.array([0.20, 0.04, 0.06, 0.70])
    pruned = prune_plan(plan, alphas, num_universal=2, proxy_threshold=0.05)
    assert _as_tuples(pruned) == [(True, [0]), (False, [1, 0]), (False, []), (False, [2, 1])]
    # Nothing removed: the same plan.
    assert _as_tuples(prune_plan(plan, alphas, 0, 0.0)) == _as_tuples(plan)


def test_prune_plan_keeps_each_block_connected():
    """A block that would lose every branch keeps its strongest proxy, so no
    node disappears and no later branch loses its input."""
    plan = Plan.full(3, 2)  # [U, 0], [U, 1, 0], [U, 2, 1]
    alphas = [np.array([0.2, 0.01]), np.array([0.6, 0.3, 0.1]), np.array([0.5, 0.3, 0.2])]
    # Block 0 loses its universal block (smallest alpha); its only proxy is under the
    # threshold but is kept as the block's strongest remaining branch.
    pruned = prune_plan(plan, alphas, num_universal=1, proxy_threshold=0.05)
    assert _as_tuples(pruned) == [(False, [0]), (True, [1, 0]), (True, [2, 1])]


def test_prune_plan_argument_checks():
    plan = Plan.full(2, 1)
    alphas = [np.array([0.5, 0.5])] * 2
    with pytest.raises(PruneError):
        prune_plan(plan, alphas, num_universal=3, proxy_threshold=0.05)
    # Every universal block cut and every proxy under the threshold: each block
    # still keeps its strongest proxy, and the network stays connected.
    pruned = prune_plan(plan, alphas, num_universal=2, proxy_threshold=0.9)
    assert _as_tuples(pruned) == [(False, [0]), (False, [1])]


def test_branches_reading_a_dead_node_disappear():
    """Block 1 has no branches, so node 2 is never produced: every branch reading it goes."""
    plan = _plan((True, [0]), (False, []), (True, [1, 0]), (True, [3, 2]))
    # Block 2's universal block reads node 2 (gone); its proxies read nodes 1 and 0 (alive).
    assert _as_tuples(remove_dead_paths(plan)) == [
        (True, [0]), (False, []), (False, [1, 0]), (True, [3])]


def test_blocks_nobody_reads_disappear_until_stable():
    """Node 2 is read by no branch, so block 1 is dead; then node 1 is unread and block 0 dies."""
    plan = _plan((True, []), (True, []), (False, [0]), (True, []))
    assert _as_tuples(remove_dead_paths(plan)) == [
        (False, []), (False, []), (False, [0]), (True, [])]
    # A block whose output is read only by a skip proxy stays.
    kept = _plan((True, []), (True, []), (False, [0, 2]), (True, []))
    assert _as_tuples(remove_dead_paths(kept)) == _as_tuples(kept)


def test_remove_dead_paths_does_not_modify_its_argument():
    plan = _plan((True, [0]), (False, []), (True, [1, 0]), (True, [3, 2]))
    remove_dead_paths(plan)
    assert _as_tuples(plan) == [(True, [0]), (False, []), (True, [1, 0]), (True, [3, 2])]


@pytest.mark.parametrize("plan", [
    _plan((True, []), (True, []), (True, []), (False, [])),        # the last block is empty
    _plan((True, []), (False, []), (False, []), (False, [2])),     # it reads only a dead node
    _plan((False, []), (True, []), (True, []), (True, [])),        # the chain is cut at node 1
])
def test_prune_error_when_nothing_reaches_the_classifier(plan):
    with pytest.raises(PruneError):
        remove_dead_paths(plan)


# --- the static network --------------------------------------------------------


# Block 0: universal only; block 1: the proxy from node 0 only; block 2: universal and the
# proxy from node 1; block 3: universal and the proxies from nodes 3 and 2.
PRUNED = Plan([BlockPlan(True, []), BlockPlan(False, [0]), BlockPlan(True, [1]),
               BlockPlan(True, [3, 2])])


@pytest.fixture(scope="module")
def trained():
    """A tiny full student with random task weights, and its pruned copy."""
    backbone = backbones.build_backbone("tiny")
    randomize_weights(backbone.layers, 0)
    full = build_student(backbone, NUM_CLASSES, Plan.full(4, 3), "frozen", IMAGE_SIZE)
    randomize_weights(task_layers(full), 1)
    pruned = build_student(backbone, NUM_CLASSES, PRUNED, "frozen", IMAGE_SIZE)
    copy_task_weights(full, pruned)
    pruning.mask_student(full, PRUNED)
    images = np.random.default_rng(2).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3))
    return backbone, full, pruned, images.astype(np.float32)


def _layers_of(model):
    return list(model._flatten_layers(include_self=False, recursive=True))


def test_static_model_equals_the_masked_full_student(trained):
    """Same logits as the masked full student, with no gates and no pruned branch inside."""
    _, full, pruned, images = trained
    static = static_graph.static_model(pruned)
    np.testing.assert_allclose(static(images).numpy(), full(images, training=False)[0].numpy(),
                               rtol=1e-4, atol=1e-4)
    layers = _layers_of(static)
    assert not any(isinstance(l, (Gate, NetTailorBlock)) for l in layers)
    assert sum(isinstance(l, Proxy) for l in layers) == PRUNED.counts()["proxies_kept"] == 4
    assert sum(isinstance(l, BasicBlock) for l in layers) == 3
    # Every proxy is BN-folded, its gate inside its last conv.
    assert all(l.folded for l in layers if isinstance(l, Proxy))


def test_static_model_keras_round_trip(trained, tmp_path):
    """The static network survives a `.keras` save and load."""
    _, _, pruned, images = trained
    static = static_graph.static_model(pruned)
    path = str(tmp_path / "static.keras")
    static.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(images).numpy(), static(images).numpy(), atol=1e-6)


def test_pruned_cost_by_hand(trained):
    """Multiply-adds and parameters of the PRUNED plan at 32 px, counted by hand."""
    backbone, _, pruned, _ = trained
    cost = complexity.pruned_cost(backbone, PRUNED, IMAGE_SIZE, NUM_CLASSES, pruned)
    # Tiny at 32 px: node 0..2 are 16x16x8, node 3..4 are 8x8x16.
    stem = 16 * 16 * 9 * 3 * 8
    universal = (2 * 16 * 16 * 9 * 8 * 8                                    # block 0
                 + 8 * 8 * (9 * 8 * 16 + 9 * 16 * 16 + 8 * 16)               # block 2
                 + 2 * 8 * 8 * 9 * 16 * 16)                                  # block 3
    proxies = (16 * 16 * 8 * 8                                               # block 1 from node 0
               + 8 * 8 * 8 * 16                                              # block 2 from node 1
               + 8 * 8 * 16 * 16 + 8 * 8 * 8 * 16)                           # block 3 from 3, 2
    head, classifier = 0, 16 * NUM_CLASSES
    assert cost["flops"] == stem + universal + proxies + head + classifier
    branch = complexity.branch_flops(backbone, PRUNED, IMAGE_SIZE)
    parts = complexity.backbone_flops(backbone, IMAGE_SIZE)
    assert cost["flops"] == parts["stem"] + sum(map(sum, branch)) + parts["head"] + classifier
    # Parameters: conv + BN gamma/beta.
    conv_bn = lambda cin, cout, k: k * k * cin * cout + 2 * cout
    universal_params = (conv_bn(3, 8, 3) + 2 * conv_bn(8, 8, 3)
                        + conv_bn(8, 16, 3) + conv_bn(16, 16, 3) + conv_bn(8, 16, 1)
                        + 2 * conv_bn(16, 16, 3))
    task_params = (conv_bn(8, 8, 1) + conv_bn(8, 16, 1) + conv_bn(16, 16, 1) + conv_bn(8, 16, 1)
                   + 16 * NUM_CLASSES + NUM_CLASSES)
    assert cost["params_universal_used"] == universal_params
    assert cost["params_task_specific"] == task_params
    assert cost["params_total"] == universal_params + task_params
    assert (cost["universal_blocks_kept"], cost["proxies_kept"], cost["blocks_live"]) == (3, 4, 4)


def _universal_paths(student):
    layers = [student.stem, student.head] + [b.universal for b in student.tailored
                                             if b.universal is not None]
    return {v.path for layer in layers for v in layer.weights}


def test_task_state_round_trip(trained, tmp_path):
    """load_task_state(save_task_state) restores every task variable exactly; no universal weight
    is in the file."""
    backbone, full, _, images = trained
    path = str(tmp_path / "task.npz")
    pruning.save_task_state(full, path)
    fresh = build_student(backbone, NUM_CLASSES, Plan.full(4, 3), "frozen", IMAGE_SIZE)
    assert not np.allclose(fresh(images)[0].numpy(), full(images)[0].numpy(), atol=1e-3)
    pruning.load_task_state(fresh, path)
    state, restored = pruning.task_state(full), pruning.task_state(fresh)
    assert sorted(state) == sorted(restored)
    for key in state:
        np.testing.assert_array_equal(state[key], restored[key], err_msg=key)
    np.testing.assert_array_equal(fresh(images)[0].numpy(), full(images)[0].numpy())
    with np.load(path) as stored:
        keys = set(stored.files)
    # 9 proxies x 5 variables, 4 gates x 3 (logits, keep, mass), classifier 2.
    assert len(keys) == 9 * 5 + 4 * 3 + 2
    assert not keys & _universal_paths(full)
    assert not any(k.startswith(("stem/", "block")) for k in keys)


def test_task_state_includes_universal_statistics_in_task_mode():
    """With universal_bn='task' the re-estimated universal BN statistics are task state."""
    backbone = backbones.build_backbone("tiny")
    student = build_student(backbone, NUM_CLASSES, Plan.full(4, 1), "task", IMAGE_SIZE)
    state = pruning.task_state(student)
    statistics = {v.path for l in [backbone.stem, *backbone.blocks] for v in l.weights
                  if v.name in ("moving_mean", "moving_variance")}
    assert len(statistics) == 20 and statistics <= set(state)
    kernels = {v.path for l in [backbone.stem, *backbone.blocks] for v in l.weights
               if v.name in ("kernel", "gamma", "beta")}
    assert not kernels & set(state)


def test_load_task_state_rejects_another_plan(trained, tmp_path):
    """A file from another plan is refused rather than half loaded."""
    backbone, _, pruned, _ = trained
    path = str(tmp_path / "pruned.npz")
    pruning.save_task_state(pruned, path)
    other = build_student(backbone, NUM_CLASSES, Plan.full(4, 1), "frozen", IMAGE_SIZE)
    with pytest.raises(ValueError):
        pruning.load_task_state(other, path)


def test_plan_file_round_trip(tmp_path):
    """save_plan/load_plan keep the plan and the extra information."""
    path = str(tmp_path / "plan.json")
    pruning.save_plan(path, PRUNED, accuracy=0.75, prune_universal=1)
    plan, data = pruning.load_plan(path)
    assert plan == PRUNED
    assert data["accuracy"] == 0.75 and data["prune_universal"] == 1
    assert json.load(open(path))["blocks"][1] == {"universal": False, "proxy_sources": [0]}
    assert Plan.from_dict(json.loads(PRUNED.to_json())) == PRUNED


def test_damaged_task_files_are_named_with_what_to_do(tmp_path):
    from nettailor_tf.model import backbones
    from nettailor_tf.model.student_network import Plan, build_student

    plan_file = tmp_path / "plan.json"
    plan_file.write_text('{"blocks": [')
    with pytest.raises(pruning.DamagedFileError, match=r"plan.json cannot be read .*delete it"):
        pruning.load_plan(str(plan_file))
    student = build_student(backbones.build_backbone("tiny"), 3, Plan.full(4, 3), "frozen", 16)
    state = tmp_path / "nettailor.npz"
    pruning.save_task_state(student, str(state))
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(pruning.DamagedFileError, match=r"nettailor.npz cannot be read"):
        pruning.load_task_state(student, str(state))

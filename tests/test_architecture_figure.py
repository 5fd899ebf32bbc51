"""Architecture figures (nettailor_tf.run.architecture_figure): valid, non-blank PNGs, input checks."""
import os
import random

import numpy as np
import pytest
from matplotlib import image as mpimg

from nettailor_tf.run.architecture_figure import plot_architecture

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def full_plan(num_blocks, max_skip):
    """Every universal block and proxies reading the last `max_skip` nodes
    (as student_network.Plan.full builds it)."""
    return [{"universal": True,
             "proxy_sources": list(range(l, max(0, l - max_skip + 1) - 1, -1))}
            for l in range(num_blocks)]


def random_gates(plan, seed):
    rng = random.Random(seed)
    gates = []
    for block in plan:
        weights = [rng.expovariate(1.0) ** 2 for _ in
                   range(int(block["universal"]) + len(block["proxy_sources"]))]
        gates.append([w / sum(weights) for w in weights])
    return gates


def prune(plan, gates, threshold):
    """Keeps branches with alpha > threshold (the universal one always here)."""
    return [{"universal": block["universal"],
             "proxy_sources": [s for j, s in enumerate(block["proxy_sources"])
                               if g[j + 1] > threshold]}
            for block, g in zip(plan, gates)]


def read_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    return mpimg.imread(path)


def distinct_colours(image):
    rgb = (np.asarray(image)[..., :3] * 255).round().astype(np.int64).reshape(-1, 3)
    return len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))


def test_four_blocks(tmp_path):
    plan = full_plan(4, 3)
    gates = random_gates(plan, 0)
    path = tmp_path / "tiny.png"
    plot_architecture(str(path), "tiny / cifar", plan, gates,
                      kept_plan=prune(plan, gates, 0.2), block_flops=[1e6, 2e6, 3e6, 2.5e6])
    image = read_png(path)
    # figure (8, 4) inches at 120 dpi
    assert image.shape[:2] == (480, 960)
    assert distinct_colours(image) > 20


def test_sixteen_blocks_max_skip_3(tmp_path):
    plan = full_plan(16, 3)
    assert sum(len(b["proxy_sources"]) for b in plan) == 45
    gates = random_gates(plan, 1)
    kept = prune(plan, gates, 0.15)
    kept[5] = {"universal": False, "proxy_sources": []}  # a removed block
    path = tmp_path / "mnv2.png"
    plot_architecture(str(path), "mobilenet_v2 / flowers", plan, gates, kept,
                      block_flops=[1e7 * (1 + l % 4) for l in range(16)])
    image = read_png(path)
    assert image.shape[:2] == (480, round(0.7 * 16 * 120))
    assert distinct_colours(image) > 50


def test_pruning_changes_the_rendering(tmp_path):
    plan = full_plan(6, 3)
    gates = random_gates(plan, 2)
    plain, pruned = tmp_path / "plain.png", tmp_path / "pruned.png"
    plot_architecture(str(plain), "t", plan, gates)
    plot_architecture(str(pruned), "t", plan, gates, kept_plan=prune(plan, gates, 0.3))
    a, b = read_png(plain), read_png(pruned)
    assert a.shape == b.shape
    assert np.abs(a - b).max() > 0.1


def test_plan_objects_are_accepted(tmp_path):
    from types import SimpleNamespace
    plan = full_plan(3, 2)
    blocks = [SimpleNamespace(**b) for b in plan]
    path = tmp_path / "obj.png"
    plot_architecture(str(path), "objects", SimpleNamespace(blocks=blocks),
                      random_gates(plan, 3))
    read_png(path)


def test_mismatched_gates_raise(tmp_path):
    plan = full_plan(4, 3)
    gates = random_gates(plan, 4)
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=r"gates has 3 blocks but full_plan has 4"):
        plot_architecture(str(path), "t", plan, gates[:3])
    bad = [list(g) for g in gates]
    bad[2] = bad[2][:-1]  # block 2 has a universal and 3 proxies = 4 branches
    with pytest.raises(ValueError, match=r"block 2: gates has 3 alphas but full_plan has 4 "
                                         r"branches \(1 universal \+ 3 proxies\)"):
        plot_architecture(str(path), "t", plan, bad)
    kept = prune(plan, gates, 0.0)
    kept[1]["proxy_sources"].append(7)
    with pytest.raises(ValueError, match=r"block 1"):
        plot_architecture(str(path), "t", plan, gates, kept_plan=kept)
    with pytest.raises(ValueError, match=r"block_flops has 2 entries"):
        plot_architecture(str(path), "t", plan, gates, block_flops=[1.0, 2.0])
    assert os.listdir(tmp_path) == []


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    plan = full_plan(4, 2)
    gates = random_gates(plan, 5)
    path = tmp_path / "arch.png"
    path.write_bytes(b"old")
    plot_architecture(str(path), "t", plan, gates)
    assert os.listdir(tmp_path) == ["arch.png"]
    read_png(path)


def test_failed_render_leaves_no_temporary_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    path = tmp_path / "arch.png"
    plan = full_plan(4, 2)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_architecture(str(path), "t", plan, random_gates(plan, 6))
    assert os.listdir(tmp_path) == []

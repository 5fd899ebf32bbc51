"""Architecture figures: the NetTailor gates and the kept network, one PNG per task.

In the spirit of the paper's architecture figures: nodes on a line left to
right (the input image, the stem output node 0, the block outputs 1..L, the
classifier head), each block's universal branch as the straight backbone edge
l -> l+1 and each proxy as an arc source -> l+1 above the line (longer skips
as higher arcs).  Edge colour (viridis) and width give the gate alpha; after
pruning, kept branches are solid and pruned ones faint grey dashes, and a
block whose every branch is pruned is drawn as a hollow grey node.

Plain Python and matplotlib (the Agg canvas, no pyplot global state); no
TensorFlow.  The plans are per-block dicts `{"universal": bool,
"proxy_sources": [int, ...]}`; `student_network.Plan` / `BlockPlan` objects work too.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nettailor_tf.common import atomic

__all__ = ["plot_architecture", "plot_deployment"]

_CMAP = "viridis"
_PRUNED_COLOR = "#b0b0b0"
_FIXED_COLOR = "#404040"  # stem and head edges (no gate)


def _as_blocks(plan: Any, what: str) -> list[tuple[bool, list[int]]]:
    """(universal, proxy_sources) per block from dicts, BlockPlans or a Plan."""
    if hasattr(plan, "blocks"):
        plan = plan.blocks
    elif isinstance(plan, dict) and "blocks" in plan:
        plan = plan["blocks"]
    blocks = []
    for l, block in enumerate(plan):
        if isinstance(block, dict):
            try:
                universal, sources = block["universal"], block["proxy_sources"]
            except KeyError as err:
                raise ValueError(f"{what}: block {l} has no {err} entry") from None
        else:
            universal, sources = block.universal, block.proxy_sources
        sources = [int(s) for s in sources]
        for s in sources:
            if not 0 <= s <= l:
                raise ValueError(f"{what}: block {l} has a proxy reading node {s}; "
                                 f"a proxy of block {l} reads a node in 0..{l}")
        blocks.append((bool(universal), sources))
    return blocks


def _check_gates(full: list[tuple[bool, list[int]]], gates: Sequence[Sequence[float]]
                 ) -> list[list[float]]:
    if len(gates) != len(full):
        raise ValueError(f"gates has {len(gates)} blocks but full_plan has {len(full)}")
    checked = []
    for l, ((universal, sources), alphas) in enumerate(zip(full, gates)):
        expected = int(universal) + len(sources)
        alphas = [float(a) for a in alphas]
        if len(alphas) != expected:
            raise ValueError(
                f"block {l}: gates has {len(alphas)} alphas but full_plan has {expected} "
                f"branches ({int(universal)} universal + {len(sources)} proxies)")
        if not all(math.isfinite(a) for a in alphas):
            raise ValueError(f"block {l}: gates has non-finite alphas {alphas}")
        checked.append(alphas)
    return checked


def _check_kept(full: list[tuple[bool, list[int]]], kept: list[tuple[bool, list[int]]]
                ) -> None:
    if len(kept) != len(full):
        raise ValueError(f"kept_plan has {len(kept)} blocks but full_plan has {len(full)}")
    for l, ((fu, fs), (ku, ks)) in enumerate(zip(full, kept)):
        if ku and not fu:
            raise ValueError(f"block {l}: kept_plan keeps a universal branch that "
                             "full_plan does not have")
        extra = sorted(set(ks) - set(fs))
        if extra:
            raise ValueError(f"block {l}: kept_plan has proxies reading nodes {extra} "
                             f"that full_plan does not have (full: {fs})")


def _arc(x0: float, x1: float, height: float, n: int = 40) -> tuple[list[float], list[float]]:
    """A half-sine arc from (x0, 0) to (x1, 0) peaking at `height`."""
    xs = [x0 + (x1 - x0) * i / (n - 1) for i in range(n)]
    ys = [height * math.sin(math.pi * i / (n - 1)) for i in range(n)]
    return xs, ys


class _ArcHandle:
    """A legend entry drawn as a small arc (see _ArcHandler)."""

    def __init__(self, color, lw: float, label: str):
        self.color, self.lw, self.label = color, lw, label

    def get_label(self) -> str:
        return self.label


class _ArcHandler:
    """Legend handler drawing an _ArcHandle as a half-sine arc."""

    def legend_artist(self, legend, handle, fontsize, handlebox):
        w, h = handlebox.width, handlebox.height
        xs, ys = _arc(0.0, w, 1.1 * h, n=20)
        line = Line2D(xs, [y - 0.1 * h for y in ys], color=handle.color, lw=handle.lw,
                      transform=handlebox.get_transform())
        handlebox.add_artist(line)
        return line


def _flops_label(flops: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= scale:
            return f"{flops / scale:.3g}{unit}"
    return f"{flops:.3g}"


def plot_architecture(path: str, title: str, full_plan: list[dict],
                      gates: list[list[float]], kept_plan: list[dict] | None = None,
                      block_flops: list[float] | None = None) -> None:
    """Draws the student's gates (and, with `kept_plan`, the pruned network) to a PNG.

    path: the PNG to write (atomically: a temporary file in the same folder,
      then os.replace).
    title: the figure title (e.g. the task name).
    full_plan: per block {"universal": bool, "proxy_sources": [node, ...]}, the
      student before pruning; block l's proxies read nodes <= l.
    gates: per block the alpha of each branch, universal first (if present) then
      the proxies in `proxy_sources` order.
    kept_plan: the plan after pruning, same structure, or None (nothing pruned).
    block_flops: optional per-block universal FLOPs: the block output nodes
      grow with them, and are labelled with them.

    Raises ValueError when the gates do not match the plan (naming the block
    and the counts), when kept_plan has branches full_plan lacks, or when
    block_flops has the wrong length.
    """
    full = _as_blocks(full_plan, "full_plan")
    alphas = _check_gates(full, gates)
    kept = None if kept_plan is None else _as_blocks(kept_plan, "kept_plan")
    if kept is not None:
        _check_kept(full, kept)
    num_blocks = len(full)
    if num_blocks == 0:
        raise ValueError("full_plan has no blocks")
    if block_flops is not None:
        block_flops = [float(f) for f in block_flops]
        if len(block_flops) != num_blocks:
            raise ValueError(f"block_flops has {len(block_flops)} entries but full_plan "
                             f"has {num_blocks} blocks")
    fig_width = max(8.0, 0.7 * num_blocks)
    fig = Figure(figsize=(fig_width, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    edges = _Edges(full, alphas, kept)
    edges.draw(ax)
    _draw_nodes(ax, num_blocks, block_flops, edges.dead_blocks)
    fig.suptitle(title, fontsize=11)
    ax.set_title(edges.subtitle(num_blocks), fontsize=8.5, color="#404040", pad=2)
    _architecture_legend(fig, ax, kept is not None, block_flops is not None, fig_width)
    _save_png(fig, path)


class _Edges:
    """Every branch of the student as a line: (alpha, xs, ys), the pruned
    ones apart, with the counts the subtitle gives."""

    def __init__(self, full, alphas, kept):
        self.kept_plan = kept
        self.pruned, self.kept = [], []
        self.counts = {"universal": 0, "universal_kept": 0, "proxies": 0, "proxies_kept": 0}
        self.dead_blocks = set()
        self.max_skip = max([l + 1 - s for l, (_, ss) in enumerate(full) for s in ss],
                            default=1)
        for l, ((universal, sources), block_alphas) in enumerate(zip(full, alphas)):
            k_universal, k_sources = (universal, sources) if kept is None else kept[l]
            if kept is not None and not k_universal and not k_sources:
                self.dead_blocks.add(l)
            branches = ([("universal", l)] if universal else []) + [("proxy", s)
                                                                    for s in sources]
            for (kind, source), alpha in zip(branches, block_alphas):
                is_kept = k_universal if kind == "universal" else source in k_sources
                self.counts["universal" if kind == "universal" else "proxies"] += 1
                if is_kept:
                    self.counts["universal_kept" if kind == "universal"
                                else "proxies_kept"] += 1
                if kind == "universal":
                    xs, ys = [source, l + 1], [0.0, 0.0]
                else:
                    xs, ys = _arc(source, l + 1, self.arc_height(l + 1 - source))
                (self.kept if is_kept else self.pruned).append((alpha, xs, ys))

    def arc_height(self, skip: int) -> float:
        # Skip 1 (a proxy beside the universal branch) stays low; the longest
        # skip reaches 1.0, whatever max_skip is (dense plans included).
        if self.max_skip <= 1:
            return 0.35
        return 0.3 + 0.7 * (skip - 1) / (self.max_skip - 1)

    def draw(self, ax) -> None:
        """Pruned edges first, then the kept ones by increasing alpha so that
        the strongest branches lie on top; then the stem and head (no gate)."""
        cmap, norm = colormaps[_CMAP], Normalize(0.0, 1.0)
        for _, xs, ys in self.pruned:
            ax.plot(xs, ys, color=_PRUNED_COLOR, lw=0.9, ls=(0, (3, 2)), alpha=0.8,
                    solid_capstyle="round", zorder=1)
        for alpha, xs, ys in sorted(self.kept, key=lambda e: e[0]):
            clipped = min(max(alpha, 0.0), 1.0)
            ax.plot(xs, ys, color=cmap(norm(alpha)), lw=0.6 + 4.4 * clipped,
                    solid_capstyle="round", zorder=2 + clipped)

    def subtitle(self, num_blocks: int) -> str:
        counts = self.counts
        if self.kept_plan is None:
            return (f"{num_blocks} blocks: {counts['universal']} universal, "
                    f"{counts['proxies']} proxies (before pruning)")
        return (f"universal blocks kept {counts['universal_kept']}/{counts['universal']}, "
                f"proxies kept {counts['proxies_kept']}/{counts['proxies']}, "
                f"blocks removed {len(self.dead_blocks)}/{num_blocks}")


def _draw_nodes(ax, num_blocks: int, block_flops, dead_blocks: set) -> None:
    """The stem and head edges, nodes 'in', 0..L and 'head' (node l+1 is
    block l's output), their numbers and, when given, the blocks' FLOPs."""
    for xs in ([-1, 0], [num_blocks, num_blocks + 1]):
        ax.plot(xs, [0, 0], color=_FIXED_COLOR, lw=1.5, zorder=2)
    base = 70.0
    sizes = [base] * (num_blocks + 1)
    if block_flops is not None and max(block_flops) > 0:
        top = max(block_flops)
        sizes[1:] = [base * (0.45 + 1.8 * f / top) for f in block_flops]
    label_size = 7 if num_blocks > 10 else 8
    for n in range(num_blocks + 1):
        dead = n >= 1 and (n - 1) in dead_blocks
        ax.scatter([n], [0], s=sizes[n], marker="o", zorder=5,
                   facecolor="white" if dead else "#2b2b2b",
                   edgecolor=_PRUNED_COLOR if dead else "black", linewidths=1.2)
        ax.text(n, -0.12, str(n), ha="center", va="top", fontsize=label_size,
                color=_PRUNED_COLOR if dead else "black")
    for x, label in ((-1, "in"), (num_blocks + 1, "head")):
        ax.scatter([x], [0], s=150, marker="s", facecolor="#dddddd", edgecolor="black",
                   linewidths=1.0, zorder=5)
        ax.text(x, -0.12, label, ha="center", va="top", fontsize=8)
    if block_flops is not None:
        for l, f in enumerate(block_flops):
            ax.text(l + 1, -0.24, _flops_label(f), ha="center", va="top",
                    fontsize=label_size - 1.5, color="#606060")
    ax.set_xlim(-1.6, num_blocks + 1.6)
    ax.set_ylim(-0.36 if block_flops is not None else -0.26, 1.08)
    ax.set_axis_off()


def _architecture_legend(fig, ax, pruned: bool, with_flops: bool, fig_width: float) -> None:
    """The legend of line kinds below the plot and the gate colour bar."""
    cmap, norm = colormaps[_CMAP], Normalize(0.0, 1.0)
    mid = cmap(norm(0.6))
    handles = [Line2D([], [], color=mid, lw=3, label="universal branch"),
               _ArcHandle(color=mid, lw=1.8, label="proxy (higher arc = longer skip)")]
    if pruned:
        handles.append(Line2D([], [], color=_PRUNED_COLOR, lw=1, ls=(0, (3, 2)),
                              label="pruned branch"))
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="white",
                              markeredgecolor=_PRUNED_COLOR, label="removed block"))
    if with_flops:
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="#2b2b2b",
                              markeredgecolor="black",
                              label="block output (size ~ universal FLOPs)"))
    fig.legend(handles=handles, handler_map={_ArcHandle: _ArcHandler()},
               loc="outside lower center",
               ncol=len(handles) if fig_width >= 10 else min(len(handles), 3), fontsize=7,
               frameon=False, handlelength=2.4, columnspacing=1.5)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01,
                       aspect=16, shrink=0.85)
    bar.set_label("gate alpha", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _save_png(fig, path: str) -> None:
    with atomic.replacing_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)

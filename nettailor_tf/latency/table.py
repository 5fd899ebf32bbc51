"""Milliseconds per branch: the latency cost model (`--complexity_cost=latency`).

The paper prices a branch of the student by its multiply-adds.  On a phone
the price that matters is time, and time does not follow multiply-adds: a
small late block is bound by weight traffic, a depthwise convolution by
memory, and a 1x1 proxy at high resolution costs more than its FLOPs say.
A `LatencyTable` holds, for one backbone, image size and thread count, the
measured time of every branch the student can have:

  stem               uint8 image -> node 0 (the input's resize and the stem)
  universal<l>       node l -> the universal block l (BN folded)
  proxy<l>_from<s>   node s -> proxy of block l, added to the block's sum
  mix<l>             the block's gate scale and activation, paid by a live
                     block with more than one branch
  head               node L -> features -> logits and probabilities

Each branch is converted to float32 TFLite as a signature of one of a few
files (`latency_measure.SIGNATURES_PER_FILE` each; the files are kept in the
cache's converted/ folder for the next table of the same settings and code)
and timed with the LiteRT interpreter (batch 1, XNNPACK), every pass running
each branch once in the network's order with its inputs written just
before, so that a branch finds the CPU's caches as a forward pass leaves
them: its inputs there, its weights not (timed alone in a loop, a branch
kept its weights cached and the 64 px networks were predicted 27% too
fast).  One Invoke has a fixed cost that a whole network pays once, not
once per branch: the `empty` signature measures it, and it is taken off
every branch and added back once to a network's prediction.

Parts timed alone do not add up to the whole, and not by one factor.  A
pass over every branch of the full student cycles all of its weights and
working memory through the CPU's caches; a smaller network, run again and
again, keeps more of its own there.  Timed in the table's passes over every
branch, the parts of pruned EfficientNet-Lite0 networks at 64 px summed
12-33% above them, timed in passes over only their own branches -1% to +8%,
and the teachers' parts, close to the full student in size, +7-8% (a busy
2-core machine; docs/performance.md, "Latency predictions").  So the
factor from parts to network falls as a network gets smaller than the full
student:

  network = invoke + S * (base + slope * S / S_full)

where S is the sum of the network's parts (the stem, its universal blocks,
proxies and mixes, the head; each less one Invoke's fixed cost) and S_full
that of the full student.  (base, slope) are fitted by least squares on the
relative error of whole networks timed with the branches, interleaved with
them in the same rounds and under the same load check: the teacher's (every
universal block, no proxy), the full student's and `SAMPLE_PLANS` pruned
networks drawn from the full student with a fixed seed, whose plans the
table keeps (`calibration_plans`).  A table with only the teacher and the
full student (a phone's, format 2) fits both exactly.  On the same
timings, an earlier model (a factor for the universal path fitted on the
teacher, one for the proxies on the full student) over-predicted pruned
networks at 64 and 96 px by 4-40%, this one is within -1% to +6%; a fixed
offset instead of the share over-corrected the smallest networks.

A table measured elsewhere (a phone, a board) is read from JSON in the same
format (`benchmarks/latency_table.py` writes the per-branch files and turns
LiteRT's `benchmark_model` output into such a table; BUILD.md shows how).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform

import numpy as np

from nettailor_tf.common import atomic
from nettailor_tf.common.errors import NetTailorError

TABLE_FORMAT = 3  # 3: sampled pruned networks in the calibration, fitted with an offset
# Read too (a phone's table from an older benchmarks/latency_table.py); a
# cached table of an older format is measured again (latency_measure).
READABLE_FORMATS = (2, 3)
# Pruned networks timed with the branches for the calibration, on top of the
# teacher and the full student (one conversion each, 5-10 s at 64 px): the
# fit then rests on networks as small as the ones it predicts.
SAMPLE_PLANS = 4
# Timed passes over every branch: a branch takes 10-500 us at the sizes that
# train on a CPU, so 100 passes cost a second or two.  Not 200: on the
# quickstart's settings (EfficientNet-Lite0, 64 px), over 225 tables timed
# with the quickstart's four float32 networks while other processes kept
# 0.15-1.1 of 2 cores busy, a table of every other pass (100) predicted them
# as one of all 200 did (each network's error spread by 1.1-1.9 points
# either way, 221-222 of 225 tables within 10%); the spread comes from the
# machine between tables, not from the passes within one.
TABLE_RUNS = 100


class LatencyTableError(NetTailorError, ValueError):
    """A latency table that cannot be read or does not fit the run."""


def stem_key() -> str:
    return "stem"


def head_key() -> str:
    return "head"


def universal_key(l: int) -> str:
    return f"universal{l}"


def proxy_key(l: int, source: int) -> str:
    return f"proxy{l}_from{source}"


def mix_key(l: int) -> str:
    return f"mix{l}"


EMPTY_KEY = "empty"
# Whole networks timed with the branches, for the calibration.
NETWORK_PREFIX = "network_"
TEACHER_KEY = "network_teacher"
STUDENT_KEY = "network_student"


def sample_key(index: int) -> str:
    return f"{NETWORK_PREFIX}sample{index}"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How a table's parts become a network's time (see the module's doc):
    the factor base + slope * share, share = the network's parts over the
    full student's."""
    base: float
    slope: float
    full_ms: float  # S_full: the full student's parts, ms
    networks: int  # whole networks it was fitted on (0: none, raw parts)
    # Largest |predicted / measured - 1| over those networks.
    max_error: float | None

    def factor(self, parts_ms: float) -> float:
        return self.base + self.slope * parts_ms / self.full_ms if self.full_ms > 0 else self.base

    def as_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v)
                for k, v in dataclasses.asdict(self).items()}


class _BlockView:
    """A block of a plan kept in a table as JSON (`Plan` needs TensorFlow)."""

    def __init__(self, data: dict):
        self.universal = bool(data["universal"])
        self.proxy_sources = [int(s) for s in data["proxy_sources"]]


class _PlanView:
    def __init__(self, data: dict):
        self.blocks = [_BlockView(b) for b in data["blocks"]]


def plan_keys(plan) -> list[str]:
    """The entries a network of `plan` runs, in its order: the stem, per live
    block its universal block, proxies and (with more than one branch) mix,
    the head."""
    keys = [stem_key()]
    for l, block in enumerate(plan.blocks):
        keys += [universal_key(l)] if block.universal else []
        keys += [proxy_key(l, s) for s in block.proxy_sources]
        keys += [mix_key(l)] if block.universal + len(block.proxy_sources) > 1 else []
    return keys + [head_key()]


def plan_view(data: dict) -> _PlanView:
    """A plan kept as JSON (`plan_as_dict`), readable by the table without TensorFlow."""
    return _PlanView(data)


def plan_as_dict(plan) -> dict:
    """A plan as the table keeps it."""
    return {"blocks": [{"universal": bool(b.universal),
                        "proxy_sources": [int(s) for s in b.proxy_sources]}
                       for b in plan.blocks]}


@dataclasses.dataclass
class LatencyTable:
    """Median milliseconds of every branch, for one backbone, image size and
    thread count (`entries`, raw: each includes one Invoke's fixed cost,
    `entries['empty']`)."""
    backbone: str
    image_size: int
    threads: int
    max_skip: int | None
    entries: dict[str, float]
    device: str
    source: str = "measured"  # "measured" here, or the file it was read from
    # Cores other processes kept busy while the branches were timed (None:
    # unknown, e.g. a table from a phone).
    other_load_cores: float | None = None
    # {entry key of a whole network: its plan (`plan_as_dict`)}: the
    # calibration networks beyond the teacher and the full student.
    calibration_plans: dict = dataclasses.field(default_factory=dict)
    format: int = TABLE_FORMAT

    @property
    def stale(self) -> bool:
        """Made by an older version whose predictions this one does not make."""
        return self.format != TABLE_FORMAT

    @property
    def invoke_ms(self) -> float:
        return self.entries.get(EMPTY_KEY, 0.0)

    def raw_cost_ms(self, key: str) -> float:
        """A branch's time alone: its measured median less one Invoke's fixed cost."""
        if key not in self.entries:
            raise LatencyTableError(f"the latency table ({self.source}) has no entry {key!r}: it "
                                    f"was made for another network; measure it again")
        return max(self.entries[key] - self.invoke_ms, 0.0)

    def cost_ms(self, key: str) -> float:
        """A branch's time inside the full student (the factor at share 1):
        what the complexity loss prices a branch by, relative to the others."""
        calibration = self.calibration()
        return self.raw_cost_ms(key) * calibration.factor(calibration.full_ms)

    def calibration(self) -> Calibration:
        """The fit of the parts to the whole networks timed with them; factor
        1 for a table without whole-network timings."""
        cached = self.__dict__.get("_calibration")
        key = tuple(sorted(self.entries.items()))
        if cached is None or cached[0] != key:
            cached = (key, self._fit())
            self.__dict__["_calibration"] = cached  # not a field: not saved
        return cached[1]

    def calibration_networks(self) -> dict:
        """{entry key: plan} of every whole network timed with the branches."""
        plans = {key: _PlanView(data) for key, data in self.calibration_plans.items()
                 if key in self.entries}
        if TEACHER_KEY in self.entries and STUDENT_KEY in self.entries:
            num_blocks = sum(k.startswith("universal") for k in self.entries)
            plans[TEACHER_KEY] = _PlanView({"blocks": [
                {"universal": True, "proxy_sources": []} for _ in range(num_blocks)]})
            plans[STUDENT_KEY] = _PlanView({"blocks": [
                {"universal": True, "proxy_sources": self._sources(l)}
                for l in range(num_blocks)]})
        return plans

    def _sources(self, l: int) -> list[int]:
        """The proxies the table has for block l: the full student's."""
        prefix = f"proxy{l}_from"
        return sorted((int(k[len(prefix):]) for k in self.entries if k.startswith(prefix)),
                      reverse=True)

    def parts_ms(self, plan) -> float:
        """The sum of `plan`'s parts: stem, live branches, mixes, head (each
        less one Invoke's fixed cost)."""
        return sum(self.raw_cost_ms(key) for key in plan_keys(plan))

    def _fit(self) -> Calibration:
        networks = self.calibration_networks()
        if TEACHER_KEY not in networks:
            return Calibration(1.0, 0.0, 0.0, 0, None)
        parts = {key: self.parts_ms(plan) for key, plan in networks.items()}
        measured = {key: self.entries[key] - self.invoke_ms for key in networks}
        full = parts[STUDENT_KEY]
        if min(measured.values()) <= 0 or min(parts.values()) <= 0:
            return Calibration(1.0, 0.0, full, 0, None)
        base, slope = _least_squares(parts, measured, full)
        calibration = Calibration(base, slope, full, len(networks), None)
        error = max(abs(parts[key] * calibration.factor(parts[key]) / measured[key] - 1)
                    for key in networks)
        return dataclasses.replace(calibration, max_error=error)

    def branch_costs(self, plan) -> list[list[float]]:
        """Milliseconds of every branch of `plan`, universal first, per block
        (what `complexity.branch_flops` gives in multiply-adds)."""
        costs = []
        for l, block in enumerate(plan.blocks):
            row = [self.cost_ms(universal_key(l))] if block.universal else []
            row += [self.cost_ms(proxy_key(l, s)) for s in block.proxy_sources]
            costs.append(row)
        return costs

    def universal_network_ms(self, num_blocks: int) -> float:
        """Stem plus every universal block: the normaliser of the complexity loss."""
        return self.cost_ms(stem_key()) + sum(self.cost_ms(universal_key(l))
                                              for l in range(num_blocks))

    def predict_ms(self, plan) -> float:
        """The latency of the static network of `plan`: one Invoke, and its
        parts (stem, every live branch and block, head) times the factor of
        a network of their size."""
        parts = self.parts_ms(plan)
        return self.invoke_ms + parts * self.calibration().factor(parts)

    def fingerprint(self) -> str:
        """sha256 of what the table says (not where it came from)."""
        content = {k: v for k, v in self.to_dict().items()
                   if k not in ("source", "other_load_cores")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic.write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as error:
            raise LatencyTableError(f"--latency_table={path} cannot be read "
                                    f"({error.strerror or type(error).__name__})") from None
        except ValueError:
            raise LatencyTableError(f"--latency_table={path} is not JSON; expected a table "
                                    f"written by benchmarks/latency_table.py") from None
        if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
            raise LatencyTableError(f"--latency_table={path}: expected format "
                                    f"{' or '.join(map(str, READABLE_FORMATS))} "
                                    f"(benchmarks/latency_table.py), got "
                                    f"{data.get('format') if isinstance(data, dict) else data!r}")
        try:
            entries = {str(k): float(v) for k, v in data["entries"].items()}
            table = cls(backbone=str(data["backbone"]), image_size=int(data["image_size"]),
                        threads=int(data["threads"]),
                        max_skip=None if data.get("max_skip") is None else int(data["max_skip"]),
                        entries=entries, device=str(data.get("device", "unknown")),
                        source=os.path.abspath(path),
                        other_load_cores=data.get("other_load_cores"),
                        calibration_plans={str(k): plan_as_dict(_PlanView(v)) for k, v in
                                           data.get("calibration_plans", {}).items()},
                        format=int(data["format"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise LatencyTableError(f"--latency_table={path}: missing or malformed field "
                                    f"({type(error).__name__}: {error})") from None
        bad = sorted(k for k, v in entries.items() if not (v >= 0 and v < 1e6))
        if bad:
            raise LatencyTableError(f"--latency_table={path}: entries {bad[:3]} are not "
                                    f"milliseconds >= 0")
        return table

    def check_fits(self, backbone: str, image_size: int, max_skip: int | None) -> None:
        if (self.backbone, self.image_size, self.max_skip) != (backbone, image_size, max_skip):
            raise LatencyTableError(
                f"the latency table {self.source} was measured for {self.backbone} at "
                f"{self.image_size} px with max_skip={self.max_skip}, not {backbone} at "
                f"{image_size} px with max_skip={max_skip}; measure one for these settings "
                f"(benchmarks/latency_table.py)")


def this_device() -> str:
    """The CPU this process runs on, as a person would name it."""
    name = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


CACHE_ENV = "NETTAILOR_TF_CACHE"


def default_cache_dir() -> str:
    """$NETTAILOR_TF_CACHE/latency_tables, else under $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return os.path.join(os.environ[CACHE_ENV], "latency_tables")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nettailor_tf", "latency_tables")


def _least_squares(parts: dict, measured: dict, full: float) -> tuple[float, float]:
    """(base, slope) minimising the relative errors of parts * (base + slope
    * parts / full) against `measured`.  A fit under which a network with
    fewer parts would be predicted slower (base <= 0 or base + 2 slope <= 0:
    too few or too alike networks, or noise) gives way to one factor."""
    keys = sorted(parts)
    weights = np.array([1.0 / measured[k] for k in keys])
    design = np.array([[parts[k], parts[k] ** 2 / full] for k in keys]) * weights[:, None]
    target = np.array([measured[k] for k in keys]) * weights
    base, slope = np.linalg.lstsq(design, target, rcond=None)[0]
    if base > 0 and base + 2 * slope > 0:
        return float(base), float(slope)
    return float(np.mean([measured[k] / parts[k] for k in keys])), 0.0

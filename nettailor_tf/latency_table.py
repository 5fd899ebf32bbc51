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

Each branch is converted to float32 TFLite as one signature of one file and
timed with the LiteRT interpreter (batch 1, XNNPACK), every pass running
each branch once in the network's order with its inputs written just
before, so that a branch finds the CPU's caches as a forward pass leaves
them: its inputs there, its weights not (timed alone in a loop, a branch
kept its weights cached and the 64 px networks were predicted 27% too
fast).  One Invoke has a fixed cost that a whole network pays once, not
once per branch: the `empty` signature measures it, and it is taken off
every branch and added back once to a network's prediction.

Parts timed alone do not add up to the whole: inside one network a block
reads an input that the block before it has just written, and the runtime
plans one memory arena for all of them (at 160 px on EfficientNet-Lite0 the
sum of the parts was 12-23% above the whole networks; calibrated, the
predictions of pruned networks are within 9% at 64 and 160 px).  So two whole
networks are timed with the branches, the teacher's (every universal block,
no proxy) and the full student's (every branch), and the table is calibrated
on them: one factor for the universal path (stem, universal blocks, head),
fitted so that the teacher's prediction is its measurement, and one for the
proxies and mixes, fitted on the full student.  A pruned network lies
between the two, and is predicted from the calibrated parts.

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

from nettailor_tf import atomic
from nettailor_tf.errors import NetTailorError

TABLE_FORMAT = 2  # 2: whole networks timed for the calibration
# Timed passes over every branch: a branch takes 10-500 us at the sizes that
# train on a CPU, so 200 passes cost seconds.
TABLE_RUNS = 200


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
TEACHER_KEY = "network_teacher"
STUDENT_KEY = "network_student"


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
        """A branch's time inside a network: calibrated (see the module's doc)."""
        universal, proxies = self.calibration()
        is_universal = key in (stem_key(), head_key()) or key.startswith("universal")
        return self.raw_cost_ms(key) * (universal if is_universal else proxies)

    def calibration(self) -> tuple[float, float]:
        """(universal path factor, proxy and mix factor); (1, 1) for a table
        without whole-network timings."""
        if TEACHER_KEY not in self.entries or STUDENT_KEY not in self.entries:
            return 1.0, 1.0
        num_blocks = sum(k.startswith("universal") for k in self.entries)
        path = sum(self.raw_cost_ms(k) for k in self.entries
                   if k in (stem_key(), head_key()) or k.startswith("universal"))
        rest = sum(self.raw_cost_ms(k) for k in self.entries if k.startswith(("proxy", "mix")))
        if path <= 0 or num_blocks == 0:
            return 1.0, 1.0
        universal = (self.entries[TEACHER_KEY] - self.invoke_ms) / path
        # The full student pays every proxy and, in every block, a mix.
        proxies = ((self.entries[STUDENT_KEY] - self.invoke_ms - universal * path) / rest
                   if rest > 0 else universal)
        # A fit that says the proxies cost nothing (or less than nothing) is
        # noise: keep their relation to the universal path as measured.
        return universal, proxies if proxies > 0.1 * universal else universal

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
        """The latency of the static network of `plan`: one Invoke, the stem,
        every live branch and block, the head."""
        total = self.invoke_ms + self.cost_ms(stem_key()) + self.cost_ms(head_key())
        for l, row in enumerate(self.branch_costs(plan)):
            total += sum(row)
            if len(row) > 1:
                total += self.cost_ms(mix_key(l))
        return total

    def fingerprint(self) -> str:
        """sha256 of what the table says (not where it came from)."""
        content = {k: v for k, v in self.to_dict().items()
                   if k not in ("source", "other_load_cores")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, **dataclasses.asdict(self)}

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
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"--latency_table={path}: expected format {TABLE_FORMAT} "
                                    f"(benchmarks/latency_table.py), got "
                                    f"{data.get('format') if isinstance(data, dict) else data!r}")
        try:
            entries = {str(k): float(v) for k, v in data["entries"].items()}
            table = cls(backbone=str(data["backbone"]), image_size=int(data["image_size"]),
                        threads=int(data["threads"]),
                        max_skip=None if data.get("max_skip") is None else int(data["max_skip"]),
                        entries=entries, device=str(data.get("device", "unknown")),
                        source=os.path.abspath(path),
                        other_load_cores=data.get("other_load_cores"))
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

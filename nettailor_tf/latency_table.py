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
import tempfile

import numpy as np

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


# --- the branches as small networks ------------------------------------------------

def branch_functions(student, image_size: int) -> dict:
    """{entry key: (tf.function, its input specs)} for every branch of the
    full `student` (BN-folded, as exported), each on static batch-1 shapes."""
    import tensorflow as tf

    from exporters import savedmodel
    from nettailor_tf import prune as prune_lib
    from nettailor_tf.layers import apply_activation, fold_batchnorm

    nodes = [student.stem(tf.zeros((1, image_size, image_size, 3)))]
    for l in range(len(student.plan.blocks)):
        nodes.append(student.block(l).universal(nodes[l]))
    shapes = [tuple(n.shape) for n in nodes]
    spec = lambda shape, dtype=tf.float32, name="x": tf.TensorSpec(shape, dtype, name=name)
    functions = {}

    def add(key, fn, specs):
        functions[key] = (tf.function(fn, input_signature=specs, autograph=False), specs)

    add(EMPTY_KEY, lambda x: {"y": x * 2.0}, [spec((1, 1, 1, 8))])
    stem = student.stem
    add(stem_key(), lambda images: {"y": stem(savedmodel.preprocess(images, image_size, False))},
        [spec((1, image_size, image_size, 3), tf.uint8, savedmodel.INPUT_NAME)])
    # Factories, not default arguments: a tf.function signature must list
    # only the tensors it takes.
    def universal_fn(layer):
        return lambda x: {"y": layer(x)}

    def proxy_fn(layer):
        return lambda x, y: {"z": layer(x) + y}

    def mix_fn(scale, activation):
        return lambda x: {"y": apply_activation(scale(x), activation)}

    for l in range(len(student.plan.blocks)):
        block = student.block(l)
        add(universal_key(l), universal_fn(block.universal), [spec(shapes[l])])
        for proxy, source in zip(block.proxies, student.plan.blocks[l].proxy_sources):
            folded = fold_batchnorm(proxy, (None, None, None, shapes[source][-1]))
            add(proxy_key(l, source), proxy_fn(folded),
                [spec(shapes[source]), spec(shapes[l + 1], name="y")])
        add(mix_key(l), mix_fn(prune_lib.Scale(0.5), block.activation), [spec(shapes[l + 1])])
    head, classifier = student.head, student.classifier

    def head_fn(x):
        logits = classifier(head(x))
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    add(head_key(), head_fn, [spec(shapes[-1])])
    return functions


def convert_functions(functions: dict) -> bytes:
    """One float32 .tflite with a signature per entry of `functions`."""
    import keras
    import tensorflow as tf

    from nettailor_tf import quiet

    # Keras' archive tracks the variables each endpoint captures (a bare
    # tf.Module would refuse the untracked Keras variables).
    archive = keras.export.ExportArchive()
    for key, (fn, specs) in functions.items():
        archive.add_endpoint(name=key, fn=fn, input_signature=specs)
    with tempfile.TemporaryDirectory(prefix="nettailor_latency_") as folder:
        with quiet.native_stderr_filtered():
            archive.write_out(folder, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(
                folder, signature_keys=list(functions))
            return converter.convert()


def _feeds(functions: dict, seed: int = 0) -> dict:
    """Random inputs per signature: uint8 images, activations N(0, 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for key, (_, specs) in functions.items():
        feeds[key] = {s.name: (rng.integers(0, 256, s.shape, dtype=np.uint8)
                               if s.dtype.name == "uint8"
                               else rng.standard_normal(s.shape).astype(np.float32))
                      for s in specs}
    return feeds


def measure_table(backbone_name: str, image_size: int, threads: int, max_skip: int | None,
                  runs: int = TABLE_RUNS, warmup: int = 10) -> LatencyTable:
    """Times every branch of `backbone_name`'s student here (random weights:
    float32 time does not depend on the values)."""
    from exporters import latency as latency_lib
    from nettailor_tf import backbones as backbones_lib
    from nettailor_tf import quiet
    from nettailor_tf import student as student_lib

    backbone = backbones_lib.build_backbone(backbone_name)
    plan = student_lib.Plan.full(len(backbone.blocks), max_skip)
    student = student_lib.build_student(backbone, 10, plan, "frozen", image_size)
    functions = branch_functions(student, image_size)
    content = convert_functions(functions)
    with tempfile.TemporaryDirectory(prefix="nettailor_latency_") as folder:
        path = os.path.join(folder, "branches.tflite")
        with open(path, "wb") as f:
            f.write(content)
        networks = whole_networks(backbone, max_skip, image_size, folder)
        image = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3),
                                                  dtype=np.uint8)
        with quiet.native_stderr_filtered():
            measured = latency_lib.measure_signatures(path, _feeds(functions), threads, warmup,
                                                      runs)
            measured.update(latency_lib.measure_many(networks, image, threads, warmup, runs))
    loads = [v.other_load_cores for v in measured.values() if v.other_load_cores is not None]
    return LatencyTable(backbone=backbone_name, image_size=image_size, threads=threads,
                        max_skip=max_skip,
                        entries={k: round(v.median_ms, 5) for k, v in measured.items()},
                        device=this_device(), other_load_cores=max(loads) if loads else None)


def whole_network_content(backbone, plan, image_size: int, num_classes: int = 10) -> bytes:
    """The float32 .tflite of `plan`'s static network, as the export stage
    writes it (random weights)."""
    from exporters import savedmodel, tflite
    from nettailor_tf import prune as prune_lib
    from nettailor_tf import student as student_lib

    student = student_lib.build_student(backbone, num_classes, plan, "frozen", image_size)
    endpoint = savedmodel.Endpoint(prune_lib.static_model(student), image_size, False)
    with tflite.static_savedmodel({savedmodel.SERVING_KEY: endpoint}) as static:
        return tflite.convert(static, [savedmodel.SERVING_KEY], "float32")


def whole_networks(backbone, max_skip, image_size: int, folder: str) -> dict:
    """{TEACHER_KEY, STUDENT_KEY: (path, signature key)} of the two networks
    the table is calibrated on, written into `folder`."""
    from exporters import savedmodel
    from nettailor_tf import student as student_lib

    num_blocks = len(backbone.blocks)
    files = {}
    for key, plan in ((TEACHER_KEY, student_lib.Plan.backbone_only(num_blocks)),
                      (STUDENT_KEY, student_lib.Plan.full(num_blocks, max_skip))):
        path = os.path.join(folder, f"{key}.tflite")
        with open(path, "wb") as f:
            f.write(whole_network_content(backbone, plan, image_size))
        files[key] = (path, savedmodel.SERVING_KEY)
    return files


CACHE_ENV = "NETTAILOR_TF_CACHE"


def default_cache_dir() -> str:
    """$NETTAILOR_TF_CACHE/latency_tables, else under $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return os.path.join(os.environ[CACHE_ENV], "latency_tables")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nettailor_tf", "latency_tables")


def cached_table(backbone_name: str, image_size: int, threads: int, max_skip: int | None,
                 cache_dir: str | None = None) -> tuple[LatencyTable, bool]:
    """The table of this machine for these settings, measured once and kept
    in `cache_dir`; returns it and whether it was read from the cache."""
    from ai_edge_litert import __version__ as litert_version  # the runtime timed

    cache_dir = cache_dir or default_cache_dir()
    device = this_device()
    name = "_".join([backbone_name, str(image_size), f"t{threads}",
                     f"skip{'dense' if max_skip is None else max_skip}",
                     hashlib.sha256(f"{device}|{litert_version}".encode()).hexdigest()[:10]])
    path = os.path.join(cache_dir, f"{name}.json")
    if os.path.exists(path):
        try:
            table = LatencyTable.load(path)
            table.check_fits(backbone_name, image_size, max_skip)
            # Kept even if it was measured on a busy machine (its load is
            # recorded): a table that changed under a finished student would
            # make it stale.  Delete the file to measure again.
            if table.threads == threads:
                return table, True
        except LatencyTableError:
            pass  # a damaged cache entry is measured again
    table = measure_table(backbone_name, image_size, threads, max_skip)
    table.save(path)
    table.source = path
    return table, False

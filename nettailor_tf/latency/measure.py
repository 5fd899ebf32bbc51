"""Measuring a latency table on this machine: every branch of the student as
a signature of a float32 .tflite (a few files of ten), timed with LiteRT,
interleaved with the whole networks the table is calibrated on
(`nettailor_tf.latency.table`
holds the table itself and how it predicts; this module needs TensorFlow,
the table does not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert import __version__ as litert_version  # the runtime timed

from exporters import timing
from exporters import savedmodel, tflite
from nettailor_tf.model import backbones as backbones_lib
from nettailor_tf.model import pruning
from nettailor_tf.model import static_graph
from nettailor_tf.common import atomic, quiet
from nettailor_tf.model import student_network
from nettailor_tf.model import blocks as blocks_lib
from nettailor_tf.model import layers as layers_lib
from nettailor_tf.latency import file_cache
from nettailor_tf.latency import table as table_lib
from nettailor_tf.latency.table import (EMPTY_KEY, SAMPLE_PLANS, STUDENT_KEY, TABLE_FORMAT,
                                        TABLE_RUNS, TEACHER_KEY, LatencyTable, LatencyTableError,
                                        default_cache_dir, head_key, mix_key, plan_as_dict,
                                        plan_keys,
                                        proxy_key, sample_key, stem_key, this_device,
                                        universal_key)
from nettailor_tf.model.blocks import NetTailorBlock
from nettailor_tf.model.layers import apply_activation, fold_batchnorm


def branch_functions(student, image_size: int) -> dict:
    """{entry key: (tf.function, its input specs)} for every branch of the
    full `student` (BN-folded, as exported), each on static batch-1 shapes."""
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
        add(mix_key(l), mix_fn(static_graph.Scale(0.5), block.activation), [spec(shapes[l + 1])])
    head, classifier = student.head, student.classifier

    def head_fn(x):
        logits = classifier(head(x))
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    add(head_key(), head_fn, [spec(shapes[-1])])
    return functions


def convert_functions(functions: dict) -> bytes:
    """One float32 .tflite with a signature per entry of `functions`."""
    # Keras' archive tracks the variables each endpoint captures (a bare
    # tf.Module would refuse the untracked Keras variables).
    archive = keras.export.ExportArchive()
    for key, (fn, specs) in functions.items():
        archive.add_endpoint(name=key, fn=fn, input_signature=specs)
    with tempfile.TemporaryDirectory(prefix="nettailor_latency_") as folder:
        with quiet.native_stderr_filtered(), tflite.collecting_new_objects_only():
            archive.write_out(folder, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(
                folder, signature_keys=list(functions))
            return converter.convert()


# Signatures per converted file of the table: the converter's time grows
# faster than the number of signatures of a file (the 80 branches of
# EfficientNet-Lite0 at 64 px, converted back to back on a busy 2-core
# machine: 34 s as one file, 20-26 s as eight files of ten, 22 s as four of
# twenty); the passes run the parts in the same order, one interpreter per file.
SIGNATURES_PER_FILE = 10


def write_grouped(functions: dict, folder: str, prefix: str,
                  per_file: int = SIGNATURES_PER_FILE) -> dict[str, str]:
    """Converts `functions` into float32 files of `per_file` signatures each,
    written into `folder`; returns {signature key: file}."""
    keys = list(functions)
    files = {}
    for start in range(0, len(keys), per_file):
        group = keys[start:start + per_file]
        path = os.path.join(folder, f"{prefix}{start // per_file}.tflite")
        with open(path, "wb") as f:
            f.write(convert_functions({key: functions[key] for key in group}))
        files.update({key: path for key in group})
    return files


def input_specs(functions: dict) -> dict:
    """{key: [(input name, shape, dtype name)]} of `functions`' signatures."""
    return {key: [(spec.name, tuple(spec.shape), spec.dtype.name) for spec in specs]
            for key, (_, specs) in functions.items()}


def branch_feeds(inputs: dict, seed: int = 0) -> dict:
    """Random inputs per signature of `inputs` (`input_specs`): uint8
    images, activations N(0, 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for key, specs in inputs.items():
        feeds[key] = {name: (rng.integers(0, 256, shape, dtype=np.uint8) if dtype == "uint8"
                             else rng.standard_normal(shape).astype(np.float32))
                      for name, shape, dtype in specs}
    return feeds


def measure_table(backbone_name: str, image_size: int, threads: int, max_skip: int | None,
                  runs: int = TABLE_RUNS, warmup: int = 10,
                  cache_dir: str | None = None) -> LatencyTable:
    """Times every branch of `backbone_name`'s student here, interleaved with
    the calibration networks under one load check (random weights: float32
    time does not depend on the values); the converted files are kept in
    `cache_dir` (`table_files`)."""
    return measure_table_beside(backbone_name, image_size, threads, max_skip, {}, runs,
                                warmup, cache_dir)[0]


def measure_table_beside(backbone_name: str, image_size: int, threads: int,
                         max_skip: int | None, others: dict, runs: int = TABLE_RUNS,
                         warmup: int = 10, cache_dir: str | None = None
                         ) -> tuple[LatencyTable, dict]:
    """`measure_table`, with the networks `others` ({name: (path, signature
    key)}, on a uint8 image) timed in the same rounds and load check: the
    table and the networks it predicts under the same conditions.  Returns
    the table (which they do not enter) and {name: Latency}.  The branches'
    and calibration networks' files come from `cache_dir` where a run
    converted them (`table_files`)."""
    with table_files(backbone_name, image_size, max_skip, cache_dir) as files:
        image = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3),
                                                  dtype=np.uint8)
        with quiet.native_stderr_filtered():
            measured = timing.measure_parts_and_networks(
                files.parts, branch_feeds(files.inputs),
                {**{key: (path, key) for key, path in files.networks.items()}, **others},
                image, threads, warmup, runs)
    beside = {name: measured.pop(name) for name in others}
    loads = [v.other_load_cores for v in measured.values() if v.other_load_cores is not None]
    table = LatencyTable(backbone=backbone_name, image_size=image_size, threads=threads,
                         max_skip=max_skip,
                         entries={k: round(v.median_ms, 5) for k, v in measured.items()},
                         device=this_device(), other_load_cores=max(loads) if loads else None,
                         calibration_plans=files.calibration_plans)
    return table, beside


# Version of the converted files' manifest (`table_files`).
FILES_FORMAT = 1
_MANIFEST = "manifest.json"


@dataclasses.dataclass
class TableFiles:
    """The converted files a table times: its branches ({key: file}, in a
    network's order) with their inputs (`input_specs`), its calibration
    networks ({key: file}, the key also the signature's) and the sampled
    networks' plans (`plan_as_dict`)."""
    parts: dict[str, str]
    inputs: dict[str, list]
    networks: dict[str, str]
    calibration_plans: dict
    cached: bool = False


def files_fingerprint(per_file: int = SIGNATURES_PER_FILE) -> str:
    """What the converted files depend on besides the settings: the code
    that builds and converts them, TensorFlow's and Keras' versions, the
    grouping (not the device: a float32 .tflite is the same everywhere)."""
    digest = hashlib.sha256(f"{FILES_FORMAT}|{tf.__version__}|{keras.__version__}|"
                            f"{per_file}".encode())
    for module in (__file__, table_lib.__file__, backbones_lib.__file__, blocks_lib.__file__,
                   layers_lib.__file__, pruning.__file__, static_graph.__file__,
                   student_network.__file__, savedmodel.__file__):
        with open(module, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


# Converting is most of a table's cost (busy 2-core machine,
# EfficientNet-Lite0 at 64 px: building the student and its tf.functions
# ~30 s, converting the branches and the calibration networks ~150 s, the
# timing ~14 s); the files depend on the settings and the code only, so
# a second table (the benchmark stage's after a latency-priced student's, or
# the next run's) finds them in the cache and only times them.
@contextlib.contextmanager
def table_files(backbone_name: str, image_size: int, max_skip: int | None,
                cache_dir: str | None = None, per_file: int = SIGNATURES_PER_FILE):
    """Yields the `TableFiles` of these settings: read from `cache_dir`
    where a run converted them, else converted now and kept there (without
    a `cache_dir`, in a temporary folder deleted on exit)."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="nettailor_latency_") as folder:
            _convert_table_files(backbone_name, image_size, max_skip, folder, per_file)
            yield _read_table_files(folder)
        return
    name = "_".join([backbone_name, str(image_size),
                     f"skip{'dense' if max_skip is None else max_skip}",
                     files_fingerprint(per_file)])
    folder, cached = file_cache.cached_folder(
        os.path.join(cache_dir, "converted"), name, _MANIFEST,
        lambda staging: _convert_table_files(backbone_name, image_size, max_skip, staging,
                                             per_file),
        lambda folder: _read_table_files(folder) is not None)
    files = _read_table_files(folder)
    if files is None:
        raise LatencyTableError(f"the latency table's files in {folder} cannot be read "
                                f"back; delete the folder and run again")
    files.cached = cached
    yield files


def _convert_table_files(backbone_name: str, image_size: int, max_skip: int | None,
                         folder: str, per_file: int) -> None:
    """Builds the full student and writes its branches and calibration
    networks into `folder`, with the manifest `_read_table_files` reads."""
    backbone = backbones_lib.build_backbone(backbone_name)
    plan = student_network.Plan.full(len(backbone.blocks), max_skip)
    student = student_network.build_student(backbone, 10, plan, "frozen", image_size)
    functions = branch_functions(student, image_size)
    samples = sample_plans(len(backbone.blocks), max_skip)
    parts = write_grouped(functions, folder, "branches", per_file)
    networks = write_grouped(network_functions(student, max_skip, image_size, samples), folder,
                             "networks", per_file)
    inputs = input_specs(functions)
    manifest = {
        "format": FILES_FORMAT, "backbone": backbone_name, "image_size": image_size,
        "max_skip": max_skip,
        "branches": [[key, os.path.basename(parts[key]), [list(i) for i in inputs[key]]]
                     for key in functions],
        "networks": {key: os.path.basename(path) for key, path in networks.items()},
        "calibration_plans": {key: plan_as_dict(p) for key, p in samples.items()}}
    atomic.write_text(os.path.join(folder, _MANIFEST), json.dumps(manifest, indent=1) + "\n")


def _read_table_files(folder: str) -> TableFiles | None:
    """The files in `folder` by its manifest; None where it is missing,
    of another format or names a file that is not there."""
    try:
        with open(os.path.join(folder, _MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != FILES_FORMAT:
            return None
        files = TableFiles(
            parts={key: os.path.join(folder, file) for key, file, _ in manifest["branches"]},
            inputs={key: [(name, tuple(shape), dtype) for name, shape, dtype in specs]
                    for key, _, specs in manifest["branches"]},
            networks={key: os.path.join(folder, file)
                      for key, file in manifest["networks"].items()},
            calibration_plans=manifest["calibration_plans"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    every = [*files.parts.values(), *files.networks.values()]
    return files if all(os.path.isfile(path) for path in every) else None


def parts_by_pass(backbone_name: str, image_size: int, threads: int, max_skip: int | None,
                  plans: dict, runs: int = TABLE_RUNS, rounds: int = 3) -> dict:
    """Why the table's parts over-count a small network: {name: (sum of its
    parts timed in passes over every branch, the same in passes over only
    its own branches)}, ms with one Invoke, the two passes alternating
    `rounds` times (medians over the rounds)."""
    backbone = backbones_lib.build_backbone(backbone_name)
    student = student_network.build_student(
        backbone, 10, student_network.Plan.full(len(backbone.blocks), max_skip), "frozen",
        image_size)
    functions = branch_functions(student, image_size)
    feeds = branch_feeds(input_specs(functions))
    sums = {name: ([], []) for name in plans}
    with tempfile.TemporaryDirectory(prefix="nettailor_latency_") as folder:
        path = os.path.join(folder, "branches.tflite")
        with open(path, "wb") as f:
            f.write(convert_functions(functions))
        with quiet.native_stderr_filtered():
            for _ in range(rounds):
                every = timing.measure_signatures(path, feeds, threads, runs=runs)
                for name, plan in plans.items():
                    keys = [EMPTY_KEY, *plan_keys(plan)]
                    own = timing.measure_signatures(path, {k: feeds[k] for k in keys},
                                                         threads, runs=runs)
                    for timed, out in ((every, sums[name][0]), (own, sums[name][1])):
                        invoke = timed[EMPTY_KEY].median_ms
                        out.append(invoke + sum(timed[k].median_ms - invoke for k in keys[1:]))
    return {name: (float(np.median(every)), float(np.median(own)))
            for name, (every, own) in sums.items()}


# (share of universal blocks kept, share of proxies kept) of each sampled
# calibration network: from the search's lean networks (a quarter of the
# universal blocks) to nearly the full student.
SAMPLE_KEEP = ((0.25, 0.6), (0.5, 0.3), (0.4, 0.5), (0.75, 0.7))


def sample_plans(num_blocks: int, max_skip: int | None, count: int = SAMPLE_PLANS,
                 seed: int = 0) -> dict:
    """{entry key: Plan} of `count` pruned networks drawn from the full
    student with a fixed seed (the same for every table), every block kept
    live and dead paths removed as pruning removes them."""
    rng = np.random.default_rng(seed)
    full = student_network.Plan.full(num_blocks, max_skip)
    plans = {}
    for index in range(count):
        keep_universal, keep_proxy = SAMPLE_KEEP[index % len(SAMPLE_KEEP)]
        blocks = []
        for block in full.blocks:
            universal = bool(rng.random() < keep_universal)
            sources = [s for s in block.proxy_sources if rng.random() < keep_proxy]
            if not universal and not sources:
                sources = [block.proxy_sources[int(rng.integers(len(block.proxy_sources)))]]
            blocks.append(student_network.BlockPlan(universal, sources))
        plans[sample_key(index)] = pruning.remove_dead_paths(student_network.Plan(blocks))
    return plans


def network_functions(student, max_skip: int | None, image_size: int,
                      samples: dict | None = None) -> dict:
    """{TEACHER_KEY, STUDENT_KEY, every key of `samples` ({key: Plan}):
    (tf.function, its input specs)}: the static serving function of each
    calibration network, as the export stage writes it, built from the full
    `student`'s layers (one BN fold of each universal layer, shared: random
    weights, and float32 time does not depend on them) instead of a student
    built per network, which cost ~2 s apiece."""
    num_blocks = len(student.plan.blocks)
    plans = {TEACHER_KEY: student_network.Plan.backbone_only(num_blocks),
             STUDENT_KEY: student_network.Plan.full(num_blocks, max_skip), **(samples or {})}
    universal = static_graph.UniversalLayers()
    functions = {}
    for key, plan in plans.items():
        model = static_graph.static_model(_sub_student(student, plan), universal=universal)
        serve = savedmodel.serving_function(savedmodel.Endpoint(model, image_size, False),
                                            static=True)
        functions[key] = (serve, list(serve.input_signature))
    return functions


def _sub_student(full, plan):
    """A student of `plan` (a subset of `full`'s branches) over `full`'s
    stem, universal blocks, proxies, head and classifier, with fresh gates."""
    blocks = []
    for l, block_plan in enumerate(plan.blocks):
        if not block_plan.live:
            blocks.append(None)
            continue
        block = full.block(l)
        proxies = dict(zip(full.plan.blocks[l].proxy_sources, block.proxies))
        tailored = NetTailorBlock(block.universal if block_plan.universal else None,
                                  [proxies[s] for s in block_plan.proxy_sources],
                                  block.activation, name=f"tailored{l}")
        tailored.gate.build()
        blocks.append(tailored)
    student = student_network.Student(full.stem, blocks, full.head, full.classifier, plan,
                                  full.head_trainable, name="student")
    student.node_channels = full.node_channels
    return student


def whole_network_content(backbone, plan, image_size: int, num_classes: int = 10) -> bytes:
    """The float32 .tflite of `plan`'s static network, as the export stage
    writes it (random weights)."""
    endpoint = _random_endpoint(backbone, plan, image_size, num_classes)
    with tflite.static_savedmodel({savedmodel.SERVING_KEY: endpoint}) as static:
        return tflite.convert(static, [savedmodel.SERVING_KEY], "float32")


def _random_endpoint(backbone, plan, image_size: int, num_classes: int = 10):
    student = student_network.build_student(backbone, num_classes, plan, "frozen", image_size)
    return savedmodel.Endpoint(static_graph.static_model(student), image_size, False)


def whole_networks(backbone, max_skip, image_size: int, folder: str,
                   samples: dict | None = None, one_file: bool = False) -> dict:
    """{TEACHER_KEY, STUDENT_KEY, every key of `samples` ({key: Plan}):
    (path, signature key)} of the networks the table is calibrated on,
    written into `folder`: one file each (what a phone's benchmark_model
    times), or with `one_file` every network a signature of one file, which
    costs one SavedModel and one conversion instead of one per network
    (each signature is its own subgraph with its own delegate: timed the
    same)."""
    num_blocks = len(backbone.blocks)
    plans = {TEACHER_KEY: student_network.Plan.backbone_only(num_blocks),
             STUDENT_KEY: student_network.Plan.full(num_blocks, max_skip), **(samples or {})}
    if one_file:
        endpoints = {key: _random_endpoint(backbone, plan, image_size)
                     for key, plan in plans.items()}
        path = os.path.join(folder, "networks.tflite")
        with tflite.static_savedmodel(endpoints) as static:
            content = tflite.convert(static, list(endpoints), "float32")
        with open(path, "wb") as f:
            f.write(content)
        return {key: (path, key) for key in plans}
    files = {}
    for key, plan in plans.items():
        path = os.path.join(folder, f"{key}.tflite")
        with open(path, "wb") as f:
            f.write(whole_network_content(backbone, plan, image_size))
        files[key] = (path, savedmodel.SERVING_KEY)
    return files


def cached_table(backbone_name: str, image_size: int, threads: int, max_skip: int | None,
                 cache_dir: str | None = None) -> tuple[LatencyTable, bool]:
    """The table of this machine for these settings, measured once and kept
    in `cache_dir`; returns it and whether it was read from the cache."""
    cache_dir = cache_dir or default_cache_dir()
    device = this_device()
    # The format is in the name: a table of an older format (stale: its
    # calibration predicts otherwise) is measured again beside it, and a
    # student trained with the old one still finds it.
    name = "_".join([backbone_name, str(image_size), f"t{threads}",
                     f"skip{'dense' if max_skip is None else max_skip}",
                     hashlib.sha256(f"{device}|{litert_version}".encode()).hexdigest()[:10],
                     f"f{TABLE_FORMAT}"])
    path = os.path.join(cache_dir, f"{name}.json")
    if os.path.exists(path):
        try:
            table = LatencyTable.load(path)
            table.check_fits(backbone_name, image_size, max_skip)
            # Kept even if it was measured on a busy machine (its load is
            # recorded, and the report names it): a table that changed
            # under a finished student would make it stale.  Delete the
            # file to measure again.
            if table.threads == threads and not table.stale:
                return table, True
        except LatencyTableError:
            pass  # a damaged cache entry is measured again
    table = measure_table(backbone_name, image_size, threads, max_skip, cache_dir=cache_dir)
    table.save(path)
    table.source = path
    return table, False

"""Measuring a latency table on this machine: every branch of the student as
a signature of a float32 .tflite (a few files of ten), timed with LiteRT,
interleaved with the whole networks the table is calibrated on
(`nettailor_tf.latency.table`
holds the table itself and how it predicts; this module needs TensorFlow,
the table does not).
"""
from __future__ import annotations

import hashlib
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
from nettailor_tf.common import quiet
from nettailor_tf.model import student_network
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
        with quiet.native_stderr_filtered():
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


def branch_feeds(functions: dict, seed: int = 0) -> dict:
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
    """Times every branch of `backbone_name`'s student here, interleaved with
    the calibration networks under one load check (random weights: float32
    time does not depend on the values)."""
    return measure_table_beside(backbone_name, image_size, threads, max_skip, {}, runs,
                                warmup)[0]


def measure_table_beside(backbone_name: str, image_size: int, threads: int,
                         max_skip: int | None, others: dict, runs: int = TABLE_RUNS,
                         warmup: int = 10) -> tuple[LatencyTable, dict]:
    """`measure_table`, with the networks `others` ({name: (path, signature
    key)}, on a uint8 image) timed in the same rounds and load check: the
    table and the networks it predicts under the same conditions.  Returns
    the table (which they do not enter) and {name: Latency}."""
    backbone = backbones_lib.build_backbone(backbone_name)
    plan = student_network.Plan.full(len(backbone.blocks), max_skip)
    student = student_network.build_student(backbone, 10, plan, "frozen", image_size)
    functions = branch_functions(student, image_size)
    samples = sample_plans(len(backbone.blocks), max_skip)
    networks = network_functions(student, max_skip, image_size, samples)
    with tempfile.TemporaryDirectory(prefix="nettailor_latency_") as folder:
        parts = write_grouped(functions, folder, "branches")
        files = write_grouped(networks, folder, "networks")
        image = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3),
                                                  dtype=np.uint8)
        with quiet.native_stderr_filtered():
            measured = timing.measure_parts_and_networks(
                parts, branch_feeds(functions),
                {**{key: (path, key) for key, path in files.items()}, **others}, image,
                threads, warmup, runs)
    beside = {name: measured.pop(name) for name in others}
    loads = [v.other_load_cores for v in measured.values() if v.other_load_cores is not None]
    table = LatencyTable(backbone=backbone_name, image_size=image_size, threads=threads,
                         max_skip=max_skip,
                         entries={k: round(v.median_ms, 5) for k, v in measured.items()},
                         device=this_device(), other_load_cores=max(loads) if loads else None,
                         calibration_plans={k: plan_as_dict(p) for k, p in samples.items()})
    return table, beside


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
    feeds = branch_feeds(functions)
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
    table = measure_table(backbone_name, image_size, threads, max_skip)
    table.save(path)
    table.source = path
    return table, False

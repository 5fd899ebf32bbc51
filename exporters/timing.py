"""On-device style latency of a .tflite signature: LiteRT interpreter, batch 1.

The input is set once; each timed run is one `Invoke` of the signature's
subgraph, so Python's per-call resize/allocate/copy work (tens of
microseconds, a few percent of a 1 ms model) is not counted.  The result is
the median of `runs` timed invokes after `warmup` untimed ones, with the 10th
and 90th percentiles as its spread.  XNNPACK is applied by default, as on a
phone.

A figure is only as good as the machine was quiet: while timing, the CPU time
that other processes took is read from /proc/stat (Linux) and kept with the
result as `other_load_cores` (the cores they kept busy on average); above
`BUSY_CORES` the figure is marked busy.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time

import numpy as np

from exporters.savedmodel import INPUT_NAME, SERVING_KEY

MIN_RUNS = 50
# Untimed runs of a network before its share of each round of
# `measure_parts_and_networks`.
BLOCK_WARMUP = 2
# Other processes using more than this many cores on average while timing
# make a latency a busy-machine figure (an upper bound, not a measurement).
BUSY_CORES = 0.25


@dataclasses.dataclass
class Latency:
    threads: int
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    other_load_cores: float | None = None  # None where /proc/stat cannot be read

    @property
    def busy(self) -> bool:
        return self.other_load_cores is not None and self.other_load_cores > BUSY_CORES

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "busy": self.busy}


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Measures the cores other processes kept busy between `start` and `stop`."""

    def start(self) -> None:
        self._machine = _machine_busy_seconds()
        self._own = time.process_time()
        self._wall = time.perf_counter()

    def stop(self) -> float | None:
        machine = _machine_busy_seconds()
        if machine is None or self._machine is None:
            return None
        wall = time.perf_counter() - self._wall
        others = (machine - self._machine) - (time.process_time() - self._own)
        # /proc/stat counts in clock ticks (10 ms): never report noise as load.
        return round(max(others, 0.0) / max(wall, 1e-9), 3)


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _invoker(path: str, feed: dict[str, np.ndarray], threads: int, key: str, interpreter=None,
             refresh: bool = False):
    """A no-argument function that runs signature `key` once on `feed`
    ({input name: array}); with `refresh`, (that function, one that writes
    the inputs again), so that a caller can put them back in the CPU's
    caches, as the op that produced them would have, before a timed run."""
    from ai_edge_litert.interpreter import Interpreter

    if interpreter is None:
        interpreter = Interpreter(model_path=path, num_threads=threads)
    runner = interpreter.get_signature_runner(key)
    runner(**feed)  # resizes, allocates, sets the inputs once
    wrapper = getattr(runner, "_interpreter_wrapper", None)
    subgraph = getattr(runner, "_subgraph_index", None)
    if wrapper is not None and subgraph is not None:
        invoke = lambda: wrapper.Invoke(subgraph)
        inputs = [(runner._inputs[name], value) for name, value in feed.items()]
        write = lambda: [wrapper.SetTensor(index, value, subgraph) for index, value in inputs]
    else:  # a LiteRT without these internals: the inputs are written every run
        invoke = lambda: runner(**feed)
        write = lambda: None
    return (invoke, write) if refresh else invoke


def _check(image: np.ndarray, runs: int) -> None:
    if runs < MIN_RUNS:
        raise ValueError(f"runs={runs}: a latency needs at least {MIN_RUNS} timed runs")
    if image.ndim != 4 or image.shape[0] != 1 or image.dtype != np.uint8:
        raise ValueError(f"latency is measured on one uint8 image [1, H, W, 3], got "
                         f"{image.dtype} {image.shape}")


def _summary(times: list[float], threads: int, other_load: float | None) -> Latency:
    times = sorted(times)
    return Latency(threads=threads, runs=len(times), median_ms=statistics.median(times),
                   p10_ms=times[len(times) // 10], p90_ms=times[(9 * len(times)) // 10],
                   other_load_cores=other_load)


def measure(path: str, image: np.ndarray, threads: int, key: str = SERVING_KEY,
            warmup: int = 10, runs: int = 100) -> Latency:
    """Latency of signature `key` of the .tflite file at `path` on one uint8
    image [1, H, W, 3] with `threads` interpreter threads."""
    return measure_many({"only": (path, key)}, image, threads, warmup, runs)["only"]


def measure_many(files: dict[str, tuple[str, str]], image: np.ndarray, threads: int,
                 warmup: int = 10, runs: int = 100, rounds: int = 5) -> dict[str, Latency]:
    """Latencies of several (path, signature key) on the same image, timed in
    interleaved rounds: a slow spell of the machine (another process, a
    frequency change) then hits every file alike instead of skewing the
    ratio of two files measured one after the other."""
    _check(image, runs)
    invokers = {name: _invoker(path, {INPUT_NAME: image}, threads, key)
                for name, (path, key) in files.items()}
    return _interleaved(invokers, threads, warmup, runs, rounds)


def measure_signatures(path: str, feeds: dict[str, dict[str, np.ndarray]], threads: int,
                       warmup: int = 10, runs: int = 100) -> dict[str, Latency]:
    """Latency of each signature of one file on its own inputs ({signature
    key: {input name: array}}), with one interpreter, as parts of a network.

    Each timed pass runs every signature once, in the order of `feeds` (the
    order the network runs its parts), and writes a signature's inputs just
    before its run: its weights then come from memory, as in a network whose
    weights do not fit in the CPU's caches, and its inputs from the caches,
    where the op that produced them left them.  Timing one part many times
    in a row instead keeps its weights cached, and a network runs slower
    than the sum of such parts (27% at 64 px on EfficientNet-Lite0)."""
    return measure_parts_and_networks(path, feeds, {}, None, threads, warmup, runs)


def measure_parts_and_networks(path: str | dict[str, str],
                               feeds: dict[str, dict[str, np.ndarray]],
                               files: dict[str, tuple[str, str]], image: np.ndarray | None,
                               threads: int, warmup: int = 10, runs: int = 100,
                               rounds: int = 20) -> dict[str, Latency]:
    """`measure_signatures` of the parts and `measure_many` of whole
    networks, interleaved in `rounds` rounds (a round: its share of passes
    over the parts, then its share of runs of each network) under one load
    check: a table and the networks it is checked against then share the
    machine's slow and quiet spells instead of one getting the quiet one.
    20 rounds, not `measure_many`'s 5: with other processes keeping 1-1.7 of
    2 cores busy, two timings of the same teacher in one 5-round measurement
    were 18% apart.  The parts are signatures of the file at `path`, or of
    several files ({signature key: file}), one interpreter per file."""
    from ai_edge_litert.interpreter import Interpreter

    if runs < MIN_RUNS:
        raise ValueError(f"runs={runs}: a latency needs at least {MIN_RUNS} timed runs")
    if files:
        _check(image, runs)
    part_files = path if isinstance(path, dict) else {key: path for key in feeds}
    part_interpreters = {file: Interpreter(model_path=file, num_threads=threads)
                         for file in set(part_files.values())}
    parts = {key: _invoker(part_files[key], feed, threads, key,
                           part_interpreters[part_files[key]], refresh=True)
             for key, feed in feeds.items()}
    # One interpreter per file: networks that are signatures of one file
    # share it, as the parts share theirs (each signature runs its own
    # subgraph; an interpreter per signature would pack every one of them).
    interpreters = {file: Interpreter(model_path=file, num_threads=threads)
                    for file in {file for file, _ in files.values()}}
    networks = {name: _invoker(file, {INPUT_NAME: image}, threads, key, interpreters[file])
                for name, (file, key) in files.items()}
    for invoke in [p[0] for p in parts.values()] + list(networks.values()):
        for _ in range(warmup):
            invoke()
    times = {name: [] for name in [*parts, *networks]}
    load = OtherLoad()
    load.start()
    names = list(networks)
    for index, count in enumerate(_shares(runs, rounds)):
        for _ in range(count):  # one pass: every part once, in the network's order
            _time_once(parts, times)
        # Each round starts with another network, after untimed runs (the
        # passes evicted it): with 20 rounds, the network right after the
        # passes ran 25-38% slower than the same network later in the round
        # (busy machine), with or without 2 untimed runs before it.
        for name in _rotated(names, index):
            invoke = networks[name]
            for _ in range(BLOCK_WARMUP):
                invoke()
            for _ in range(count):
                _time_once({name: (invoke, None)}, times)
    other_load = load.stop()
    return {name: _summary(t, threads, other_load) for name, t in times.items()}


def _rotated(names: list, index: int) -> list:
    return names[index % len(names):] + names[:index % len(names)] if names else []


def _shares(runs: int, rounds: int) -> list[int]:
    return [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]


def _time_once(invokers: dict, times: dict) -> None:
    """Runs each (invoke, write or None) once, timing only the invoke."""
    for name, (invoke, write) in invokers.items():
        if write is not None:
            write()
        start = time.perf_counter()
        invoke()
        times[name].append((time.perf_counter() - start) * 1e3)


def _interleaved(invokers: dict, threads: int, warmup: int, runs: int,
                 rounds: int) -> dict[str, Latency]:
    """Times each invoker `runs` times, in `rounds` passes over all of them.
    An invoker is a function, or (function, one that writes its inputs
    first, untimed)."""
    parts = {name: (p if isinstance(p, tuple) else (p, None)) for name, p in invokers.items()}
    for invoke, _ in parts.values():
        for _ in range(warmup):
            invoke()
    times = {name: [] for name in parts}
    load = OtherLoad()
    load.start()
    for count in _shares(runs, rounds):
        for name, part in parts.items():
            for _ in range(count):
                _time_once({name: part}, times)
    other_load = load.stop()
    return {name: _summary(t, threads, other_load) for name, t in times.items()}

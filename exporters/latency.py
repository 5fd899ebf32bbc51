"""On-device style latency of a .tflite signature: LiteRT interpreter, batch 1.

The input is set once; each timed run is one `Invoke` of the signature's
subgraph, so Python's per-call resize/allocate/copy work (tens of
microseconds, a few percent of a 1 ms model) is not counted.  The result is
the median of `runs` timed invokes after `warmup` untimed ones.  XNNPACK is
applied by default, as on a phone.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time

import numpy as np

from exporters.savedmodel import INPUT_NAME, SERVING_KEY

MIN_RUNS = 50


@dataclasses.dataclass
class Latency:
    threads: int
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _invoker(path: str, image: np.ndarray, threads: int, key: str):
    """A no-argument function that runs the signature once on `image`."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    runner = interpreter.get_signature_runner(key)
    runner(**{INPUT_NAME: image})  # resizes, allocates, sets the input once
    wrapper = getattr(runner, "_interpreter_wrapper", None)
    subgraph = getattr(runner, "_subgraph_index", None)
    if wrapper is not None and subgraph is not None:
        return lambda: wrapper.Invoke(subgraph)
    return lambda: runner(**{INPUT_NAME: image})  # a LiteRT without these internals


def _check(image: np.ndarray, runs: int) -> None:
    if runs < MIN_RUNS:
        raise ValueError(f"runs={runs}: a latency needs at least {MIN_RUNS} timed runs")
    if image.ndim != 4 or image.shape[0] != 1 or image.dtype != np.uint8:
        raise ValueError(f"latency is measured on one uint8 image [1, H, W, 3], got "
                         f"{image.dtype} {image.shape}")


def _summary(times: list[float], threads: int) -> Latency:
    times = sorted(times)
    return Latency(threads=threads, runs=len(times), median_ms=statistics.median(times),
                   p10_ms=times[len(times) // 10], p90_ms=times[(9 * len(times)) // 10])


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
    invokers = {name: _invoker(path, image, threads, key) for name, (path, key) in files.items()}
    for invoke in invokers.values():
        for _ in range(warmup):
            invoke()
    times = {name: [] for name in invokers}
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    for count in per_round:
        for name, invoke in invokers.items():
            for _ in range(count):
                start = time.perf_counter()
                invoke()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summary(t, threads) for name, t in times.items()}

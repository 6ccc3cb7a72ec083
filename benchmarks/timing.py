"""Timing contenders side by side: first call apart, then alternating rounds, median and spread.

Each contender is a zero-argument callable that runs the computation once and returns only when
its result is ready (``block_until_ready`` / CUDA sync). The first call is timed on its own: for
jitted JAX functions it includes tracing and compilation. Then every contender is warmed up and
timed once per round, the order rotating between rounds, so slow drift of the machine (other
processes, thermal state) spreads over all contenders alike.

Each timed call follows an untimed call of the same contender: the first call after another
contender finds caches holding the other's data and the other framework's threads still spinning,
and is not the steady state a simulation loop of repeated calls sees. On 2 cores, in an ad-hoc
run, that first call cost JAX up to 1.5x and torch up to 1.1x (lenet_zhu, clipped, 256
examples: 25.8 vs 17.1 ms and 17.4 vs 16.4 ms).

Garbage is collected between rounds, so that no contender pays for another's, but the objects
alive when timing starts (torch, breaching, JAX and the suite's data: some 300,000) are frozen
first (``gc.freeze``), so that a round's collection scans only what the calls made. A full
collection of that heap takes 135-160 ms on one core, and the next five or so JAX calls after it
run 1.3-1.7x slower (``python -m benchmarks.gc_pause``), which made every round's first calls
slower than a simulation loop's.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable, Mapping

import numpy as np

Contender = Callable[[], None]


@dataclasses.dataclass
class Measurement:
    """First-call time and the steady-state times of one contender (seconds)."""

    first_call_s: float
    times_s: list[float]

    def summary(self) -> dict:
        """Median, quartiles, extremes; ``compile_s`` = first call minus the steady median."""
        times = np.asarray(self.times_s)
        q1, median, q3 = np.percentile(times, [25, 50, 75])
        return dict(
            median_s=float(median),
            q1_s=float(q1),
            q3_s=float(q3),
            min_s=float(times.min()),
            max_s=float(times.max()),
            rounds=int(times.size),
            first_call_s=self.first_call_s,
            compile_s=max(self.first_call_s - float(median), 0.0),
        )


def time_call(call: Contender) -> float:
    """Seconds of one call of ``call``, with the garbage collector held off during it."""
    gc.disable()  # a collection triggered by one contender must not be charged to another
    try:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    finally:
        gc.enable()


def measure(
    contenders: Mapping[str, Contender],
    warmup: int = 1,
    min_rounds: int = 3,
    max_rounds: int = 15,
    budget_s: float = 20.0,
) -> dict[str, Measurement]:
    """Time every contender: first call, ``warmup`` calls, then as many alternating rounds as fit.

    The number of rounds is what fits ``budget_s`` at the warm-up speed, between ``min_rounds``
    and ``max_rounds``. Workloads whose first calls alone exceed the budget skip the warm-up:
    at seconds per call the first call has already warmed every cache.
    """
    names = list(contenders)
    first = {name: time_call(contenders[name]) for name in names}
    estimate = dict(first)
    for _ in range(warmup if sum(first.values()) < budget_s else 0):
        for name in names:
            estimate[name] = time_call(contenders[name])
    per_round = 2 * sum(estimate.values())  # a timed and an untimed call each
    rounds = int(np.clip(budget_s // max(per_round, 1e-9), min_rounds, max_rounds))
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.freeze()  # see the module docstring
    try:
        for r in range(rounds):
            gc.collect()
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                contenders[name]()  # switch in: see the module docstring
                times[name].append(time_call(contenders[name]))
    finally:
        gc.unfreeze()
    return {name: Measurement(first[name], times[name]) for name in names}

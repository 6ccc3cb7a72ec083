"""``python -m benchmarks.studies.gc_pause``: what a full garbage collection costs the JAX calls after it.

Builds the suite's lenet_zhu pair and one clipped ``local_gradient`` workload's contenders, as
``python -m benchmarks`` does (torch, breaching and the data alive), then, for the JAX floor
and fedjax_users: times a full ``gc.collect()`` and the ``--calls`` calls right after it, over
``--repeats`` repetitions, once with the heap as it is and once after ``gc.freeze()`` (which is
what ``benchmarks.timing.measure`` does before its rounds). Prints the collection's ms and the
median ms of each call position after it, beside the median of back-to-back calls.
"""

from __future__ import annotations

import argparse
import gc
from typing import Optional, Sequence

import numpy as np
import torch

from benchmarks import contenders, pairs, problems, timing
from benchmarks.grid import Workload


def _after_collection(call, calls: int, repeats: int) -> tuple[float, np.ndarray]:
    """Median ms of a full collection, and of each of the ``calls`` calls after one."""
    collect_s, times = [], np.zeros((repeats, calls))
    for r in range(repeats):
        collect_s.append(timing.time_call(gc.collect))  # an explicit collection runs with gc disabled too
        for i in range(calls):
            times[r, i] = timing.time_call(call)
    return float(np.median(collect_s)) * 1e3, np.median(times, axis=0) * 1e3


def _back_to_back(call, count: int) -> float:
    return float(np.median([timing.time_call(call) for _ in range(count)])) * 1e3


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print one line per contender and heap state."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.gc_pause", description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    workload = Workload("local_gradient", "lenet_zhu", batch=args.batch)
    pair = pairs.build_pair(workload.model, torch.device("cpu"))
    calls = contenders.build(pair, workload, problems.data_for(workload), {"fedjax_users", "floor_jax"})
    for call in calls.values():
        call()
    print(f"lenet_zhu clipped local_gradient, B={args.batch}; {len(gc.get_objects())} objects tracked; ms")
    for state in ("as it is", "frozen"):
        if state == "frozen":
            gc.collect()
            gc.freeze()
        for name, call in calls.items():
            collect_ms, positions = _after_collection(call, args.calls, args.repeats)
            steady = _back_to_back(call, args.repeats * args.calls)
            print(f"heap {state:<9} {name:<13} collection {collect_ms:7.2f} | calls after it: "
                  + " ".join(f"{t:5.2f}" for t in positions) + f" | back to back {steady:5.2f}")
    gc.unfreeze()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

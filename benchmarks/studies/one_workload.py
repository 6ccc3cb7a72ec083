"""How long does one workload's fedjax_users call take, timed directly in a long loop?

``python -m benchmarks.studies.one_workload KIND MODEL LABEL [--calls 2000]`` (e.g.
``local_gradient lenet_zhu B=8``) builds the suite's contender for that workload and prints the
median of ``--calls`` back-to-back calls after a warm-up: a check on one row of the suite, free of
the suite's row order. To time another checkout's code, run this file from that checkout
(``cd OLD && python /path/to/benchmarks/studies/one_workload.py ...``): it imports the
``benchmarks`` and ``fedjax_users`` packages of the working directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind")
    parser.add_argument("model")
    parser.add_argument("label")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    from benchmarks import contenders, device, grid, pairs, problems

    matches = [w for w in grid.grid("full", device.accelerator())
               if (w.kind, w.model, w.label) == (args.kind, args.model, args.label)]
    if not matches:
        parser.error(f"no workload {args.kind} {args.model} {args.label!r} in the full grid")
    workload = matches[0]
    pair = pairs.build_pair(workload.model, device.torch_device())
    call = contenders.build(pair, workload, problems.data_for(workload), {"fedjax_users"})["fedjax_users"]
    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    print(f"{args.kind} {args.model} {args.label}: median {statistics.median(times) * 1e3:.3f} ms over {args.calls} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

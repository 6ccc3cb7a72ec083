"""``python -m benchmarks [--quick] [--memory] [--out DIR]``: run the suite and write its outputs."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parser() -> argparse.ArgumentParser:
    from benchmarks.contenders import BUILDERS
    from benchmarks.grid import GRIDS, KINDS

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="grid",
                      help="a small lenet_zhu subset (a few minutes on 2 CPU cores)")
    size.add_argument("--grid", choices=GRIDS, help="workload grid (default: full)")
    parser.set_defaults(grid="full")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: benchmarks/results)")
    parser.add_argument("--memory", action="store_true",
                        help="only the peak-memory runs of large aggregates (slow; one subprocess each); "
                             "written to DIR/memory.json and folded into DIR/results.md")
    parser.add_argument("--models", nargs="+", help="only these models")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="only these workload kinds")
    parser.add_argument("--contenders", nargs="+", choices=list(BUILDERS), help="only these contenders")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of DIR/results.json that this run does not measure (run a grid in parts)")
    return parser


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m benchmarks`` and ``fedjax-users bench``; returns the exit status."""
    args = _parser().parse_args(argv)
    from benchmarks import memory, report, suite

    os.makedirs(args.out, exist_ok=True)
    memory_path = os.path.join(args.out, "memory.json")
    if args.memory:
        memory_results = memory.run(memory.SMOKE_SPECS if args.grid == "smoke" else memory.SPECS)
        report.write_json(memory_results, memory_path)
        results = _read_json(os.path.join(args.out, "results.json"))
        if results is not None:
            report.write_all(results, args.out, memory_results)
        print(f"wrote {memory_path}")
        return 0
    results = suite.run(
        args.grid,
        models=set(args.models) if args.models else None,
        kinds=set(args.kinds) if args.kinds else None,
        only=set(args.contenders) if args.contenders else None,
    )
    previous = _read_json(os.path.join(args.out, "results.json")) if args.update else None
    if previous is not None:
        results = suite.merge(previous, results)
    paths = report.write_all(results, args.out, _read_json(memory_path))
    print("wrote " + ", ".join(paths.values()))
    return 0

"""``python -m benchmarks [--quick] [--memory] [--out DIR] [--stale [--list]]``: run the suite and write its outputs.

Every timing and memory row records the fingerprint of the code it ran on
(:mod:`benchmarks.fingerprint`). ``--stale`` measures again only the rows of ``DIR/results.json``
and ``DIR/memory.json`` whose fingerprint is not today's and merges them in; ``--stale --list``
only counts and names them.
"""

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
    parser.add_argument("--stale", action="store_true",
                        help="measure again only the rows of DIR/results.json and DIR/memory.json whose "
                             "fingerprint is not today's code's; keep the others")
    parser.add_argument("--list", action="store_true", help="with --stale: count and name the stale rows, measure nothing")
    return parser


# What names a memory row: the spec it ran (memory.SPECS).
_MEMORY_SPEC = ("model", "users", "steps", "batch", "users_per_chunk")


def _memory_key(run: dict) -> tuple:
    return tuple(run.get(k) for k in _MEMORY_SPEC)


def _stale(args) -> int:
    """``--stale``: what is not measured on today's code, measured again and merged in place."""
    from benchmarks import fingerprint, memory, report, suite

    results_path, memory_path = os.path.join(args.out, "results.json"), os.path.join(args.out, "memory.json")
    results, memory_results = _read_json(results_path), _read_json(memory_path)
    old_rows = fingerprint.stale(results["results"], fingerprint.SUITE) if results else []
    old_runs = fingerprint.stale(memory_results["runs"], fingerprint.MEMORY) if memory_results else []
    if results:
        print(f"{os.path.relpath(results_path)}: " + fingerprint.freshness_line(results["results"], fingerprint.SUITE, "timing rows"))
    if memory_results:
        print(f"{os.path.relpath(memory_path)}: " + fingerprint.freshness_line(memory_results["runs"], fingerprint.MEMORY, "memory rows"))
    for row in old_rows:
        print(f"  stale: {row['kind']} {row['model']} {row['label']}")
    for run in old_runs:
        print(f"  stale: memory {run['model']} {run['users']} users, chunk {run['users_per_chunk']}")
    if args.list or not (old_rows or old_runs):
        return 0
    if old_runs:
        specs = [{k: r.get(k) for k in _MEMORY_SPEC} for r in old_runs]
        new = {_memory_key(r): r for r in memory.run(specs)["runs"]}
        memory_results = dict(memory_results, runs=[new.get(_memory_key(r), r) for r in memory_results["runs"]])
        report.write_json(memory_results, memory_path)
    if old_rows:
        keys = {suite.row_key(r) for r in old_rows}
        new_results = suite.run(results["grid"], keys=keys)
        missing = keys - {suite.row_key(r) for r in new_results["results"]}
        for key in sorted(missing):
            print(f"  not in today's {results['grid']} grid (kept as it is): {key}")
        # Every row measured again: the new run stands alone, without the old runs' parts.
        everything = not {suite.row_key(r) for r in results["results"]} - keys
        results = new_results if everything and not missing else suite.merge(results, new_results)
    if results:
        paths = report.write_all(results, args.out, memory_results)
        print("wrote " + ", ".join(paths.values()))
    return 0


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m benchmarks`` and ``fedjax-users bench``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.stale:
        return _stale(args)
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

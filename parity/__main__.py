"""``python -m parity [--quick] [--json PATH] [--filter TEXT]``: run the parity grid and print the table.

float32 cases run in this process; float64 cases need ``jax_enable_x64`` before JAX computes
anything, so they run in a child process (``--precision float64``) whose rows are merged in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the subset CI runs on every push")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--filter", default="",
                        help="only cases whose name contains this text (or one of several, comma-separated)")
    parser.add_argument("--precision", choices=("float32", "float64"), help="run one precision only")
    parser.add_argument("--verbose", action="store_true", help="print details of every case")
    parser.add_argument("--partial", metavar="PATH", help="rewrite PATH with the results so far after each case")
    return parser.parse_args(argv)


def _run(precision, args):
    import jax

    if precision == "float64":
        jax.config.update("jax_enable_x64", True)
    from parity.cases import all_cases
    from parity.harness import Result, run_case

    results = []
    for case in all_cases(quick=args.quick, precision=precision):
        if args.filter and not any(text in case.name for text in args.filter.split(",")):
            continue
        start = time.perf_counter()
        try:
            result = run_case(case)
        except Exception as err:  # a crash is a failed case, reported with its cause
            result = Result(case.name, float("nan"), float("nan"), case.bound, False, f"{type(err).__name__}: {err}")
        if args.verbose or not result.passed:
            print(f"  {result.name}: rel {result.max_rel:.2e} ({time.perf_counter() - start:.1f}s) {result.detail}",
                  file=sys.stderr, flush=True)
        results.append(result)
        # Every case compiles its own executables (new model objects are new static arguments), and
        # XLA:CPU maps each one's code: ~170 cases into one process it ran out of memory mappings
        # ("LLVM ERROR: Unable to allocate section memory"). Nothing compiled carries to the next case.
        jax.clear_caches()
        if args.partial:
            # A long run leaves what it has done so far.
            from parity.report import write_json

            write_json(results, args.partial, dict(partial=True, precision=precision))
    return results


def main(argv=None) -> int:
    """Entry point; exit status 1 if any case fails."""
    args = _parse(argv)
    from parity.harness import Result
    from parity.report import failures, format_table, write_json

    start = time.perf_counter()
    if args.precision:
        results = _run(args.precision, args)
    else:
        results = _run("float32", args)
        with tempfile.TemporaryDirectory() as tmp:
            child = os.path.join(tmp, "f64.json")
            command = [sys.executable, "-m", "parity", "--precision", "float64", "--json", child,
                       "--filter", args.filter] + (["--quick"] if args.quick else []) + (
                ["--verbose"] if args.verbose else [])
            subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
            if os.path.exists(child):
                with open(child) as handle:
                    results += [Result(**row) for row in json.load(handle)["results"]]
            else:
                results.append(Result("float64 child process", float("nan"), float("nan"), 0.0, False, "crashed"))
    print(format_table(results))
    if failures(results):
        print(failures(results))
    if args.json:
        import jax
        import torch

        write_json(results, args.json, dict(
            quick=args.quick, seconds=round(time.perf_counter() - start, 1), jax=jax.__version__,
            torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
            cpus=os.cpu_count(),
        ))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

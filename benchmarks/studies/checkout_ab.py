"""Is one checkout slower than another? The suite's fedjax_users rows, run alternately in each.

``python -m benchmarks.studies.checkout_ab OLD NEW --out DIR [--rounds 2] [--models ...] [--kinds ...]`` runs
``python -m benchmarks --contenders fedjax_users --out DIR/<old|new><round>`` in the checkouts
``OLD`` and ``NEW`` in the order old, new, old, new, ... (each run a fresh process, so drift of the
machine during the session falls on both alike), then prints one row per workload and writes
``DIR/comparison.json``. ``--compare`` only reads runs already in ``DIR``.

Each row compares the best median of each checkout over the rounds (``new/old``) with the spread
between the old checkout's own rounds (``old spread``, largest over smallest median): a row is
slower beyond the run-to-run spread only when ``new/old`` exceeds that spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Mapping

CONTENDER = "fedjax_users"


def _run_suite(checkout: str, out: str, only: list[str]) -> None:
    """One suite run of ``checkout``'s own code (``python -m`` imports the package from the cwd)."""
    subprocess.run([sys.executable, "-m", "benchmarks", "--contenders", CONTENDER, "--out", out, *only],
                   cwd=checkout, check=True)


def _medians(folder: str) -> dict[tuple, float]:
    with open(os.path.join(folder, "results.json")) as handle:
        rows = json.load(handle)["results"]
    return {(r["kind"], r["model"], r["label"]): r["contenders"][CONTENDER]["median_s"] for r in rows}


def compare(old_runs: list[Mapping[tuple, float]], new_runs: list[Mapping[tuple, float]]) -> list[dict]:
    """One row per workload measured in every run: best medians, their ratio and the old runs' spread."""
    keys = [k for k in old_runs[0] if all(k in run for run in old_runs + new_runs)]
    rows = []
    for key in keys:
        old = [run[key] for run in old_runs]
        new = [run[key] for run in new_runs]
        ratio = min(new) / min(old)
        spread = max(old) / min(old)
        rows.append(dict(workload=" ".join(map(str, key)), old_s=old, new_s=new, new_over_old=ratio,
                         old_spread=spread, beyond_spread=ratio > max(spread, 1.0)))
    return rows


def _print(rows: list[dict]) -> None:
    print(f"{'workload':40s} {'old ms':>20s} {'new ms':>20s} {'new/old':>8s} {'old spread':>10s}")
    for r in rows:
        old = "/".join(f"{v * 1e3:.3g}" for v in r["old_s"])
        new = "/".join(f"{v * 1e3:.3g}" for v in r["new_s"])
        flag = "  beyond spread" if r["beyond_spread"] else ""
        print(f"{r['workload']:40s} {old:>20s} {new:>20s} {r['new_over_old']:8.2f} {r['old_spread']:10.2f}{flag}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", action="store_true", help="only compare the runs already in --out")
    parser.add_argument("--models", nargs="+", help="only these models (passed to the suite)")
    parser.add_argument("--kinds", nargs="+", help="only these workload kinds (passed to the suite)")
    args = parser.parse_args(argv)
    only = (["--models", *args.models] if args.models else []) + (["--kinds", *args.kinds] if args.kinds else [])
    folders = {side: [os.path.join(args.out, f"{side}{i + 1}") for i in range(args.rounds)] for side in ("old", "new")}
    if not args.compare:
        for i in range(args.rounds):
            for side, checkout in (("old", args.old), ("new", args.new)):
                _run_suite(os.path.abspath(checkout), os.path.abspath(folders[side][i]), only)
    rows = compare([_medians(f) for f in folders["old"]], [_medians(f) for f in folders["new"]])
    _print(rows)
    with open(os.path.join(args.out, "comparison.json"), "w") as handle:
        json.dump(dict(old=os.path.abspath(args.old), new=os.path.abspath(args.new), rounds=args.rounds, rows=rows),
                  handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The parity table: one row per case, printed and written as JSON."""

from __future__ import annotations

import json
import os
from typing import Iterable

from parity.harness import Result


def _mark(r: Result) -> str:
    """``yes`` within the bound, ``yes*`` / ``yes~`` by the float64 yardsticks, ``NO``."""
    if not r.passed:
        return "NO"
    if r.reference_spread is not None:
        return "yes~"
    return "yes" if r.ours_vs_float64 is None else "yes*"


def _group(name: str) -> tuple[str, str]:
    """(model, precision) of a case name such as ``ConvNet/aggregate/buffers/clip/float64/ragged``."""
    parts = name.split("/")
    return parts[0], "float64" if "float64" in parts else "float32"


def summary(results: Iterable[Result]) -> str:
    """A markdown table per model and precision: cases, how each passed, the worst errors."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault(_group(r.name), []).append(r)
    lines = ["| model | precision | cases | passed | yes / yes* / yes~ | worst max rel err (bound) | "
             "worst ours vs float64 (reference's) |", "|---|---|---|---|---|---|---|"]
    for (model, precision), rows in groups.items():
        marks = [_mark(r) for r in rows]
        worst = max(rows, key=lambda r: r.max_rel / r.bound)
        exact = [r for r in rows if r.ours_vs_float64 is not None]
        far = max(exact, key=lambda r: r.ours_vs_float64) if exact else None
        lines.append(
            f"| {model} | {precision} | {len(rows)} | {sum(r.passed for r in rows)} | "
            f"{marks.count('yes')} / {marks.count('yes*')} / {marks.count('yes~')} | "
            f"{worst.max_rel:.1e} ({worst.bound:.0e}) | "
            + (f"{far.ours_vs_float64:.1e} ({far.reference_vs_float64:.1e})" if far else "-") + " |"
        )
    return "\n".join(lines)


def load(path: str) -> tuple[dict, list[Result]]:
    """The run description and the rows of a JSON file written by ``write_json``."""
    with open(path) as handle:
        data = json.load(handle)
    return data["meta"], [Result(**row) for row in data["results"]]


def main(argv=None) -> int:
    """``python -m parity.report RESULTS.json``: the per-model summary and the full table again."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m parity.report", description=main.__doc__)
    parser.add_argument("results", help="a JSON file written by python -m parity --json")
    args = parser.parse_args(argv)
    meta, results = load(args.results)
    print(f"{args.results}: {', '.join(f'{k}={v}' for k, v in meta.items())}\n")
    print(summary(results) + "\n")
    print(format_table(results))
    return 0


def format_table(results: Iterable[Result]) -> str:
    """A fixed-width table: case, max abs err, max rel err, bound, pass."""
    results = list(results)
    width = max([len("case")] + [len(r.name) for r in results])
    lines = [f"{'case':<{width}}  {'max abs err':>11}  {'max rel err':>11}  {'bound':>7}  pass  "
             f"{'f64 ours':>9}  {'f64 ref':>9}  {'ref spread':>10}"]
    for r in results:
        mark = _mark(r)
        exact = ""
        if r.ours_vs_float64 is not None:
            exact = f"{r.ours_vs_float64:>9.2e}  {r.reference_vs_float64:>9.2e}"
        elif r.reference_spread is not None:  # a float64 case: no wider precision, only the spread
            exact = f"{'-':>9}  {'-':>9}"
        if r.reference_spread is not None:
            exact += f"  {r.reference_spread:>10.2e}"
        lines.append(
            f"{r.name:<{width}}  {r.max_abs:>11.3e}  {r.max_rel:>11.3e}  {r.bound:>7.0e}  {mark:<4}  {exact}".rstrip()
        )
    failed = [r for r in results if not r.passed]
    lines.append("yes* = float32 rounding beyond the bound, amplified alike in both frameworks: our result is "
                 "within 2x of the reference's own float32 distance to its float64 result (f64 columns).")
    lines.append("yes~ = result only defined up to rounding (float32: ReLU kinks it puts on either side; float64: "
                 "amplified over SGD steps): our result is within 2x of the reference's own spread on inputs "
                 "perturbed by a few ulp of the run's precision (ref spread column).")
    lines.append(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return "\n".join(lines)


def failures(results: Iterable[Result]) -> str:
    """Details of the failing cases."""
    return "\n".join(f"FAIL {r.name}: {r.detail}" for r in results if not r.passed)


def write_json(results: Iterable[Result], path: str, meta: dict) -> None:
    """Write the results and the run's description to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"meta": meta, "results": [r.as_dict() for r in results]}, handle, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())

"""The parity table: one row per case, printed and written as JSON."""

from __future__ import annotations

import json
import os
from typing import Iterable

from parity.harness import Result


def format_table(results: Iterable[Result]) -> str:
    """A fixed-width table: case, max abs err, max rel err, bound, pass."""
    results = list(results)
    width = max([len("case")] + [len(r.name) for r in results])
    lines = [f"{'case':<{width}}  {'max abs err':>11}  {'max rel err':>11}  {'bound':>7}  pass  "
             f"{'f64 ours':>9}  {'f64 ref':>9}  {'ref spread':>10}"]
    for r in results:
        mark = "yes"
        if r.ours_vs_float64 is not None:
            mark = "yes*" if r.reference_spread is None else "yes~"
        mark = mark if r.passed else "NO"
        exact = ""
        if r.ours_vs_float64 is not None:
            exact = f"{r.ours_vs_float64:>9.2e}  {r.reference_vs_float64:>9.2e}"
        if r.reference_spread is not None:
            exact += f"  {r.reference_spread:>10.2e}"
        lines.append(
            f"{r.name:<{width}}  {r.max_abs:>11.3e}  {r.max_rel:>11.3e}  {r.bound:>7.0e}  {mark:<4}  {exact}".rstrip()
        )
    failed = [r for r in results if not r.passed]
    lines.append("yes* = float32 rounding beyond the bound, amplified alike in both frameworks: our result is "
                 "within 2x of the reference's own float32 distance to its float64 result (f64 columns).")
    lines.append("yes~ = float32 result only defined up to ReLU kinks that rounding puts on either side: our result "
                 "is within 2x of the reference's own float32 spread on inputs perturbed far below float32 "
                 "resolution (ref spread column).")
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

"""The parity table: one row per case, printed and written as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Optional

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


_FIELDS = tuple(field.name for field in dataclasses.fields(Result))


def load(path: str) -> tuple[dict, list[Result]]:
    """The run description and the rows of a JSON file written by ``write_json``."""
    meta, results, _ = load_with_fingerprints(path)
    return meta, results


def load_with_fingerprints(path: str) -> tuple[dict, list[Result], dict[str, str]]:
    """``load``, plus each row's fingerprint by case name (rows written before fingerprints have none)."""
    with open(path) as handle:
        data = json.load(handle)
    results = [Result(**{k: v for k, v in row.items() if k in _FIELDS}) for row in data["results"]]
    fingerprints = {row["name"]: row["fingerprint"] for row in data["results"] if row.get("fingerprint")}
    return data["meta"], results, fingerprints


def proven_on_today(results: Iterable[Result], fingerprints: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(proven, stale, unknown) case names: the recorded fingerprint equals today's, differs (or is
    missing), or the name is no case of today's grid."""
    from parity import fingerprint
    from parity.cases import cases_by_name

    cases = cases_by_name()
    proven, stale, unknown = [], [], []
    for r in results:
        case = cases.get(r.name)
        if case is None:
            unknown.append(r.name)
        elif fingerprints.get(r.name) == fingerprint.fingerprint(case):
            proven.append(r.name)
        else:
            stale.append(r.name)
    return proven, stale, unknown


def freshness_line(results: Iterable[Result], fingerprints: dict[str, str]) -> str:
    """One line: how many rows are proven on today's code."""
    results = list(results)
    proven, stale, unknown = proven_on_today(results, fingerprints)
    return (f"{len(proven)} of {len(results)} rows proven on today's code (fingerprint matches); "
            f"{len(stale)} stale (python -m parity --stale reruns them)"
            + (f", {len(unknown)} no longer in the grid" if unknown else ""))


def main(argv=None) -> int:
    """``python -m parity.report RESULTS.json``: the per-model summary and the full table again."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m parity.report", description=main.__doc__)
    parser.add_argument("results", help="a JSON file written by python -m parity --json")
    args = parser.parse_args(argv)
    meta, results, fingerprints = load_with_fingerprints(args.results)
    print(f"{args.results}: {', '.join(f'{k}={v}' for k, v in meta.items())}\n")
    print(freshness_line(results, fingerprints) + "\n")
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


def write_json(results: Iterable[Result], path: str, meta: dict, fingerprints: Optional[dict[str, str]] = None) -> None:
    """Write the results, each with its fingerprint if known, and the run's description to ``path``."""
    fingerprints = fingerprints or {}
    rows = [{**r.as_dict(), **({"fingerprint": fingerprints[r.name]} if r.name in fingerprints else {})}
            for r in results]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"meta": meta, "results": rows}, handle, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())

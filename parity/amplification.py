"""``python -m parity.amplification CASE [--steps 1,2,3]``: how a case's rounding grows with SGD steps.

For a multi-step case that misses its bound, runs it with each number of local steps and bound 0,
so that every run goes to the yardsticks of a miss, and prints our distance to the reference beside
the reference's own: in float32 its distance to its float64 result, in float64 how far it moves on
inputs perturbed by a few ulp. Distances that grow alike step by step on both sides are amplified
rounding; a semantic difference shows from the first step on.
"""

from __future__ import annotations

import argparse
import dataclasses


def rows(name: str, steps: list[int]) -> list:
    """The parity reports of case ``name`` run with each of ``steps`` local update steps."""
    from parity.cases import all_cases
    from parity.harness import run_case

    precision = "float64" if "/float64" in name else "float32"
    matches = [c for c in all_cases(precision=precision) if c.name == name]
    if not matches:
        raise SystemExit(f"no parity case named {name!r} (python -m parity.report results/parity.json lists them)")
    case = matches[0]
    if case.user == "local_gradient":
        raise SystemExit(f"{name} is a single-step user: no steps to vary")
    return [run_case(dataclasses.replace(case, user_overrides=case.user_overrides + (("num_local_updates", k),),
                                         tag=f"{case.tag}steps={k}"), bound=0.0) for k in steps]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.amplification", description=__doc__.splitlines()[0])
    parser.add_argument("case", help="a case name of the full grid, e.g. resnet50@ImageNet/local_update/"
                                     "no-buffers/none/float64")
    parser.add_argument("--steps", default="1,2,3", help="comma-separated numbers of local update steps")
    args = parser.parse_args(argv)
    import jax

    if "/float64" in args.case:
        jax.config.update("jax_enable_x64", True)
    steps = [int(k) for k in args.steps.split(",")]
    columns = ("steps", "ours vs reference", "ours vs float64", "reference vs float64", "reference spread")
    print("  ".join(f"{c:>{len(c)}}" for c in columns))
    for k, r in zip(steps, rows(args.case, steps)):
        values = [f"{k}", f"{r.max_rel:.2e}"] + ["-" if v is None else f"{v:.2e}" for v in
                                                  (r.ours_vs_float64, r.reference_vs_float64, r.reference_spread)]
        print("  ".join(f"{v:>{len(c)}}" for v, c in zip(values, columns)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""From timings to the numbers issue 5 asks for: ratios, achieved FLOP/s, and its targets."""

from __future__ import annotations

from typing import Mapping, Optional

from benchmarks.flops import train_flops
from benchmarks.grid import Workload
from benchmarks.timing import Measurement

TARGET_RATIO = 1.3  # steady-state fedjax_users time over the floor's, at most

# name: (numerator contender, denominator contender). Above 1 means the denominator is faster.
RATIOS = {
    "fedjax_over_floor_jax": ("fedjax_users", "floor_jax"),
    "fedjax_over_floor_torch": ("fedjax_users", "floor_torch"),
    "torch_func_over_fedjax": ("torch_func", "fedjax_users"),
    "breaching_over_fedjax": ("breaching", "fedjax_users"),
    "torch_func_over_floor_torch": ("torch_func", "floor_torch"),
    "eager_over_jit": ("fedjax_users_eager", "fedjax_users"),
    "checks_over_unchecked": ("fedjax_users_eager", "fedjax_users_unchecked"),
}


def _ratio(contenders: Mapping[str, dict], top: str, bottom: str) -> Optional[float]:
    if top not in contenders or bottom not in contenders:
        return None
    return contenders[top]["median_s"] / contenders[bottom]["median_s"]


def summarise(workload: Workload, measurements: Mapping[str, Measurement], forward_flops: float) -> dict:
    """One result row: the workload, each contender's statistics and achieved FLOP/s, the ratios."""
    work = train_flops(forward_flops, workload.examples)
    contenders = {}
    for name, measurement in measurements.items():
        stats = measurement.summary()
        stats["flops_per_s"] = work / stats["median_s"]
        contenders[name] = stats
    ratios = {name: _ratio(contenders, *pair) for name, pair in RATIOS.items()}
    return dict(
        kind=workload.kind,
        model=workload.model,
        batch=workload.batch,
        steps=workload.steps,
        users=workload.users,
        examples=workload.examples,
        label=workload.label,
        train_flops=work,
        contenders=contenders,
        ratios={name: value for name, value in ratios.items() if value is not None},
    )


def add_fraction_of_peak(rows: list[dict], peak_flops_per_s: float) -> None:
    """Achieved over the measured matmul peak, for every contender of every row (in place)."""
    for row in rows:
        for stats in row["contenders"].values():
            stats["fraction_of_peak"] = stats["flops_per_s"] / peak_flops_per_s


def _check(name: str, rows: list[dict], ratio: str, holds) -> dict:
    values = [(f"{r['model']} {r['label']}", r["ratios"][ratio]) for r in rows if ratio in r["ratios"]]
    verdict = None if not values or holds is None else all(holds(v) for _, v in values)
    return dict(target=name, ratio=ratio, holds=verdict, values=dict(values))


def targets(results: list[dict]) -> list[dict]:
    """Issue 5's targets, each with its verdict over the measured rows (``None``: nothing to judge)."""
    by_kind = {kind: [r for r in results if r["kind"] == kind] for kind in ("local_gradient", "aggregate")}
    return [
        _check(
            f"clipped local_gradient <= {TARGET_RATIO}x the unclipped batch gradient (JAX)",
            by_kind["local_gradient"], "fedjax_over_floor_jax", lambda v: v <= TARGET_RATIO,
        ),
        _check(
            "clipped local_gradient faster than torch.func",
            by_kind["local_gradient"], "torch_func_over_fedjax", lambda v: v > 1.0,
        ),
        _check(
            f"aggregate <= {TARGET_RATIO}x one batch gradient over all U x k x examples (JAX)",
            by_kind["aggregate"], "fedjax_over_floor_jax", lambda v: v <= TARGET_RATIO,
        ),
        _check("aggregate: speed-up over breaching's MultiUserAggregate (reported)",
               by_kind["aggregate"], "breaching_over_fedjax", None),
    ]

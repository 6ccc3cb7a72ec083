"""Write the results: JSON (everything), a markdown summary, and a plot of time vs size."""

from __future__ import annotations

import json
import os
from typing import Optional

from benchmarks.analysis import RATIOS

COLUMNS = ("fedjax_users", "fedjax_users_eager", "fedjax_users_unchecked", "torch_func", "breaching", "floor_jax", "floor_torch")
TITLES = {
    "local_gradient": "local_gradient, per-example clipping (time vs batch size)",
    "local_update": "local_update (time vs local steps)",
    "aggregate": "aggregate (time vs number of users)",
}
X_AXIS = {"local_gradient": "batch", "local_update": "steps", "aggregate": "users"}
NOTES = """\
Contenders, all in one process, alternating (first call timed apart; then warm-up and rounds in
rotating order, each contender called once untimed and once timed per round, so that no timed call
pays for the previous contender's caches and thread pool; garbage is collected between rounds
with the heap alive at the start frozen, so that a collection does not idle a core for 100+ ms
before the next calls; cells are median [interquartile range] of the rounds):
- `fedjax_users`: the public function under an outer jit: `fu.strategy.jit` (`jax.jit` with the memory-optimized
  XLA:CPU scheduler, see fedjax_users/strategy/compilation.py) for clipped local_gradient, `jax.jit` for the
  rest; `compile` is its first call minus the median.
  `fedjax_users_eager`: the same call without the outer jit (Python-side validation each call);
  `fedjax_users_unchecked`: the eager call with `check_finite=False` (no input or finite checks).
- `torch_func`: `benchmarks/torch_func.py`: `vmap(grad)` over `functional_call`, breaching's clipping
  rule; for aggregates `vmap` over users of their local SGD steps. None for `local_update`.
- `breaching`: breaching 0.1.2's own classes (`UserSingleStep` clipping loops over examples in
  Python; `UserMultiStep`; `MultiUserAggregate` running its users one after another; its mean is
  defective, see tests/parity, but its cost is the intended computation's).
- `floor_jax` / `floor_torch`: the plain unclipped batch gradient over all the workload's examples
  (U x k x examples for aggregates): the arithmetic no implementation can avoid. `floor_jax` is
  under plain `jax.jit`.
Ratios: `fedjax/floor` = fedjax_users over floor_jax (issue 5 target <= 1.3); `torch.func/fedjax`
and `breaching/fedjax` are speed-ups of fedjax_users (> 1: fedjax_users is faster). `load`: the
machine's 1-minute load average after the row (above the core count, other work competed).
"""


def write_json(results: dict, path: str) -> None:
    """The full results, machine description included."""
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1, sort_keys=False)
        handle.write("\n")


def _number(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ms(stats: Optional[dict]) -> str:
    if not stats:
        return "-"
    return f"{_number(stats['median_s'] * 1e3)} [{_number(stats['q1_s'] * 1e3)}-{_number(stats['q3_s'] * 1e3)}]"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _gflops(stats: Optional[dict]) -> str:
    if not stats:
        return "-"
    return f"{stats['flops_per_s'] / 1e9:.3g} ({100 * stats.get('fraction_of_peak', float('nan')):.0f}%)"


def _table(rows: list[dict]) -> list[str]:
    header = (["model", "size"] + [f"{c} ms" for c in COLUMNS] + ["compile s", "fedjax/floor",
              "torch.func/fedjax", "breaching/fedjax", "fedjax GFLOP/s (% peak)", "load"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        contenders, ratios = row["contenders"], row["ratios"]
        fedjax = contenders.get("fedjax_users")
        cells = [row["model"], row["label"]] + [_ms(contenders.get(c)) for c in COLUMNS] + [
            f"{fedjax['compile_s']:.2f}" if fedjax else "-",
            _ratio(ratios.get("fedjax_over_floor_jax")),
            _ratio(ratios.get("torch_func_over_fedjax")),
            _ratio(ratios.get("breaching_over_fedjax")),
            _gflops(fedjax),
            f"{row['load_average_1min']:.1f}" if row.get("load_average_1min") is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets(targets: list[dict]) -> list[str]:
    lines = ["| target | holds | measured |", "|---|---|---|"]
    for target in targets:
        verdict = {True: "yes", False: "**no**", None: "(reported)"}[target["holds"]]
        values = ", ".join(f"{k}: {v:.2f}" for k, v in target["values"].items()) or "not measured"
        lines.append(f"| {target['target']} | {verdict} | {values} |")
    return lines


def _memory(rows: list[dict]) -> list[str]:
    header = ("model", "users x examples", "users per chunk", "input data MiB", "RSS before MiB", "peak RSS MiB",
              "first call s", "second call s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        who = f"{r['users']} x {r['steps'] * r['batch']} ({r['steps']} steps x {r['batch']})"
        chunk = r["users_per_chunk"] or (f"auto: {r['chunk_users']}" if r.get("chunk_users") else "auto")
        if r.get("chunks"):
            chunk = f"{chunk} ({r['chunks']} chunks a device)"
        if "error" in r:
            cells = [r["model"], who, chunk, f"failed: {r['error']}"] + [""] * 4
        else:
            cells = [r["model"], who, chunk] + [
                f"{r[key]:.0f}" for key in ("input_mib", "rss_before_mib", "peak_rss_mib")
            ] + ["-" if r[key] is None else f"{r[key]:.1f}" for key in ("first_call_s", "second_call_s")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def markdown(results: dict, memory: Optional[dict] = None) -> str:
    """A human-readable summary: machine, peak, targets, one table per workload kind, memory."""
    m, peak = results["machine"], results["peak"]
    lines = [
        f"# fedjax_users benchmarks (grid `{results['grid']}`)",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB; JAX {m['jax']} on "
        f"`{m['jax_backend']}`, torch {m['torch']} on `{m['torch_device']}` ({m['torch_threads']} threads). "
        f"Load average at start {m['load_average_start']}, at end {m.get('load_average_end')}. "
        f"Run {results['created']}, {results['wall_s']:.0f} s.",
        "",
    ]
    for note in results.get("notes", []):
        lines += [f"Note: {note}", ""]
    if results.get("parts"):
        lines += ["Measured in parts (rows keep their own run's numbers): " + "; ".join(
            f"{p['created']} grid `{p['grid']}` load {p['load_average']}" for p in results["parts"]) + ".", ""]
    lines += [
        f"Measured float32 peak: {peak['peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({peak['start']['method']}; JAX {peak['start']['jax_flops_per_s'] / 1e9:.1f}, "
        f"torch {peak['start']['torch_flops_per_s'] / 1e9:.1f} GFLOP/s at the start).",
        "",
        f"FLOPs: {results['flops_method']}.",
        "",
        "| model | forward MFLOP / example | gradient MFLOP / example |",
        "|---|---|---|",
    ]
    for name, model in results["models"].items():
        lines.append(f"| {name} | {model['forward_flops_per_example'] / 1e6:.1f} | "
                     f"{model['train_flops_per_example'] / 1e6:.1f} |")
    lines += ["", "## Targets of issue 5 (steady state, this run)", ""] + _targets(results["targets"])
    for kind, title in TITLES.items():
        rows = sorted((r for r in results["results"] if r["kind"] == kind),
                      key=lambda r: (r["model"], r["batch"], r["steps"], r["users"]))
        if rows:
            lines += ["", f"## {title}", ""] + _table(rows)
    if memory and memory.get("runs"):
        lines += ["", "## Peak memory of large aggregates (one subprocess each)", "", memory["method"], ""]
        lines += _memory(memory["runs"])
    lines += ["", "## How to read this", "", NOTES, f"Ratios in the JSON: {', '.join(RATIOS)}.", ""]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Time vs size per contender: one row per workload kind, one column per model (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = results["results"]
    kinds = [k for k in TITLES if any(r["kind"] == k for r in rows)]
    models = sorted({r["model"] for r in rows})
    colors = {name: f"C{i}" for i, name in enumerate(COLUMNS)}
    fig, axes = plt.subplots(len(kinds), len(models), figsize=(max(4.2 * len(models), 8.0), 3.4 * len(kinds)),
                             squeeze=False)
    for i, kind in enumerate(kinds):
        for j, model in enumerate(models):
            ax = axes[i][j]
            points = sorted((r for r in rows if r["kind"] == kind and r["model"] == model),
                            key=lambda r: r[X_AXIS[kind]])
            if not points:
                ax.set_axis_off()
                continue
            for name in COLUMNS:
                have = [r for r in points if name in r["contenders"]]
                if have:
                    xs = [r[X_AXIS[kind]] for r in have]
                    ys = [r["contenders"][name]["median_s"] * 1e3 for r in have]
                    ax.plot(xs, ys, marker="o", color=colors[name], label=name,
                            linestyle="--" if name.startswith("floor") else "-")
            sizes = sorted({r[X_AXIS[kind]] for r in points})
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sizes, [str(x) for x in sizes])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(X_AXIS[kind])
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{model}: {kind}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=3)
    fig.suptitle(f"fedjax_users benchmarks ({results['machine']['jax_backend']}, grid {results['grid']})")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict, out_dir: str, memory: Optional[dict] = None) -> dict[str, str]:
    """results.json, results.md, plot.png under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("results.json", "results.md", "plot.png")}
    write_json(results, paths["results.json"])
    with open(paths["results.md"], "w") as handle:
        handle.write(markdown(results, memory))
    plot(results, paths["plot.png"])
    return paths

"""Run a grid of workloads: every contender side by side, one model built at a time."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import time
from typing import Callable, Iterable, Optional

from benchmarks import analysis, contenders, device, fingerprint, flops, pairs, problems, timing
from benchmarks.grid import Workload, grid, notes

# Seconds of alternating rounds per workload (the round count is clipped to [3, 15]).
BUDGET_S = {"smoke": 0.0, "quick": 6.0, "full": 20.0}
MIN_ROUNDS = {"smoke": 1, "quick": 3, "full": 3}
WARMUP = {"smoke": 0, "quick": 1, "full": 1}
PEAK_SIZE = {"smoke": 256}  # others: the device's default (a large matmul)


def _models(workloads: Iterable[Workload]) -> dict[str, list[Workload]]:
    ordered = sorted(workloads, key=lambda w: w.model)
    return {model: list(group) for model, group in itertools.groupby(ordered, key=lambda w: w.model)}


def run(
    grid_name: str,
    models: Optional[set] = None,
    kinds: Optional[set] = None,
    only: Optional[set] = None,
    log: Callable[[str], None] = print,
    keys: Optional[set] = None,
) -> dict:
    """Measure grid ``grid_name`` (optionally filtered) and return the JSON-ready results.

    ``keys``, if given, keeps only the workloads whose :func:`row_key` is in it (the stale rows of
    ``python -m benchmarks --stale``). Every row records the fingerprint of the code it ran on
    (:mod:`benchmarks.fingerprint`).
    """
    started = time.time()
    workloads = [
        w for w in grid(grid_name, device.accelerator())
        if (models is None or w.model in models) and (kinds is None or w.kind in kinds)
        and (keys is None or row_key(dataclasses.asdict(w)) in keys)
    ]
    machine = device.machine()
    run_notes = notes(grid_name, device.accelerator())
    log(f"device: jax {machine['jax_backend']}, torch {machine['torch_device']}; "
        f"{machine['cpu_cores']} cores; load {machine['load_average_start']}")
    busy = machine["load_average_start"] and machine["load_average_start"][0] > (machine["cpu_cores"] or 1)
    if busy:
        run_notes.append(f"the machine was busy when the run started (load {machine['load_average_start']} "
                         f"on {machine['cpu_cores']} cores): timings are inflated and noisier")
        log("warning: " + run_notes[-1])
    peak_start = device.matmul_peak(PEAK_SIZE.get(grid_name, 0))
    log(f"matmul peak: {peak_start['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    torch_device = device.torch_device()
    model_flops, rows = {}, []
    for model, group in _models(workloads).items():
        code = fingerprint.row_fingerprint(fingerprint.SUITE, model)
        pair = pairs.build_pair(model, torch_device)
        forward = flops.forward_flops_per_example(pair.flax_model, pair.variables, problems.IMAGE_SHAPE[1:] + (3,))
        model_flops[model] = dict(
            forward_flops_per_example=forward, train_flops_per_example=flops.train_flops(forward, 1)
        )
        for workload in group:
            data = problems.data_for(workload)
            calls = contenders.build(pair, workload, data, only)
            measured = timing.measure(
                calls, warmup=WARMUP[grid_name], min_rounds=MIN_ROUNDS[grid_name], budget_s=BUDGET_S[grid_name]
            )
            row = analysis.summarise(workload, measured, forward)
            row["load_average_1min"] = next(iter(device.load_average()), None)
            row["measured_at"] = _now()
            row["fingerprint"] = code
            rows.append(row)
            log(_progress_line(row))
            del calls, data
            gc.collect()
        del pair
        gc.collect()
    peak_end = device.matmul_peak(PEAK_SIZE.get(grid_name, 0))
    peak = max(peak_start["peak_flops_per_s"], peak_end["peak_flops_per_s"])
    analysis.add_fraction_of_peak(rows, peak)
    machine["load_average_end"] = device.load_average()
    return dict(
        schema=1,
        grid=grid_name,
        created=_now(),
        wall_s=round(time.time() - started, 1),
        machine=machine,
        peak=dict(start=peak_start, end=peak_end, peak_flops_per_s=peak),
        flops_method=flops.METHOD,
        models=model_flops,
        setup=dict(
            dtype="float32",
            image_shape_nchw=list(problems.IMAGE_SHAPE),
            classes=problems.NUM_CLASSES,
            per_example_clipping=problems.CLIP,
            local_learning_rate=problems.LEARNING_RATE,
            batchnorm="server sends its buffers: users run BatchNorm in eval mode",
            aggregate_users="each user: `steps` local SGD steps of `batch` examples (one step: a gradient)",
        ),
        notes=run_notes,
        results=rows,
        targets=analysis.targets(rows),
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def row_key(row: dict) -> tuple:
    """What names a timing row (or a workload, as a dict) within a grid: kind, model and sizes."""
    return row["kind"], row["model"], row["batch"], row["steps"], row["users"]


def _part(results: dict) -> dict:
    keys = ("grid", "created", "wall_s", "peak", "notes")
    return dict({k: results.get(k) for k in keys}, load_average=results["machine"].get("load_average_start"))


def merge(previous: dict, new: dict) -> dict:
    """``new`` plus the rows of ``previous`` it did not measure again (a grid run in parts).

    Each row keeps the ``fraction_of_peak`` of its own run; ``parts`` lists every run merged.
    """
    fresh = {row_key(r) for r in new["results"]}
    rows = [r for r in previous["results"] if row_key(r) not in fresh] + new["results"]
    return dict(
        new,
        models={**previous["models"], **new["models"]},
        results=rows,
        targets=analysis.targets(rows),
        parts=previous.get("parts", [_part(previous)]) + [_part(new)],
    )


def _progress_line(row: dict) -> str:
    times = ", ".join(f"{name} {stats['median_s'] * 1e3:.1f}" for name, stats in row["contenders"].items())
    return f"{row['kind']:>14} {row['model']:>9} {row['label']:<18} ms: {times}"

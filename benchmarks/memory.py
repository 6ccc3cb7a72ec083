"""Peak memory of large aggregates, each in its own subprocess (so each has its own peak).

The child builds the users' data, resets the kernel's resident-set high-water mark (Linux
``/proc/self/clear_refs``; elsewhere the process-lifetime ``ru_maxrss`` is reported), runs
``aggregate`` twice with a given ``users_per_chunk`` (``None``: the automatic one) and reports the peak. The claim checked:
peak memory grows with the chunk of users in flight, not with the number of users (beyond the
users' input data itself, which the caller holds).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

# 4 local steps of 2 examples: 8 examples a user, as in the aggregate workloads. The same cohort
# in chunks of 500 and of the automatic size, and 1,000 against 10,000 users at one chunk size,
# show the peak following the chunk rather than the cohort.
SPECS = (
    dict(model="lenet_zhu", users=10000, steps=4, batch=2, users_per_chunk=500),
    dict(model="lenet_zhu", users=1000, steps=4, batch=2, users_per_chunk=500),
    dict(model="lenet_zhu", users=10000, steps=4, batch=2, users_per_chunk=None),
    dict(model="resnet20", users=1000, steps=4, batch=2, users_per_chunk=50),
    dict(model="resnet20", users=1000, steps=4, batch=2, users_per_chunk=None),
)
SMOKE_SPECS = (dict(model="lenet_zhu", users=4, steps=2, batch=1, users_per_chunk=2),)
METHOD = (
    "Peak resident set (VmHWM) of a fresh process during its `aggregate` calls (the first one compiles), "
    "high-water mark reset after the users' data is built; RSS before = resident set at that point "
    "(interpreter, libraries, data). Server sends BatchNorm buffers (eval mode), float32, 32x32x3."
)
_MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_mib(reset: bool) -> float:
    if reset:
        return _status_kib("VmHWM") / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_here(
    model: str, users: int, steps: int, batch: int, users_per_chunk: Optional[int], calls: int = 2
) -> dict:
    """Run the aggregate in this process and report its memory (meant for a fresh child process)."""
    import gc

    import jax
    import jax.numpy as jnp

    import fedjax_users as fu
    from fedjax_users import models
    from fedjax_users.strategy import chunking, sharding

    from benchmarks import problems
    from benchmarks.grid import Workload

    workload = Workload("aggregate", model, batch=batch, steps=steps, users=users)
    flax_model = models.get(model, num_classes=problems.NUM_CLASSES)
    data = problems.data_for(workload)
    inputs, labels = data.jax()
    input_mib = data.images_nchw.nbytes / _MIB
    del data
    variables = flax_model.init(jax.random.key(0), inputs[0, :1])
    payload = fu.ServerPayload(params=variables["params"], batch_stats=variables.get("batch_stats") or None)
    cfg = problems.user_config(workload)
    gc.collect()
    rss_before = _status_kib("VmRSS") / 1024
    reset = _reset_peak()
    strategy = fu.choose_strategy(flax_model, payload, fu.UserData(inputs=inputs, labels=labels), cfg,
                                  fu.strategy.Strategy(users_per_chunk=users_per_chunk))
    per_device = sharding.users_per_device(users, sharding.users_mesh(strategy.devices))
    chunks = chunking.num_chunks(per_device, strategy.users_per_chunk)
    times = []
    for call in range(calls):
        start = time.perf_counter()
        shared, _ = fu.aggregate(flax_model, payload, fu.UserData(inputs=inputs, labels=labels), cfg,
                                 jax.random.key(1), strategy=strategy)
        jax.block_until_ready(shared.gradients)
        times.append(time.perf_counter() - start)
    finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(shared.gradients))
    return dict(
        model=model, users=users, steps=steps, batch=batch, examples_per_user=steps * batch,
        users_per_chunk=users_per_chunk, chunks=chunks, chunk_users=strategy.users_per_chunk,
        input_mib=input_mib, rss_before_mib=rss_before,
        peak_rss_mib=_peak_mib(reset), peak_since_data_built=reset,
        first_call_s=times[0], second_call_s=times[1] if calls > 1 else None, finite=finite,
        backend=jax.default_backend(), devices=jax.device_count(),
    )


def measure_in_subprocess(spec: dict, timeout_s: float = 1800) -> dict:
    """Run one spec in a fresh interpreter and return what it reports (or the error)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s,
    )
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return dict(spec, error=last[0])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(specs=SPECS, log=print) -> dict:
    """Every spec in its own subprocess; JSON-ready results with the method."""
    from benchmarks import fingerprint

    runs = []
    for spec in specs:
        result = measure_in_subprocess(spec)
        result["fingerprint"] = fingerprint.row_fingerprint(fingerprint.MEMORY, spec["model"])
        runs.append(result)
        if "error" in result:
            log(f"memory {spec}: failed: {result['error']}")
        else:
            log(f"memory {result['model']} {result['users']} users x {result['examples_per_user']}, chunk "
                f"{result['users_per_chunk']}: peak {result['peak_rss_mib']:.0f} MiB "
                f"(before {result['rss_before_mib']:.0f}), first call {result['first_call_s']:.1f} s")
    return dict(method=METHOD, runs=runs)


if __name__ == "__main__":
    print(json.dumps(measure_here(**json.loads(sys.argv[1]))))

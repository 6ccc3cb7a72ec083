"""Where the benchmark runs: device detection, synchronisation, machine description, matmul peak."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch


def accelerator() -> bool:
    """Whether JAX runs on a GPU/TPU (the grid and sizes follow JAX, the subject of the benchmark)."""
    return jax.default_backend() != "cpu"


def torch_device() -> torch.device:
    """The device the PyTorch contenders use: CUDA when torch sees it."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_sync(device: torch.device) -> None:
    """Wait for queued torch kernels (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def load_average() -> list[float]:
    """1/5/15-minute load averages: other work on the machine distorts every timing."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    """Description of the machine and software that produced the numbers."""
    import flax

    return dict(
        cpu=_cpu_model(),
        cpu_cores=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        memory_gib=round(_memory_gib(), 1),
        platform=platform.platform(),
        python=platform.python_version(),
        jax=jax.__version__,
        jax_backend=jax.default_backend(),
        jax_devices=[str(d) for d in jax.devices()],
        flax=flax.__version__,
        torch=torch.__version__,
        torch_device=str(torch_device()),
        torch_threads=torch.get_num_threads(),
        cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        load_average_start=load_average(),
        nice=os.nice(0),  # a negative niceness shields the run from other work on the machine
    )


def _best_time(call: Callable[[], None], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(size: int = 0, repeats: int = 5) -> dict:
    """Measured float32 peak: FLOP/s of a large square matmul in JAX and in torch (best of ``repeats``)."""
    size = size or (8192 if accelerator() else 2048)
    flops = 2.0 * size**3
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    matmul = jax.jit(jnp.matmul)
    jax_time = _best_time(lambda: matmul(a, b).block_until_ready(), repeats)
    device = torch_device()
    ta, tb = torch.from_numpy(a_np).to(device), torch.from_numpy(b_np).to(device)

    def torch_matmul() -> None:
        torch.mm(ta, tb)
        torch_sync(device)

    torch_time = _best_time(torch_matmul, repeats)
    return dict(
        size=size,
        jax_flops_per_s=flops / jax_time,
        torch_flops_per_s=flops / torch_time,
        peak_flops_per_s=flops / min(jax_time, torch_time),
        method=f"best of {repeats} float32 {size}x{size} matmuls (2 n^3 FLOPs), jax.jit(jnp.matmul) and torch.mm",
    )

"""Time the plain batch gradient (the benchmarks' JAX floor) under one setting of ``XLA_FLAGS``.

``XLA_FLAGS=--xla_cpu_use_onednn=true python -m benchmarks.studies.xla_cpu_flags`` prints one line: the
median of 7 jitted ``jax.grad`` calls of the mean loss for lenet_zhu (B=256), ConvNet (B=8) and
resnet18 (B=8). XLA reads the flags when the backend starts, so each setting needs its own process.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from fedjax_users import losses, models

WORKLOADS = (("lenet_zhu", 256), ("ConvNet", 8), ("resnet18", 8))


def median_ms(fn, *args, reps: int = 7) -> float:
    """Median wall time of ``fn(*args)`` after warm-up (``benchmarks.timing.measure``), in milliseconds."""
    measured = timing.measure({"floor": lambda: jax.block_until_ready(fn(*args))}, min_rounds=reps, max_rounds=reps)
    return measured["floor"].summary()["median_s"] * 1e3


def floor_ms(name: str, batch: int) -> float:
    """The jitted batch gradient of ``name`` on ``batch`` random CIFAR-size images."""
    model = models.get(name, num_classes=10, num_channels=3)
    x = jnp.asarray(np.random.RandomState(0).randn(batch, 32, 32, 3), jnp.float32)
    y = jnp.arange(batch) % 10
    variables = model.init(jax.random.key(0), x[:1])

    def loss(params):
        return losses.softmax_cross_entropy(model.apply({**variables, "params": params}, x), y).mean()

    return median_ms(jax.jit(jax.grad(loss)), variables["params"])


def main() -> None:
    """Print the flags and each workload's floor."""
    timings = "; ".join(f"{name} B={batch}: {floor_ms(name, batch):.1f} ms" for name, batch in WORKLOADS)
    print(f"{os.environ.get('XLA_FLAGS') or 'default'} | {timings}")


if __name__ == "__main__":
    main()

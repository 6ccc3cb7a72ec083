"""``python -m benchmarks.studies.kernel_layout``: per-user kernel gradients of im2col convolutions, by layout.

For each convolution of lenet_zhu, times the gradient in the kernel of a ``vmap`` over users
(each with its own kernel, as in an aggregate's local steps) of ``patches.conv_as_matmul``,
which passes the kernel through a transpose behind an optimization barrier, against the same
im2col matmul with the kernel used as it is. XLA:CPU contracts the positions into ``[fan_in,
features]`` in the second case and into ``[features, fan_in]`` in the first. Prints the median
microseconds of each (``benchmarks.timing.measure``: alternating, each timed call after an
untimed one), and the largest difference between their gradients relative
to the largest gradient entry.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from fedjax_users import models
from fedjax_users.strategy import patches


def _plain(module: nn.Conv, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The im2col matmul without the barrier (what ``conv_as_matmul`` computed before it)."""
    cols = patches.im2col(module, x)
    return jnp.einsum("n...k,kf->n...f", cols, kernel.reshape(-1, kernel.shape[-1]))


def _layers(inputs: jax.Array) -> list[tuple[str, nn.Conv, tuple[int, ...], tuple[int, ...]]]:
    """lenet_zhu's convolutions: name, module, one input's shape, kernel shape."""
    model = models.get("lenet_zhu", num_classes=10, num_channels=3)
    found = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and type(context.module) is nn.Conv:
            kernel = context.module.variables["params"]["kernel"]
            found.append(("/".join(context.module.path), context.module.clone(parent=None),
                          tuple(args[0].shape[1:]), tuple(kernel.shape)))
        return next_fun(*args, **kwargs)

    variables = model.init(jax.random.key(0), inputs)
    with nn.intercept_methods(record):
        model.apply(variables, inputs)
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print one line per layer."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.kernel_layout", description=__doc__)
    parser.add_argument("--users", type=int, default=6, help="users in the vmap (the aggregate's automatic chunk)")
    parser.add_argument("--examples", type=int, default=2, help="examples per user and step")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    print(f"JAX {jax.__version__} on {jax.default_backend()}; {args.users} users x {args.examples} examples, "
          "gradient in each user's kernel, median us")
    for name, module, input_shape, kernel_shape in _layers(jnp.zeros((1, 32, 32, 3))):
        x = jnp.asarray(rng.standard_normal((args.users, args.examples) + input_shape, dtype=np.float32))
        kernels = jnp.asarray(rng.standard_normal((args.users,) + kernel_shape, dtype=np.float32))
        variants = {}
        for label, conv in (("barrier", lambda x, k: patches.conv_as_matmul(module, x, k, None)),
                            ("plain", lambda x, k: _plain(module, x, k))):
            loss = lambda k, x, conv=conv: jnp.sum(jnp.sin(conv(x, k)))  # noqa: E731
            variants[label] = jax.jit(jax.vmap(jax.grad(loss)))
        grads = {label: fn(kernels, x) for label, fn in variants.items()}
        measured = timing.measure(
            {label: lambda fn=fn: jax.block_until_ready(fn(kernels, x)) for label, fn in variants.items()},
            min_rounds=args.rounds, max_rounds=args.rounds,
        )
        us = {label: m.summary()["median_s"] * 1e6 for label, m in measured.items()}
        diff = float(jnp.max(jnp.abs(grads["barrier"] - grads["plain"])) / jnp.max(jnp.abs(grads["plain"])))
        print(f"{name:<8} kernel {kernel_shape}: barrier {us['barrier']:7.1f} us, "
              f"plain {us['plain']:7.1f} us, largest difference {diff:.1e} of the largest entry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

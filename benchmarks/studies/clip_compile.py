"""``python -m benchmarks.studies.clip_compile``: does per-example clipping compile once, however many chunks?

Traces, lowers and compiles ``clipping.clipped_mean_gradient`` on lenet_zhu (64 examples by
default) for several chunk sizes, with JAX's persistent compilation cache off, and prints the
seconds each took. When chunks were unrolled, every chunk was traced and compiled again and the
time grew with their number; as one ``lax.scan`` it should not. ``--checkout DIR`` imports
``fedjax_users`` from another checkout (e.g. a worktree of an older commit) to compare.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print one line per chunk size: chunks, trace+lower seconds, compile seconds."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.clip_compile", description=__doc__)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 16, 4, 1], help="examples per chunk")
    parser.add_argument("--checkout", help="import fedjax_users from this checkout instead")
    args = parser.parse_args(argv)
    if args.checkout:
        sys.path.insert(0, args.checkout)

    import jax
    import jax.numpy as jnp

    from fedjax_users import models
    from fedjax_users.losses import softmax_cross_entropy
    from fedjax_users.strategy import clipping

    # A cached program would time a read, not a compile.
    jax.config.update("jax_enable_compilation_cache", False)
    model = models.get("lenet_zhu", num_classes=10, num_channels=3)
    inputs = jax.random.normal(jax.random.key(0), (args.examples, 32, 32, 3))
    labels = jnp.arange(args.examples) % 10
    params = model.init(jax.random.key(1), inputs[:1])["params"]

    def objective(p, example):
        x, y = example
        return jnp.mean(softmax_cross_entropy(model.apply({"params": p}, x[None]), y[None])), ()

    print(f"fedjax_users from {clipping.__file__}; lenet_zhu, {args.examples} examples; JAX {jax.__version__}")
    for size in args.chunks:
        # A new jit each time: its own trace, not the previous size's cached one.
        fn = jax.jit(clipping.clipped_mean_gradient, static_argnums=0, static_argnames="examples_per_chunk")
        start = time.perf_counter()
        lowered = fn.lower(objective, params, (inputs, labels), 1.0, examples_per_chunk=size)
        traced = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        chunks = len(clipping.chunk_bounds(args.examples, size))
        print(f"{size:4d} examples a chunk, {chunks:3d} chunks: trace+lower {traced - start:5.2f} s, "
              f"compile {done - traced:5.2f} s, total {done - start:5.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

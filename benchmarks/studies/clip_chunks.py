"""``python -m benchmarks.studies.clip_chunks``: clipped lenet_zhu gradients by chunk of examples, and why chunks.

For each batch size, times ``clipping.clipped_mean_gradient`` in chunks of several sizes, jitted
with the memory-optimized XLA:CPU scheduler (``fu.strategy.compiler_options()``) and with XLA's default
scheduler, alternating
the variants after an untimed switch-in call each. Prints the median ms, XLA's scratch (MiB), and
the minor page faults and kernel (system) ms per call of each variant: under the default scheduler
the chunks' scratch adds up, and past 32 MiB every call faults it in afresh. ``fu.strategy.jit`` takes the
memory-optimized variant where the default one's scratch passes that threshold.
"""

from __future__ import annotations

import argparse
import resource
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

import fedjax_users as fu
from benchmarks import timing
from fedjax_users import models
from fedjax_users.strategy import clipping
from fedjax_users.losses import softmax_cross_entropy


def _usage() -> tuple[int, float]:
    """Minor page faults and kernel seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print one line per batch size and variant."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.clip_chunks", description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 32, 64],
                        help="examples per chunk; 0 = the automatic choice (clipping.auto_examples_per_chunk)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)

    model = models.get("lenet_zhu", num_classes=10, num_channels=3)

    def objective(params, example):
        x, y = example
        return jnp.mean(softmax_cross_entropy(model.apply({"params": params}, x[None]), y[None])), ()

    print(f"JAX {jax.__version__} on {jax.default_backend()}; median ms, XLA scratch, page faults and kernel ms a call")
    for batch in args.batches:
        inputs = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
        labels = jnp.arange(batch) % 10
        params = model.init(jax.random.key(1), inputs[:1])["params"]
        variants = {}
        for size in args.chunks:
            chunk = None if size == 0 else min(size, batch)
            fn = lambda p, x, y, chunk=chunk: clipping.clipped_mean_gradient(  # noqa: E731
                objective, p, (x, y), 1.0, examples_per_chunk=chunk)[0]
            for name, options in (("memory-opt.", fu.strategy.compiler_options()), ("default", None)):
                compiled = jax.jit(fn, compiler_options=options or None).lower(params, inputs, labels).compile()
                scratch = compiled.memory_analysis().temp_size_in_bytes / 2**20
                variants[f"chunk {size or 'auto'}, {name}"] = (compiled, scratch)
        faults, kernel_s = dict.fromkeys(variants, 0), dict.fromkeys(variants, 0.0)
        calls = dict.fromkeys(variants, 0)

        def counted(name, compiled):
            # Page faults and kernel time of every call (timed or not), averaged below.
            def call():
                faults_before, kernel_before = _usage()
                jax.block_until_ready(compiled(params, inputs, labels))
                faults_after, kernel_after = _usage()
                faults[name] += faults_after - faults_before
                kernel_s[name] += kernel_after - kernel_before
                calls[name] += 1
            return call

        measured = timing.measure(
            {name: counted(name, compiled) for name, (compiled, _) in variants.items()},
            min_rounds=args.rounds, max_rounds=args.rounds,
        )
        for name, (_, scratch) in variants.items():
            print(f"B={batch:<4} {name:<22} {measured[name].summary()['median_s'] * 1e3:7.2f} ms  "
                  f"{scratch:6.1f} MiB  {faults[name] // calls[name]:6d} faults  "
                  f"{kernel_s[name] / calls[name] * 1e3:6.1f} kernel ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

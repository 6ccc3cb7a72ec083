"""Every constant and heuristic the execution strategy tunes for XLA:CPU, with the command behind it.

Measured on the 2-core CPU machine of the committed benchmark results (JAX 0.10.2). None of
these changes what a user computes, only how fast and in how much memory; on other platforms
the strategy does not use them unless stated.

Example::

    >>> import jax
    >>> from fedjax_users.strategy import cpu
    >>> cpu.platform_of(jax.devices("cpu")), cpu.is_cpu(jax.devices("cpu"))
    ('cpu', True)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax

__all__ = [
    "CLIP_CHUNK_BYTES",
    "COMPILER_OPTIONS",
    "MAX_UNROLLED_STEPS",
    "MIN_EXAMPLES_PER_CHUNK",
    "MMAP_THRESHOLD_BYTES",
    "USERS_CHUNK_BYTES",
    "is_cpu",
    "platform_of",
]


def platform_of(devices: Optional[Sequence[jax.Device]] = None) -> str:
    """The platform the users run on: the one place the platform is decided.

    Args:
      devices: the devices the users run on; ``None`` (or empty) for ``jax.devices()``.

    Returns:
      The first device's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.

    Example::

        >>> import jax
        >>> platform_of(jax.devices("cpu"))
        'cpu'
    """
    return (tuple(devices) if devices else jax.devices())[0].platform


def is_cpu(devices: Optional[Sequence[jax.Device]] = None) -> bool:
    """Whether the constants below apply: the users run on XLA:CPU.

    Args:
      devices: as in :func:`platform_of`.

    Returns:
      ``platform_of(devices) == "cpu"``.

    Example::

        >>> import jax
        >>> is_cpu(jax.devices("cpu"))
        True
    """
    return platform_of(devices) == "cpu"


# glibc's largest mmap threshold: larger blocks are always mapped afresh, so XLA:CPU's scratch
# past this size is faulted in page by page on every call (clipped lenet_zhu, 256 examples in one
# program of 63 MiB: 16,000 faults and 25 ms of kernel time in a 32 ms call;
# ``python -m benchmarks.studies.clip_chunks``).
MMAP_THRESHOLD_BYTES = 32 * 2**20

# XLA:CPU's memory-optimized scheduler runs independent work one piece after another in reused
# buffers, instead of side by side in buffers alive together. Taken only by programs whose default
# scratch passes ``MMAP_THRESHOLD_BYTES``: below it the lost overlap costs more than the faults
# (``python -m benchmarks.studies.clip_chunks``: at 256 and 512 examples it halves the time; at 64
# and 128 the two are close and runs are bimodal).
COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

# Scratch one chunk of examples of per-example clipping may take: far below the mmap threshold
# even when the scheduler keeps two chunks alive (``python -m benchmarks.studies.clip_chunks``).
CLIP_CHUNK_BYTES = 8 * 2**20
# Smaller chunks lose more to small convolutions than they save in scratch (resnet18, 32
# examples: 720 ms in 16 chunks of 2, 556 ms in one; ``python -m benchmarks``' clipped rows).
MIN_EXAMPLES_PER_CHUNK = 32

# A chunk of users larger than this only loses cache locality (1,000 lenet_zhu users of 8
# examples: 0.8 s in chunks of 10 users, 2.7 s in chunks of 100, 2.9 s in one chunk of 1,000;
# ``python -m benchmarks --memory``).
USERS_CHUNK_BYTES = 8 * 2**20

# Local steps up to this many are unrolled: XLA:CPU runs convolution weight gradients inside a
# while loop many times slower than the same step outside one. Earlier sessions put the factor
# anywhere from 2x to 90x depending on the layer, in runs no committed command reproduces; the
# local_update rows of ``python -m benchmarks`` measure the unrolled steps as they are. Longer
# schedules keep the loop so that compile time does not grow with the number of steps.
MAX_UNROLLED_STEPS = 16

"""The XLA compile options under which per-example clipping runs best, and ``jit`` with them.

XLA:CPU's default scheduler is concurrency-optimized: it orders independent operations so that
they can run side by side, and so keeps their scratch buffers alive together. The chunks of
examples of per-example clipping (``fedjax_users.clipping``) then need scratch for every chunk
at once, not for one: 63 MiB instead of 12 for clipped lenet_zhu at 256 examples. XLA:CPU
allocates that scratch on every call, and past glibc's mmap threshold each call touches fresh
pages, whose faults cost more than the arithmetic (16,000 faults, 33 against 16 ms a call;
``python -m benchmarks.clip_chunks``). The memory-optimized scheduler runs the chunks one after
another in reused buffers.

It is no general win: programs of small independent convolutions gain from running them side by
side (resnet18, 4 users of an aggregate: 300 ms memory-optimized, 255 ms by default), and
elsewhere it measured within noise. So fedjax_users' own jitted step uses it for clipping users
only, when that step is the program (an eager call); a caller that jits a program around a
clipped ``local_gradient`` gets it with ``fedjax_users.jit``. A compile option applies to a
whole program, and only the outermost ``jax.jit`` takes one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
from jax._src import core as _jax_core

# JAX's own test for "no transformation is tracing"; it has no public alias.
_trace_state_clean: Optional[Callable[[], bool]] = getattr(_jax_core, "trace_state_clean", None)

# Valid on every backend (XLA ignores another backend's options); given only on CPU.
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(platform: Optional[str] = None) -> dict[str, Any]:
    """Compile options for ``platform`` (default: JAX's default backend); empty off CPU."""
    platform = platform or jax.default_backend()
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else {}


def jit(fun: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit`` with :func:`compiler_options` added: how to jit a program around a clipped ``local_gradient``."""
    options = {**compiler_options(), **(jit_kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=options or None, **jit_kwargs)


def tracing() -> bool:
    """Whether a JAX transformation is tracing now (a nested ``jit`` may not take compile options)."""
    # Without JAX's check, assume a trace: steps then run without options, never with forbidden ones.
    return True if _trace_state_clean is None else not _trace_state_clean()


def top_level_jit(fun: Callable, wants_options: Callable[..., bool], **jit_kwargs: Any) -> Callable:
    """``fun`` jitted, with :func:`compiler_options` when ``wants_options(*args, **kwargs)`` and no trace is on."""
    plain = jax.jit(fun, **jit_kwargs)
    tuned: dict[tuple, Callable] = {}

    @functools.wraps(fun)
    def call(*args, **kwargs):
        options = compiler_options() if wants_options(*args, **kwargs) and not tracing() else {}
        if not options:
            return plain(*args, **kwargs)
        key = tuple(sorted(options.items()))
        if key not in tuned:
            tuned[key] = jax.jit(fun, compiler_options=options, **jit_kwargs)
        return tuned[key](*args, **kwargs)

    return call

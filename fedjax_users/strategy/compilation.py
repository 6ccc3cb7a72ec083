"""XLA compile options where they pay, and ``jit`` with them.

XLA:CPU's default scheduler is concurrency-optimized: it orders independent operations so that
they can run side by side, and so keeps their scratch buffers alive together. The chunks of
examples of per-example clipping (``strategy.clipping``) then need scratch for every chunk at
once, not for one, and XLA:CPU allocates that scratch on every call: past glibc's mmap threshold
each call touches fresh pages, whose faults cost more than the arithmetic. The memory-optimized
scheduler runs the chunks one after another in reused buffers.

It is no general win: programs of small independent operations gain from running them side by
side on the cores. So it is taken only where the scratch of the default program passes the mmap
threshold: by fedjax_users' own jitted step for clipping users, when that step is the program
(an eager call), and by ``strategy.jit`` for a caller's program around one. A compile option
applies to a whole program, and only the outermost ``jax.jit`` takes one. The measurements
behind this are in ``strategy.cpu``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, Optional

import jax
import jax.numpy as jnp

from fedjax_users.strategy import cpu

__all__ = ["compiler_options", "jit", "signature", "top_level_jit", "tracing"]


def compiler_options(platform: Optional[str] = None) -> dict[str, Any]:
    """Compile options for ``platform`` (default: that of ``jax.devices()``); empty off CPU.

    Args:
      platform: a JAX platform name (``"cpu"``, ``"gpu"``, ``"tpu"``), or ``None``.

    Returns:
      A fresh dict: ``cpu.COMPILER_OPTIONS`` (the memory-optimized scheduler) on CPU, else ``{}``.

    Example::

        >>> compiler_options("gpu"), compiler_options("cpu") == dict(cpu.COMPILER_OPTIONS)
        ({}, True)
    """
    platform = platform or cpu.platform_of()
    return dict(cpu.COMPILER_OPTIONS) if platform == "cpu" else {}


def jit(fun: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit`` that adds :func:`compiler_options` to programs whose scratch would be page-faulted every call.

    Args:
      fun: the function to compile.
      **jit_kwargs: ``jax.jit``'s arguments (a ``compiler_options`` of the caller's is kept).

    Returns:
      The jitted function (``top_level_jit`` with options wanted for every call).

    Example::

        >>> import jax.numpy as jnp
        >>> jit(lambda x: 2 * x)(jnp.ones(2)).tolist()
        [2.0, 2.0]
    """
    return top_level_jit(fun, lambda *args, **kwargs: True, **jit_kwargs)


def tracing(*trees: Any) -> bool:
    """Whether a JAX transformation is tracing now (a nested ``jit`` may not take compile options).

    True under a staging trace (``jit``, ``eval_shape``: there even a fresh constant is a tracer)
    or when any leaf of ``trees`` is a tracer (``vmap``, ``grad`` and friends trace the arguments).

    Args:
      *trees: the arguments of the call being decided on.

    Returns:
      Whether a trace is on.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> seen = []
        >>> _ = jax.vmap(lambda x: seen.append(tracing(x)) or x)(jnp.ones(2))
        >>> tracing(jnp.ones(2)), seen
        (False, [True])
    """
    if not _at_top_level():
        return True
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def _at_top_level() -> bool:
    """No JAX trace is on: JAX's own trace state where this JAX has it (0.2 us), else whether a
    fresh constant comes out a tracer (70 us: an op dispatched on every eager user call)."""
    try:
        from jax._src.core import trace_state_clean  # not public: checked, with the fallback below
    except ImportError:
        return not isinstance(jnp.zeros(()), jax.core.Tracer)
    return trace_state_clean()


def signature(args: tuple, kwargs: Optional[dict] = None) -> Hashable:
    """A cache key for a call: shapes and dtypes of its array arguments, the others as they are.

    Args:
      args: the call's positional arguments.
      kwargs: its keyword arguments, or ``None``.

    Returns:
      A hashable key: the arguments' tree structure and, per leaf, ``(shape, dtype name)`` for an
      array (or shape-dtype struct) and the leaf itself otherwise.

    Example::

        >>> import jax.numpy as jnp
        >>> signature((jnp.ones((2, 3)), 5)) == signature((jnp.zeros((2, 3)), 5))
        True
        >>> signature((jnp.ones((2, 3)), 5)) == signature((jnp.ones((3, 2)), 5))
        False
    """
    leaves, treedef = jax.tree_util.tree_flatten((tuple(args), kwargs or {}))
    return treedef, tuple(
        (tuple(leaf.shape), str(leaf.dtype)) if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else leaf
        for leaf in leaves
    )


def top_level_jit(fun: Callable, wants_options: Callable[..., bool], **jit_kwargs: Any) -> Callable:
    """``fun`` jitted, with :func:`compiler_options` where they pay: see the module docstring.

    Options are considered when ``wants_options(*args, **kwargs)`` and no trace is on, and taken
    when the program compiled without them needs more than ``cpu.MMAP_THRESHOLD_BYTES`` of scratch
    (decided once per argument signature; the plain compile is the one the plain call reuses).

    Args:
      fun: the function to compile.
      wants_options: ``wants_options(*args, **kwargs)``, whether a call may take the options (a
        clipping user's step, say).
      **jit_kwargs: ``jax.jit``'s arguments; a ``compiler_options`` of the caller's is kept in
        both programs.

    Returns:
      A function with ``fun``'s signature and results, dispatching to the plain or the tuned program.

    Example::

        >>> import jax.numpy as jnp
        >>> add_one = top_level_jit(lambda x: x + 1, lambda x: x.size > 1)
        >>> add_one(jnp.ones(2)).tolist(), add_one(jnp.ones(1)).tolist()
        ([2.0, 2.0], [2.0])
    """
    own = jit_kwargs.pop("compiler_options", None) or {}  # the caller's, kept in both programs
    plain = jax.jit(fun, compiler_options=own or None, **jit_kwargs)
    tuned: dict[tuple, Callable] = {}
    decided: dict[Hashable, bool] = {}

    @functools.wraps(fun)
    def call(*args, **kwargs):
        options = compiler_options() if wants_options(*args, **kwargs) and not tracing(args, kwargs) else {}
        if not options:
            return plain(*args, **kwargs)
        key = signature(args, kwargs)
        if key not in decided:
            # jit reuses this compile for the plain call below: the check costs no second compile.
            stats = plain.lower(*args, **kwargs).compile().memory_analysis()
            decided[key] = stats is not None and stats.temp_size_in_bytes > cpu.MMAP_THRESHOLD_BYTES
        if not decided[key]:
            return plain(*args, **kwargs)
        chosen = tuple(sorted(options.items()))
        if chosen not in tuned:
            tuned[chosen] = jax.jit(fun, compiler_options={**options, **own}, **jit_kwargs)
        return tuned[chosen](*args, **kwargs)

    return call

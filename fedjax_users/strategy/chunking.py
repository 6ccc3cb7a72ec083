"""Summing per-user updates over many users with memory bounded by a chunk of users.

Users run a chunk at a time: ``run_chunk`` computes one chunk inside a jitted step and
``sum_chunks`` loops over the chunks on the host, carrying only the running sum, so peak memory
grows with the users in flight, not with their total. Within a chunk a *chunk function* computes
the kept users' summed update; ``vmap_sum`` builds one from a per-user function.
``auto_users_per_chunk`` picks the chunk from what XLA says one user needs and a memory budget.

The loop is a Python loop, not ``lax.scan``, for users with convolutions: XLA:CPU runs
convolution weight gradients inside a while loop many times slower than outside one (see
``strategy.cpu``), and all chunks have one shape, so the jitted step compiles once. Users whose
convolutions run as matmuls (``fedjax_users.strategy.patches``) loop over their chunks in one
``lax.scan`` (``scan_chunks``), which saves the host loop's dispatch and, under an outer ``jit``,
keeps the program from growing with the number of chunks.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_users.strategy import compilation, cpu

__all__ = [
    "DEFAULT_MEMORY_FRACTION", "ChunkFn", "StepFn", "UserFn", "auto_users_per_chunk", "available_memory_bytes",
    "in_user_order", "masked_sum", "num_chunks", "per_user_bytes", "run_chunk", "scan_chunks", "sum_chunks",
    "tree_add", "user_bytes", "vmap_sum",
]

Array = jax.Array
PyTree = Any
# user_fn(shared, *one_user) -> (the user's update, to be summed; per-user outputs, kept for every user)
UserFn = Callable[..., tuple[PyTree, PyTree]]
# chunk_fn(shared, users of one chunk, keep [chunk] bool) -> (sum of the kept users' updates, per-user outputs)
ChunkFn = Callable[[PyTree, PyTree, Array], tuple[PyTree, PyTree]]
# step(first chunk, count) -> (the chunks' summed update, their per-user outputs [count, groups, size, ...])
StepFn = Callable[[int, int], tuple[PyTree, PyTree]]

# Share of the free memory a chunk of users may use by default: the rest is headroom for the
# inputs, the per-user outputs and XLA's own buffers.
DEFAULT_MEMORY_FRACTION = 0.25


def masked_sum(updates: PyTree, keep: Array) -> PyTree:
    """Sum over the leading users axis of the users with ``keep``.

    Args:
      updates: a pytree whose leaves stack the users on a leading axis.
      keep: ``[users]`` booleans, the users summed.

    Returns:
      The sum, each leaf without the users axis; a user not kept adds nothing, not even its inf or NaN.

    Example::

        >>> import jax.numpy as jnp
        >>> masked_sum({"u": jnp.array([[1.0, 2.0], [3.0, jnp.inf]])}, jnp.array([True, False]))["u"].tolist()
        [1.0, 2.0]
    """

    def total(u):
        mask = keep.reshape(keep.shape + (1,) * (u.ndim - 1))
        # where, not multiply: a skipped user's inf or nan must not leak into the sum.
        return jnp.sum(jnp.where(mask, u, jnp.zeros((), u.dtype)), axis=0)

    return jax.tree_util.tree_map(total, updates)


def vmap_sum(fn: UserFn) -> ChunkFn:
    """The chunk function that runs ``fn`` on every user of the chunk (``vmap``) and sums the kept ones.

    Args:
      fn: ``fn(shared, *one_user) -> (update, outputs)`` of one user.

    Returns:
      ``chunk_fn(shared, users, keep) -> (sum of the kept users' updates, every user's outputs)``,
      ``users`` a tuple of arrays stacked ``[chunk, ...]`` and ``keep`` ``[chunk]`` booleans.

    Example::

        >>> import jax.numpy as jnp
        >>> chunk_fn = vmap_sum(lambda shared, u: (shared * u, u))
        >>> total, outputs = chunk_fn(2.0, (jnp.array([1.0, 2.0, 3.0]),), jnp.array([True, True, False]))
        >>> float(total), outputs.tolist()
        (6.0, [1.0, 2.0, 3.0])
    """

    def chunk_fn(shared, users, keep):
        updates, outputs = jax.vmap(fn, in_axes=(None,) + (0,) * len(users))(shared, *users)
        return masked_sum(updates, keep), outputs

    return chunk_fn


def num_chunks(count: int, size: int) -> int:
    """Chunks of ``size`` items (users, or examples in ``clipping``) that cover ``count`` items.

    Args:
      count: the items.
      size: items per chunk.

    Returns:
      ``ceil(count / size)``.

    Example::

        >>> num_chunks(10, 4), num_chunks(8, 4)
        (3, 2)
    """
    return -(-count // size)


def run_chunk(
    chunk_fn: ChunkFn, shared: PyTree, users: PyTree, valid: Array, chunk: Array, size: int
) -> tuple[PyTree, PyTree]:
    """The ``chunk``-th block of ``size`` users: their kept summed update and per-user outputs.

    The block is read in place. When the users do not divide into blocks, the last block is
    shifted back to end at the last user, and the users it repeats are not kept again; users
    without ``valid`` (padding) are never kept.

    Args:
      chunk_fn: ``chunk_fn(shared, users, keep)``, as ``vmap_sum`` builds.
      shared: what every user reads (the server's parameters, say), passed as it is.
      users: a pytree whose leaves stack all users ``[users, ...]``; at least ``size`` users.
      valid: ``[users]`` booleans, the real users.
      chunk: the block's index (an int or a traced integer).
      size: users per block.

    Returns:
      ``chunk_fn``'s result on the block: the kept users' summed update and all ``size`` users' outputs.

    Example::

        >>> import jax.numpy as jnp
        >>> chunk_fn = vmap_sum(lambda shared, u: (u, u))
        >>> users, valid = (jnp.arange(5.0),), jnp.ones(5, bool)
        >>> total, outputs = run_chunk(chunk_fn, None, users, valid, 1, 3)  # users 2, 3, 4; 2 was chunk 0's
        >>> float(total), outputs.tolist()
        (7.0, [2.0, 3.0, 4.0])
    """
    num_users = jax.tree_util.tree_leaves(users)[0].shape[0]
    start = jnp.minimum(chunk * size, num_users - size)

    def take(tree):
        return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), tree)

    # Users before chunk * size were summed by the previous chunk (only the shifted last one overlaps).
    keep = take(valid) & (start + jnp.arange(size) >= chunk * size)
    return chunk_fn(shared, take(users), keep)


def scan_chunks(run_one: Callable[[Array], tuple[PyTree, PyTree]], first: Array, count: int) -> tuple[PyTree, PyTree]:
    """Chunks ``first .. first + count - 1`` of ``run_one(chunk)``: summed updates, outputs stacked ``[count, ...]``.

    More than one chunk runs as a ``lax.scan``, for users whose computation has no convolutions
    left (XLA:CPU runs convolution weight gradients inside a loop far slower than outside one).

    Args:
      run_one: ``run_one(chunk) -> (summed update, outputs)`` of one chunk index.
      first: the first chunk's index (a JAX integer).
      count: how many consecutive chunks.

    Returns:
      ``(total, outputs)``: the chunks' updates summed, and their outputs stacked ``[count, ...]``.

    Example::

        >>> import jax.numpy as jnp
        >>> total, outputs = scan_chunks(lambda c: (c.astype(jnp.float32), 10 * c), jnp.asarray(1), 3)
        >>> float(total), outputs.tolist()
        (6.0, [10, 20, 30])
    """
    if count == 1:
        total, outputs = run_one(first)
        return total, jax.tree_util.tree_map(lambda a: a[None], outputs)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run_one, first)[0])

    def body(running, chunk):
        total, outputs = run_one(chunk)
        return jax.tree_util.tree_map(jnp.add, running, total), outputs

    return jax.lax.scan(body, zeros, first + jnp.arange(count))


def sum_chunks(
    step: StepFn,
    users_per_group: int,
    size: int,
    num_users: int,
    progress: Optional[Callable[[int, int], None]] = None,
    chunks_per_step: int = 1,
) -> tuple[PyTree, PyTree]:
    """Run every chunk through ``step``; the summed update and the per-user outputs in user order.

    ``step(first, count)`` computes chunks ``first .. first + count - 1`` and returns their summed
    update and outputs shaped ``[count, groups, size, ...]``: each group (a device) holds
    ``users_per_group`` consecutive users and computes its ``chunk``-th block of them. A chunk
    index past the last one must add nothing (``run_chunk`` keeps none of its users).
    ``chunks_per_step`` > 1 hands ``step`` all chunks at once, or ``progress`` permitting about a
    tenth of them per call, always the same count, so that ``step`` compiles once.
    ``progress(done, num_users)``, if given, is called before the first call and after each one;
    each call is then waited for, so the host no longer queues work ahead of the devices.

    Args:
      step: ``step(first, count)`` as above.
      users_per_group: consecutive users each group holds.
      size: users per chunk (per group).
      num_users: the real users, the padding of the last group excluded.
      progress: ``progress(done, num_users)``, or ``None``.
      chunks_per_step: chunks one call of ``step`` may compute.

    Returns:
      ``(total, outputs)``: the summed update of all users, and every user's outputs ``[num_users, ...]``.

    Example::

        >>> import jax.numpy as jnp
        >>> users, valid = (jnp.arange(5.0),), jnp.ones(5, bool)
        >>> chunk_fn = vmap_sum(lambda shared, u: (u, 10 * u))
        >>> def step(first, count):  # one group: outputs [count, 1, size]
        ...     run_one = lambda c: run_chunk(chunk_fn, None, users, valid, c, 2)
        ...     total, outputs = scan_chunks(run_one, jnp.asarray(first), count)
        ...     return total, outputs[:, None]
        >>> total, outputs = sum_chunks(step, users_per_group=5, size=2, num_users=5)
        >>> float(total), outputs.tolist()
        (10.0, [0.0, 10.0, 20.0, 30.0, 40.0])
    """
    groups = -(-num_users // users_per_group)
    chunks = num_chunks(users_per_group, size)
    count = min(chunks_per_step, chunks if progress is None else -(-chunks // 10))
    total, outputs = None, []
    if progress is not None:
        progress(0, num_users)
    for first in range(0, chunks, count):
        step_total, step_outputs = step(first, count)
        total = step_total if total is None else tree_add(total, step_total)
        outputs.append(step_outputs)
        if progress is not None:
            jax.block_until_ready(total)
            done = min(chunks, first + count)
            progress(min(num_users, groups * min(users_per_group, done * size)), num_users)
    ordered = jax.tree_util.tree_map(
        lambda *o: in_user_order(o, chunks, users_per_group, size, num_users), *outputs
    )
    return total, ordered


@jax.jit
def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b``, leaf by leaf, in one jitted program (one dispatch for the whole tree).

    Args:
      a: a pytree of arrays.
      b: one of the same structure.

    Returns:
      The sum, in that structure.

    Example::

        >>> import jax.numpy as jnp
        >>> tree_add({"w": jnp.ones(2)}, {"w": jnp.ones(2)})["w"].tolist()
        [2.0, 2.0]
    """
    return jax.tree_util.tree_map(jnp.add, a, b)


def in_user_order(steps: Sequence[Array], chunks: int, users_per_group: int, size: int, num_users: int) -> Array:
    """Per-step outputs ``[count, groups, size, ...]`` as ``[num_users, ...]``.

    Chunks past the last one are dropped, and so are the users the last chunk repeats.

    Args:
      steps: each ``step``'s outputs ``[count, groups, size, ...]``, in order.
      chunks: the chunks per group.
      users_per_group: consecutive users each group holds.
      size: users per chunk.
      num_users: the real users.

    Returns:
      The outputs ``[num_users, ...]``, in user order.

    Example::

        >>> import jax.numpy as jnp
        >>> steps = [jnp.array([[[0, 1]]]), jnp.array([[[2, 3]]]), jnp.array([[[3, 4]]])]  # the last repeats 3
        >>> in_user_order(steps, chunks=3, users_per_group=5, size=2, num_users=5).tolist()
        [0, 1, 2, 3, 4]
    """
    stacked = jnp.concatenate(steps, axis=0)[:chunks]
    full = (chunks - 1) * size
    last = stacked[-1][:, full - (users_per_group - size) :]
    if full:
        before = jnp.moveaxis(stacked[:-1], 0, 1)
        before = before.reshape((before.shape[0], full) + before.shape[3:])
        last = jnp.concatenate([before, last], axis=1)
    return last.reshape((-1,) + last.shape[2:])[:num_users]


# ----------------------------------------------------------------------------------------------
# Choosing the chunk


def available_memory_bytes(device: Optional[jax.Device] = None) -> int:
    """Free memory of ``device``: the accelerator's free bytes, or the host's available RAM for CPU.

    Args:
      device: a JAX device (default: the first local one).

    Returns:
      The free bytes: ``bytes_limit - bytes_in_use`` where the backend reports them, else Linux's
      ``MemAvailable``, else the available physical pages.

    Example::

        >>> available_memory_bytes() > 0
        True
    """
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    # MemAvailable counts reclaimable page cache; SC_AVPHYS_PAGES alone would not.
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _spec(leaf: Any) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf))


def per_user_bytes(fn: UserFn, *one_user_args: Any) -> int:
    """Bytes one user needs beyond the shared inputs: XLA's scratch plus the user's outputs.

    Args:
      fn: one user's function.
      *one_user_args: its arguments (arrays or ``jax.ShapeDtypeStruct``); only shapes and dtypes are read.

    Returns:
      XLA's temporary plus output bytes of ``fn`` compiled for them (on a backend without memory
      analysis, every intermediate's bytes: an upper bound).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> per_user_bytes(lambda x: (2 * x, x + 1), jax.ShapeDtypeStruct((1000,), jnp.float32)) >= 8000
        True
    """
    specs = jax.tree_util.tree_map(_spec, one_user_args)
    stats = jax.jit(fn).lower(*specs).compile().memory_analysis()
    if stats is None:  # a backend without memory analysis: count every intermediate (an upper bound)
        jaxpr = jax.make_jaxpr(fn)(*specs).jaxpr
        return sum(v.aval.size * v.aval.dtype.itemsize for eqn in jaxpr.eqns for v in eqn.outvars)
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


# Per-user byte counts by caller key and argument shapes: measuring one means compiling one user.
_BYTES_CACHE: dict[Hashable, int] = {}


def user_bytes(fn: UserFn, one_user_args: Sequence[Any], cache_key: Optional[Hashable] = None) -> int:
    """``per_user_bytes(fn, *one_user_args)``, measured once per ``cache_key`` and argument shapes
    (``None``: every time): measuring means compiling one user.

    Args:
      fn: one user's function.
      one_user_args: its arguments, as a sequence.
      cache_key: what identifies ``fn`` across calls (a ``User``, say), or ``None``.

    Returns:
      The bytes, as ``per_user_bytes``.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> args = (jax.ShapeDtypeStruct((1000,), jnp.float32),)
        >>> user_bytes(lambda x: 2 * x, args, "doubling") == per_user_bytes(lambda x: 2 * x, *args)
        True
    """
    if cache_key is None:
        return per_user_bytes(fn, *one_user_args)
    key = (cache_key, compilation.signature(one_user_args))
    if key not in _BYTES_CACHE:
        _BYTES_CACHE[key] = per_user_bytes(fn, *one_user_args)
    return _BYTES_CACHE[key]


def auto_users_per_chunk(
    fn: UserFn,
    one_user_args: Sequence[Any],
    num_users: int,
    budget_bytes: Optional[int] = None,
    cache_key: Optional[Hashable] = None,
    platform: Optional[str] = None,
) -> int:
    """Users per chunk so that a chunk fits ``budget_bytes``.

    The default budget is a quarter of the free memory, and at most ``cpu.USERS_CHUNK_BYTES`` on a CPU
    backend (where small chunks run fastest); ``platform`` (default: that of ``jax.devices()``)
    says which. ``one_user_args`` are one user's arguments (arrays
    or ``ShapeDtypeStruct``); the per-user cost comes from compiling ``fn`` for them once (cached
    under ``cache_key`` when given). The result is at least 1 and at most ``num_users``.

    Args:
      fn: one user's function.
      one_user_args: its arguments.
      num_users: the users to cover.
      budget_bytes: the bytes a chunk may take (``None``: the default above).
      cache_key: as for ``user_bytes``.
      platform: the backend's platform name, for the default budget.

    Returns:
      The users per chunk; under several processes the smallest over them (one program for all).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> args = (jax.ShapeDtypeStruct((1000,), jnp.float32),)
        >>> auto_users_per_chunk(lambda x: 2 * x, args, 50, budget_bytes=10**9), auto_users_per_chunk(
        ...     lambda x: 2 * x, args, 50, budget_bytes=1)
        (50, 1)
    """
    if budget_bytes is None:
        budget_bytes = int(DEFAULT_MEMORY_FRACTION * available_memory_bytes())
        if (platform or cpu.platform_of()) == "cpu":
            budget_bytes = min(budget_bytes, cpu.USERS_CHUNK_BYTES)
    cost = user_bytes(fn, one_user_args, cache_key)
    chunk = int(max(1, min(num_users, budget_bytes // max(cost, 1))))
    if jax.process_count() > 1:
        # Every process must compile the same program, and free memory differs between hosts.
        from jax.experimental import multihost_utils

        chunk = int(np.min(multihost_utils.process_allgather(np.asarray(chunk))))
    return chunk

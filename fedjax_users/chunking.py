"""Summing per-user updates over many users with memory bounded by a chunk of users.

``scan_chunks`` runs a ``lax.scan`` over chunks of users and carries only the running sum, so
peak memory grows with the users in flight, not with their total. Within a chunk a *chunk
function* computes the kept users' summed update; ``vmap_sum`` builds one from a per-user
function (``chunked_sum`` is the two together). ``auto_users_per_chunk`` picks the chunk from what
XLA says one user needs and a memory budget.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
# user_fn(shared, *one_user) -> (the user's update, to be summed; per-user outputs, kept for every user)
UserFn = Callable[..., tuple[PyTree, PyTree]]
# chunk_fn(shared, users of one chunk, keep [chunk] bool) -> (sum of the kept users' updates, per-user outputs)
ChunkFn = Callable[[PyTree, PyTree, Array], tuple[PyTree, PyTree]]

# Share of the free memory a chunk of users may use by default: the rest is headroom for the
# inputs, the per-user outputs and XLA's own buffers.
DEFAULT_MEMORY_FRACTION = 0.25


def _leading(tree: PyTree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def masked_sum(updates: PyTree, keep: Array) -> PyTree:
    """Sum over the leading users axis of the users with ``keep``."""

    def total(u):
        mask = keep.reshape(keep.shape + (1,) * (u.ndim - 1))
        # where, not multiply: a skipped user's inf or nan must not leak into the sum.
        return jnp.sum(jnp.where(mask, u, jnp.zeros((), u.dtype)), axis=0)

    return jax.tree_util.tree_map(total, updates)


def vmap_sum(fn: UserFn) -> ChunkFn:
    """The chunk function that runs ``fn`` on every user of the chunk (``vmap``) and sums the kept ones."""

    def chunk_fn(shared, users, keep):
        updates, outputs = jax.vmap(fn, in_axes=(None,) + (0,) * len(users))(shared, *users)
        return masked_sum(updates, keep), outputs

    return chunk_fn


def scan_chunks(
    chunk_fn: ChunkFn,
    shared: PyTree,
    users: PyTree,
    users_per_chunk: int,
    valid: Optional[Array] = None,
) -> tuple[PyTree, PyTree]:
    """The summed update of the users with ``valid[u]``, and every user's outputs in user order.

    ``users`` is a tuple of per-user arguments stacked on a leading users axis. Chunks are read in
    place (no padded copy of the inputs): when the users do not divide into chunks, the last chunk
    is shifted back to end at the last user, and the users it repeats are not kept again.
    """
    num_users = _leading(users)
    size = max(1, min(users_per_chunk, num_users))
    num_chunks = -(-num_users // size)
    valid = jnp.ones((num_users,), bool) if valid is None else valid

    def take(tree, start):
        return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), tree)

    def step(total, chunk):
        start = jnp.minimum(chunk * size, num_users - size)
        # Users before chunk * size were summed by the previous chunk (only the shifted last one overlaps).
        keep = take(valid, start) & (start + jnp.arange(size) >= chunk * size)
        chunk_total, outputs = chunk_fn(shared, take(users, start), keep)
        return jax.tree_util.tree_map(jnp.add, total, chunk_total), outputs

    first = jax.eval_shape(chunk_fn, shared, take(users, 0), valid[:size])[0]
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    total, outputs = jax.lax.scan(step, zeros, jnp.arange(num_chunks))
    return total, jax.tree_util.tree_map(lambda a: _unshift(a, num_users, size), outputs)


def chunked_sum(
    fn: UserFn, shared: PyTree, users: PyTree, users_per_chunk: int, valid: Optional[Array] = None
) -> tuple[PyTree, PyTree]:
    """``sum_u fn(shared, *u)[0]`` over the users with ``valid[u]``, and ``fn(shared, *u)[1]`` stacked."""
    return scan_chunks(vmap_sum(fn), shared, users, users_per_chunk, valid)


def _unshift(stacked: Array, num_users: int, size: int) -> Array:
    """Per-user outputs ``[chunks, size, ...]`` in user order, dropping the last chunk's repeats."""
    flat = stacked.reshape((-1,) + stacked.shape[2:])
    full = (stacked.shape[0] - 1) * size
    last = stacked[-1][full - (num_users - size) :]
    return jnp.concatenate([flat[:full], last], axis=0) if full else last


# ----------------------------------------------------------------------------------------------
# Choosing the chunk


def available_memory_bytes(device: Optional[jax.Device] = None) -> int:
    """Free memory of ``device``: the accelerator's free bytes, or the host's available RAM for CPU."""
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
    """Bytes one user needs beyond the shared inputs: XLA's scratch plus the user's outputs."""
    specs = jax.tree_util.tree_map(_spec, one_user_args)
    stats = jax.jit(fn).lower(*specs).compile().memory_analysis()
    if stats is None:  # a backend without memory analysis: count every intermediate (an upper bound)
        jaxpr = jax.make_jaxpr(fn)(*specs).jaxpr
        return sum(v.aval.size * v.aval.dtype.itemsize for eqn in jaxpr.eqns for v in eqn.outvars)
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


# Per-user byte counts by caller key and argument shapes: measuring one means compiling one user.
_BYTES_CACHE: dict[Hashable, int] = {}


def auto_users_per_chunk(
    fn: UserFn,
    one_user_args: Sequence[Any],
    num_users: int,
    budget_bytes: Optional[int] = None,
    cache_key: Optional[Hashable] = None,
) -> int:
    """Users per chunk so that a chunk fits ``budget_bytes`` (default: a quarter of free memory).

    ``one_user_args`` are one user's arguments (arrays or ``ShapeDtypeStruct``); the per-user cost
    comes from compiling ``fn`` for them once (cached under ``cache_key`` when given). The result
    is at least 1 and at most ``num_users``.
    """
    if budget_bytes is None:
        budget_bytes = int(DEFAULT_MEMORY_FRACTION * available_memory_bytes())
    if cache_key is None:
        cost = per_user_bytes(fn, *one_user_args)
    else:
        key = (cache_key, _signature(one_user_args))
        if key not in _BYTES_CACHE:
            _BYTES_CACHE[key] = per_user_bytes(fn, *one_user_args)
        cost = _BYTES_CACHE[key]
    chunk = int(max(1, min(num_users, budget_bytes // max(cost, 1))))
    if jax.process_count() > 1:
        # Every process must compile the same program, and free memory differs between hosts.
        from jax.experimental import multihost_utils

        chunk = int(np.min(multihost_utils.process_allgather(np.asarray(chunk))))
    return chunk


def _signature(args: Sequence[Any]) -> Hashable:
    leaves, treedef = jax.tree_util.tree_flatten(tuple(args))
    return treedef, tuple((tuple(_spec(leaf).shape), str(_spec(leaf).dtype)) for leaf in leaves)

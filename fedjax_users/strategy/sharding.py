"""The users axis of ``aggregate`` sharded over devices, on one host or many.

Each device holds a contiguous block of users (``place_users``) and runs them a chunk at a time
(``run_chunk`` inside the caller's jitted step, looped over by ``chunking.sum_chunks``); a
``psum`` adds the devices' partial sums.
Per-user outputs (BatchNorm statistics, noised inputs) stay sharded along the users axis. A user
count that does not divide by the device count is padded with copies of the last user that
carry zero weight. Results equal the one-device computation up to float summation order.

Multi-host: one process per host runs the same program, and every process passes the *same*
full ``users_data`` (each host then computes only its own devices' users)::

    import jax
    jax.distributed.initialize(
        coordinator_address="10.0.0.1:1234",  # host 0's address and any free port
        num_processes=2,                      # number of hosts
        process_id=0,                         # 0 .. num_processes - 1, different on each host
    )  # on Cloud TPU, SLURM or Open MPI clusters: jax.distributed.initialize() with no arguments
    shared, true_data = fedjax_users.aggregate(model, payload, users_data, cfg, key)

``aggregate`` uses ``jax.devices()`` (every device of every host) by default. ``shared`` is
replicated on every host; per-user arrays of ``true_data`` (``user_state``, noised inputs) are
global arrays sharded over the hosts, fetched whole with
``jax.experimental.multihost_utils.process_allgather(x, tiled=True)``. CPU-only hosts need
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` before ``initialize``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_users.strategy import chunking

Array = jax.Array
PyTree = Any

USERS_AXIS = "users"


def users_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Optional[Mesh]:
    """A one-axis mesh over ``devices`` (default ``jax.devices()``); ``None`` for a single device."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    if len(devices) == 1:
        return None
    return Mesh(np.asarray(devices), (USERS_AXIS,))


def users_per_device(num_users: int, mesh: Optional[Mesh]) -> int:
    """How many users (padding included) each device of ``mesh`` computes."""
    devices = 1 if mesh is None else mesh.size
    return -(-num_users // devices)


def _pad_users(users: PyTree, padded: int) -> PyTree:
    """Append copies of the last user until there are ``padded`` users."""

    def pad(a):
        extra = padded - a.shape[0]
        return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)], axis=0)

    return jax.tree_util.tree_map(pad, users)


def place_users(users: PyTree, mesh: Optional[Mesh]) -> tuple[PyTree, Array]:
    """Users padded to a multiple of the devices and split over them, and which users are real.

    Device ``d`` holds the ``d``-th block of ``users_per_device`` consecutive users.
    """
    num_users = jax.tree_util.tree_leaves(users)[0].shape[0]
    padded = users_per_device(num_users, mesh) * (1 if mesh is None else mesh.size)
    users = _pad_users(users, padded)
    valid = jnp.arange(padded) < num_users
    if mesh is None:
        return users, valid
    return _put((users, valid), NamedSharding(mesh, PartitionSpec(USERS_AXIS)))


def place_chunk(examples: PyTree, rest: PyTree, kept: np.ndarray, mesh: Optional[Mesh]) -> tuple[PyTree, Array]:
    """One streamed chunk placed as ``place_users`` places a cohort of exactly its users.

    ``examples`` (inputs, labels) hold only this process's users (its devices' blocks, in mesh
    order): on several processes each builds its part of the global array from them, so no
    process reads another's users. ``rest`` (keys, statistics) and ``kept`` hold every user of
    the chunk. Returns ``(examples + rest, kept)`` as ``run_chunk`` takes them.
    """
    users = tuple(examples) + tuple(rest)
    if mesh is None:
        return users, jnp.asarray(kept)
    spec = NamedSharding(mesh, PartitionSpec(USERS_AXIS))
    if jax.process_count() == 1:
        return _put((users, kept), spec)
    total = kept.shape[0]

    def local(leaf):
        return jax.make_array_from_process_local_data(spec, np.asarray(leaf), (total,) + np.shape(leaf)[1:])

    placed_rest, placed_kept = _put((tuple(rest), kept), spec)
    return tuple(jax.tree_util.tree_map(local, tuple(examples))) + tuple(placed_rest), placed_kept


def run_chunk(
    chunk_fn: chunking.ChunkFn,
    shared: PyTree,
    users: PyTree,
    valid: Array,
    chunk: Array,
    size: int,
    mesh: Optional[Mesh] = None,
) -> tuple[PyTree, PyTree]:
    """``chunking.run_chunk`` on every device's own users; outputs ``[devices, size, ...]``.

    ``users`` and ``valid`` come from ``place_users``; ``shared`` (the server's parameters) is
    replicated. The devices' summed updates are added with a ``psum``.
    """
    if mesh is None:
        total, outputs = chunking.run_chunk(chunk_fn, shared, users, valid, chunk, size)
        return total, jax.tree_util.tree_map(lambda a: a[None], outputs)

    def per_device(local_shared, local_users, local_valid, local_chunk):
        total, outputs = chunking.run_chunk(chunk_fn, local_shared, local_users, local_valid, local_chunk, size)
        return jax.lax.psum(total, USERS_AXIS), jax.tree_util.tree_map(lambda a: a[None], outputs)

    spec = PartitionSpec(USERS_AXIS)
    # check_vma=False: with it on, a gradient taken inside a user's computation with respect to a
    # value that is the same on every device (the server's parameters, or zeros the computation
    # creates itself) would be summed over the devices, the transpose of its implicit broadcast.
    # Users are independent, so every device's computation must stay local until the psum.
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(), spec, spec, PartitionSpec()),
        out_specs=(PartitionSpec(), spec),
        check_vma=False,
    )(shared, users, valid, chunk)


def to_global(tree: PyTree, mesh: Optional[Mesh]) -> PyTree:
    """Host values as arrays replicated over ``mesh`` when it spans several processes.

    On one host ``jit`` places the arguments itself. On several, each process passes the same
    values and this builds global arrays from them (each process fills only its own devices).
    """
    if mesh is None or jax.process_count() == 1:
        return tree
    return _put(tree, NamedSharding(mesh, PartitionSpec()))


def _put(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Place every leaf with ``sharding``; on several processes from each one's identical host copy."""

    def put(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(leaf)
            return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=impl)
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)

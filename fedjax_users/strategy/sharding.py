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

__all__ = ["USERS_AXIS", "place_chunk", "place_users", "run_chunk", "to_global", "users_mesh", "users_per_device"]

USERS_AXIS = "users"


def users_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Optional[Mesh]:
    """A one-axis mesh (axis ``USERS_AXIS``) over the devices the users are split over.

    Args:
      devices: the devices, in order; ``None`` for ``jax.devices()`` (every device of every host).

    Returns:
      The mesh, or ``None`` for a single device (the users then run without ``shard_map``).

    Raises:
      ValueError: no device.

    Example::

        >>> import jax
        >>> users_mesh(jax.devices()[:1]) is None
        True
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    if len(devices) == 1:
        return None
    return Mesh(np.asarray(devices), (USERS_AXIS,))


def users_per_device(num_users: int, mesh: Optional[Mesh]) -> int:
    """How many users (padding included) each device of ``mesh`` computes.

    Args:
      num_users: the users of the aggregate.
      mesh: ``users_mesh``'s mesh, or ``None`` for one device.

    Returns:
      ``ceil(num_users / devices)``.

    Example::

        >>> users_per_device(10, None)
        10
    """
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

    Args:
      users: a pytree of arrays with a leading users axis (inputs, labels, keys, statistics).
      mesh: ``users_mesh``'s mesh, or ``None`` for one device.

    Returns:
      ``(users, valid)``: the users padded with copies of the last one (sharded along the users
      axis over ``mesh``), and ``[padded users]`` booleans, ``False`` for the padding.

    Example::

        >>> import jax.numpy as jnp
        >>> users, valid = place_users((jnp.arange(5.0),), None)
        >>> users[0].shape, valid.tolist()
        ((5,), [True, True, True, True, True])
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

    Args:
      examples: ``(inputs, labels)`` of this process's users only (its devices' blocks, in mesh
        order): on several processes each builds its part of the global array from them, so no
        process reads another's users.
      rest: the other per-user arrays (keys, statistics), of every user of the chunk.
      kept: ``[users]`` booleans, the chunk's users that count (``ChunkPlan.positions``).
      mesh: ``users_mesh``'s mesh, or ``None`` for one device.

    Returns:
      ``(examples + rest, kept)``, placed as ``run_chunk`` takes its ``users`` and ``valid``.

    Example::

        >>> import numpy as np
        >>> users, kept = place_chunk((np.ones((2, 3)), np.zeros(2)), (np.arange(2),), np.array([True, False]), None)
        >>> len(users), kept.tolist()
        (3, [True, False])
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

    Args:
      chunk_fn: one chunk of users -> their kept summed update and per-user outputs
        (``chunking.vmap_sum`` of a user).
      shared: what every user reads (the server's parameters), replicated.
      users: ``place_users``'s users.
      valid: ``place_users``'s ``valid``.
      chunk: which block of ``size`` users each device runs (a traced integer).
      size: users a device runs at a time.
      mesh: ``users_mesh``'s mesh, or ``None`` for one device.

    Returns:
      ``(total, outputs)``: the kept users' summed update over every device (a ``psum``) and the
      per-user outputs ``[devices, size, ...]``.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> from fedjax_users.strategy import chunking
        >>> users, valid = place_users((jnp.arange(5.0),), None)
        >>> scaled = chunking.vmap_sum(lambda shared, x: (shared * x, x))
        >>> total, outputs = jax.jit(lambda chunk: run_chunk(scaled, 2.0, users, valid, chunk, size=3))(1)
        >>> float(total), outputs.tolist()  # the last chunk is users 2..4; user 2 was summed by chunk 0
        (14.0, [[2.0, 3.0, 4.0]])
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

    Args:
      tree: a pytree of arrays, the same on every process.
      mesh: ``users_mesh``'s mesh, or ``None`` for one device.

    Returns:
      ``tree`` itself on one process, else its leaves as global arrays replicated over ``mesh``.

    Example::

        >>> import jax.numpy as jnp
        >>> tree = {"w": jnp.ones(2)}
        >>> to_global(tree, None) is tree
        True
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

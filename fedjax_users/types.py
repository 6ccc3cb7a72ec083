"""The values that cross the user boundary: what the server sends, what users hold and share.

All are frozen ``flax.struct`` dataclasses (pytrees: they pass through ``jit`` and ``vmap``);
arrays are pytree nodes, counts and names static fields.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class ServerPayload:
    """Model state sent by the server; ``batch_stats=None`` means the server sends no buffers."""

    params: PyTree
    batch_stats: Optional[PyTree] = None


@flax.struct.dataclass
class UserData:
    """One user's examples (leading axis), or many users' (leading users axis, then examples).

    Integer ``inputs`` are token ids (breaching's data key ``input_ids``), floats are images (NHWC).
    """

    inputs: Array
    labels: Array

    @property
    def data_key(self) -> str:
        """breaching's name for the inputs: ``input_ids`` for tokens, ``inputs`` otherwise."""
        return "input_ids" if jax.numpy.issubdtype(self.inputs.dtype, jax.numpy.integer) else "inputs"


@flax.struct.dataclass
class LocalHyperparams:
    """The local training set-up a multi-step user may reveal to the server.

    Numbers are static (not traced), so a whole user computation can sit under an outer ``jit``.
    """

    lr: float = flax.struct.field(pytree_node=False)
    steps: int = flax.struct.field(pytree_node=False)
    data_per_step: int = flax.struct.field(pytree_node=False)
    labels: Optional[list]  # one sorted label array per local step


@flax.struct.dataclass
class Metadata:
    """What the server learns besides the update (``None`` = not provided); only labels are arrays."""

    num_data_points: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    labels: Optional[Array] = None
    local_hyperparams: Optional[LocalHyperparams] = None
    data_key: Optional[str] = flax.struct.field(pytree_node=False, default=None)
    num_users: Optional[int] = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class SharedData:
    """What the user sends: gradients (or parameter differences), buffers, metadata."""

    gradients: PyTree
    batch_stats: Optional[PyTree]
    metadata: Metadata


@flax.struct.dataclass
class TrueUserData:
    """The user's real data, kept for scoring attacks; never sent.

    ``data`` from ``aggregate`` is a NumPy view of ``users_data.inputs`` when those are a NumPy
    array and no input noise was recorded. ``user_state`` is the users' own BatchNorm state after the query (stacked for ``aggregate``).
    """

    data: Array
    labels: Array
    batch_stats: Optional[PyTree]
    user_state: Optional[PyTree] = None

"""The values that cross the user boundary: what the server sends, what users hold and share."""

from __future__ import annotations

from typing import Any, Optional

import chex
import jax

Array = jax.Array
PyTree = Any


@chex.dataclass(frozen=True)
class ServerPayload:
    """Model state sent by the server; ``batch_stats=None`` means the server sends no buffers."""

    params: PyTree
    batch_stats: Optional[PyTree] = None


@chex.dataclass(frozen=True)
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


@chex.dataclass(frozen=True)
class LocalHyperparams:
    """The local training set-up a multi-step user may reveal to the server."""

    lr: float
    steps: int
    data_per_step: int
    labels: Optional[list]  # one sorted label array per local step


@chex.dataclass(frozen=True)
class Metadata:
    """What the server learns besides the update (``None`` = not provided)."""

    num_data_points: Optional[int] = None
    labels: Optional[Array] = None
    local_hyperparams: Optional[LocalHyperparams] = None
    data_key: Optional[str] = None
    num_users: Optional[int] = None


@chex.dataclass(frozen=True)
class SharedData:
    """What the user sends: gradients (or parameter differences), buffers, metadata."""

    gradients: PyTree
    batch_stats: Optional[PyTree]
    metadata: Metadata


@chex.dataclass(frozen=True)
class TrueUserData:
    """The user's real data, kept for scoring attacks; never sent.

    ``user_state`` is the users' own BatchNorm state after the query (stacked for ``aggregate``).
    """

    data: Array
    labels: Array
    batch_stats: Optional[PyTree]
    user_state: Optional[PyTree] = None

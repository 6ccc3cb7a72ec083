"""The values that cross the user boundary: what the server sends, what users hold and share.

All are frozen ``flax.struct`` dataclasses (pytrees: they pass through ``jit`` and ``vmap``);
arrays are pytree nodes, counts and names static fields.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from fedjax_users.types import Metadata, UserData
    >>> data = UserData(inputs=jnp.zeros((2, 4), jnp.int32), labels=jnp.array([1, 0]))
    >>> data.data_key
    'input_ids'
    >>> jax.tree_util.tree_leaves(Metadata(num_data_points=2, labels=jnp.array([0, 1])))  # counts are static
    [Array([0, 1], dtype=int32)]
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax

Array = jax.Array
PyTree = Any

__all__ = ["LocalHyperparams", "Metadata", "ServerPayload", "SharedData", "TrueUserData", "UserData"]


@flax.struct.dataclass
class ServerPayload:
    """Model state sent by the server.

    Attributes:
      params: the model's parameters (Flax's ``params`` collection).
      batch_stats: its buffers (BatchNorm running statistics), or ``None`` when the server sends
        none (users then train in their own statistics, as breaching's users without public buffers).

    Example::

        >>> import jax.numpy as jnp
        >>> payload = ServerPayload(params={"fc": {"kernel": jnp.ones((3, 2))}})
        >>> payload.batch_stats is None
        True
    """

    params: PyTree
    batch_stats: Optional[PyTree] = None


@flax.struct.dataclass
class UserData:
    """One user's examples (leading axis), or many users' (leading users axis, then examples).

    Attributes:
      inputs: integer token ids (breaching's data key ``input_ids``) or float images (NHWC).
      labels: one label per example (class ids; token ids for language modelling).
    """

    inputs: Array
    labels: Array

    @property
    def data_key(self) -> str:
        """breaching's name for the inputs: ``input_ids`` for tokens, ``inputs`` otherwise.

        Example::

            >>> import jax.numpy as jnp
            >>> UserData(inputs=jnp.zeros((1, 8, 8, 3)), labels=jnp.array([0])).data_key
            'inputs'
        """
        return "input_ids" if jax.numpy.issubdtype(self.inputs.dtype, jax.numpy.integer) else "inputs"


@flax.struct.dataclass
class LocalHyperparams:
    """The local training set-up a multi-step user may reveal to the server.

    Numbers are static (not traced), so a whole user computation can sit under an outer ``jit``.

    Attributes:
      lr: the local learning rate.
      steps: the number of local steps.
      data_per_step: examples per local step.
      labels: one sorted label array per local step, or ``None`` when not revealed.
    """

    lr: float = flax.struct.field(pytree_node=False)
    steps: int = flax.struct.field(pytree_node=False)
    data_per_step: int = flax.struct.field(pytree_node=False)
    labels: Optional[list]  # one sorted label array per local step


@flax.struct.dataclass
class Metadata:
    """What the server learns besides the update (``None``: not provided); only labels are arrays.

    Attributes:
      num_data_points: how many examples the user (each user, in an aggregate) holds.
      labels: the users' labels, sorted as breaching sorts them.
      local_hyperparams: a multi-step user's :class:`LocalHyperparams`.
      data_key: breaching's name for the inputs (``inputs`` or ``input_ids``).
      num_users: the number of users an aggregate averages.
    """

    num_data_points: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    labels: Optional[Array] = None
    local_hyperparams: Optional[LocalHyperparams] = None
    data_key: Optional[str] = flax.struct.field(pytree_node=False, default=None)
    num_users: Optional[int] = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class SharedData:
    """What the user sends.

    Attributes:
      gradients: the gradient (single-step users) or ``params_after - params_server`` (multi-step
        users), in the tree of the model's parameters; the mean over users for an aggregate.
      batch_stats: the users' BatchNorm buffers where they are shared, else ``None``.
      metadata: what the server learns besides the update.
    """

    gradients: PyTree
    batch_stats: Optional[PyTree]
    metadata: Metadata


@flax.struct.dataclass
class TrueUserData:
    """The user's real data, kept for scoring attacks; never sent.

    Attributes:
      data: the inputs the users computed on (with input noise, where there is any), users
        flattened into one examples axis for ``aggregate``: there a NumPy view of
        ``users_data.inputs`` when those are a NumPy array and no input noise was recorded, and
        ``None`` when a streamed cohort recorded none.
      labels: their labels, flattened in the same way.
      batch_stats: the buffers the user reports (the users' mean for ``aggregate``), whether or
        not ``provide_buffers`` shares them; ``None`` where breaching's user reports none.
      user_state: the users' own BatchNorm state after the query (stacked for ``aggregate``;
        ``None`` there when the server sends buffers).
    """

    data: Array
    labels: Array
    batch_stats: Optional[PyTree]
    user_state: Optional[PyTree] = None

"""breaching's ``shared_data`` dict <-> :class:`fedjax_users.types.SharedData`.

breaching's dict: ``gradients`` (list, parameters order), ``buffers`` (list, buffers order, or
None) and ``metadata`` with ``num_data_points``, ``labels``, ``local_hyperparams`` ({lr, steps,
data_per_step, labels: one tensor per step} or None), and depending on the user type
``data_key`` (multi-step users) and ``num_users`` (aggregates). Labels are int64 in torch, int32
here. Keys breaching leaves out are ``None`` here and are left out again on the way back
(:mod:`fedjax_users.interop.metadata`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import torch

from fedjax_users.interop.metadata import metadata_from_dict, metadata_to_dict
from fedjax_users.interop.tensors import to_jax, to_torch
from fedjax_users.interop.torch_flax import (
    Template,
    buffers_from_torch_list,
    buffers_to_torch_list,
    grads_from_torch_list,
    grads_to_torch_list,
)
from fedjax_users.types import Metadata, SharedData

__all__ = [
    "labels_from_torch",
    "labels_to_torch",
    "metadata_from_torch",
    "metadata_to_torch",
    "shared_data_from_torch",
    "shared_data_to_torch",
]


def labels_from_torch(labels: Optional[torch.Tensor]) -> Optional[jax.Array]:
    """Torch labels (or None) as int32 JAX labels.

    Args:
      labels: a torch label tensor (any integer dtype; anything ``torch.as_tensor`` takes), or ``None``.

    Returns:
      The labels as an int32 JAX array, or ``None``.

    Example::

        >>> import torch
        >>> labels = labels_from_torch(torch.tensor([3, 1]))
        >>> str(labels.dtype), labels.tolist()
        ('int32', [3, 1])
    """
    return None if labels is None else to_jax(torch.as_tensor(labels))


def labels_to_torch(labels: Optional[jax.Array]) -> Optional[torch.Tensor]:
    """JAX labels (or None) as torch int64 labels.

    Args:
      labels: a JAX or numpy label array, or ``None``.

    Returns:
      The labels as an int64 torch tensor (breaching's dtype), or ``None``.

    Example::

        >>> import jax.numpy as jnp
        >>> labels_to_torch(jnp.array([3, 1]))
        tensor([3, 1])
    """
    return None if labels is None else to_torch(labels).to(torch.long)


def metadata_from_torch(metadata: Mapping[str, Any]) -> Metadata:
    """breaching's ``metadata`` dict as Metadata.

    Args:
      metadata: breaching's ``shared_data["metadata"]`` (keys it lacks are ``None``).

    Returns:
      The :class:`~fedjax_users.types.Metadata`, labels as int32 JAX arrays.

    Example::

        >>> import torch
        >>> breaching_metadata = {"num_data_points": 2, "labels": torch.tensor([3, 1]), "local_hyperparams": None}
        >>> metadata = metadata_from_torch(breaching_metadata)
        >>> metadata.num_data_points, metadata.labels.tolist(), metadata.data_key
        (2, [3, 1], None)
    """
    return metadata_from_dict(metadata, labels_from_torch)


def metadata_to_torch(metadata: Metadata) -> dict:
    """Metadata as breaching's ``metadata`` dict.

    Args:
      metadata: the :class:`~fedjax_users.types.Metadata`.

    Returns:
      breaching's dict, labels as int64 torch tensors; ``data_key`` and ``num_users`` only where not ``None``.

    Example::

        >>> import jax.numpy as jnp
        >>> metadata_to_torch(Metadata(num_data_points=2, labels=jnp.array([3, 1])))
        {'num_data_points': 2, 'labels': tensor([3, 1]), 'local_hyperparams': None}
    """
    return metadata_to_dict(metadata, labels_to_torch)


def shared_data_from_torch(
    shared_data: Mapping[str, Any], torch_model: torch.nn.Module, template: Template
) -> SharedData:
    """breaching's ``shared_data`` dict as SharedData (gradients and buffers as Flax trees).

    Args:
      shared_data: breaching's dict: ``gradients`` in ``torch_model.parameters()`` order, ``buffers``
        in ``torch_model.buffers()`` order (or ``None`` / absent), ``metadata``.
      torch_model: the torch module that names the lists.
      template: a variables dict or a ServerPayload fixing the Flax structure
        (:mod:`fedjax_users.interop.torch_flax`).

    Returns:
      The :class:`~fedjax_users.types.SharedData`; ``batch_stats`` is ``None`` where no buffers were sent.

    Raises:
      ValueError: a list that does not match the torch model or the template, naming both sides.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> shared = {"gradients": [torch.ones(2, 3), torch.zeros(2)], "buffers": None,
        ...           "metadata": {"num_data_points": 1, "labels": torch.tensor([1]), "local_hyperparams": None}}
        >>> template = {"params": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
        >>> ours = shared_data_from_torch(shared, torch.nn.Linear(3, 2), template)
        >>> ours.gradients["kernel"].shape, ours.batch_stats, ours.metadata.labels.tolist()
        ((3, 2), None, [1])
    """
    buffers = shared_data.get("buffers")
    batch_stats = None
    if buffers is not None:
        batch_stats = buffers_from_torch_list(buffers, torch_model, template)
    return SharedData(
        gradients=grads_from_torch_list(shared_data["gradients"], torch_model, template),
        batch_stats=batch_stats,
        metadata=metadata_from_torch(shared_data["metadata"]),
    )


def shared_data_to_torch(shared_data: SharedData, torch_model: torch.nn.Module) -> dict:
    """SharedData as breaching's ``shared_data`` dict (lists in parameters/buffers order).

    Args:
      shared_data: the :class:`~fedjax_users.types.SharedData`.
      torch_model: the torch module whose parameters and buffers give the order, dtypes and devices.

    Returns:
      ``{"gradients": [...], "buffers": [...] or None, "metadata": {...}}``, as breaching's user returns it.

    Raises:
      ValueError: a tree that does not match the torch model, naming both sides.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> ours = SharedData(gradients={"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, batch_stats=None,
        ...                   metadata=Metadata(num_data_points=1, labels=jnp.array([1])))
        >>> shared = shared_data_to_torch(ours, torch.nn.Linear(3, 2))
        >>> [tuple(tensor.shape) for tensor in shared["gradients"]], shared["buffers"], shared["metadata"]["labels"]
        ([(2, 3), (2,)], None, tensor([1]))
    """
    batch_stats = shared_data.batch_stats
    return dict(
        gradients=grads_to_torch_list(shared_data.gradients, torch_model),
        buffers=None if batch_stats is None else buffers_to_torch_list(batch_stats, torch_model),
        metadata=metadata_to_torch(shared_data.metadata),
    )


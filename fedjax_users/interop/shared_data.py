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
    """Torch labels (or None) as int32 JAX labels."""
    return None if labels is None else to_jax(torch.as_tensor(labels))


def labels_to_torch(labels: Optional[jax.Array]) -> Optional[torch.Tensor]:
    """JAX labels (or None) as torch int64 labels."""
    return None if labels is None else to_torch(labels).to(torch.long)


def metadata_from_torch(metadata: Mapping[str, Any]) -> Metadata:
    """breaching's ``metadata`` dict as Metadata."""
    return metadata_from_dict(metadata, labels_from_torch)


def metadata_to_torch(metadata: Metadata) -> dict:
    """Metadata as breaching's ``metadata`` dict."""
    return metadata_to_dict(metadata, labels_to_torch)


def shared_data_from_torch(
    shared_data: Mapping[str, Any], torch_model: torch.nn.Module, template: Template
) -> SharedData:
    """breaching's ``shared_data`` dict as SharedData (gradients and buffers as Flax trees)."""
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
    """SharedData as breaching's ``shared_data`` dict (lists in parameters/buffers order)."""
    batch_stats = shared_data.batch_stats
    return dict(
        gradients=grads_to_torch_list(shared_data.gradients, torch_model),
        buffers=None if batch_stats is None else buffers_to_torch_list(batch_stats, torch_model),
        metadata=metadata_to_torch(shared_data.metadata),
    )


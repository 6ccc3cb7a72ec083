"""Single-array conversion between torch tensors and JAX arrays, and image layouts."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

Array = jax.Array


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy: float64 kept, other floats float32, integers int32, bools bool."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.to(torch.float32)
    elif not tensor.is_floating_point() and tensor.dtype != torch.bool:
        # int32 is JAX's default integer width (num_batches_tracked, labels).
        tensor = tensor.to(torch.int32)
    return tensor.numpy()


def to_jax(tensor: torch.Tensor) -> Array:
    """A torch tensor as a JAX array, with :func:`to_numpy`'s dtypes."""
    return jnp.asarray(to_numpy(tensor))


def to_torch(array, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A JAX/numpy array as a torch tensor, cast to ``like``'s dtype and device if given."""
    tensor = torch.from_numpy(np.array(array))
    if like is not None:
        tensor = tensor.to(dtype=like.dtype, device=like.device)
    return tensor


def nchw_to_nhwc(images: torch.Tensor) -> Array:
    """A torch image batch (NCHW) as a JAX batch in the Flax layout (NHWC)."""
    return jnp.transpose(to_jax(images), (0, 2, 3, 1))


def nhwc_to_nchw(images, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A JAX image batch (NHWC) as a torch batch (NCHW)."""
    return to_torch(np.transpose(np.asarray(images), (0, 3, 1, 2)), like).contiguous()

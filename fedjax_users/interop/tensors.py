"""Single-array conversion between torch tensors and JAX arrays, and image layouts.

The dtype rules: float64 is kept, every other float becomes float32, integers int32 (JAX's
default width), bools stay bools; on the way back a tensor takes the dtype and device of the torch
tensor it stands for (``like``).

Example::

    >>> import torch
    >>> array = to_jax(torch.arange(3))
    >>> str(array.dtype), to_torch(array, like=torch.zeros(3, dtype=torch.int64)).dtype
    ('int32', torch.int64)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

__all__ = ["nchw_to_nhwc", "nhwc_to_nchw", "to_jax", "to_numpy", "to_torch"]

Array = jax.Array


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy: float64 kept, other floats float32, integers int32, bools bool.

    Args:
      tensor: any torch tensor (detached and moved to the CPU first; ``tensor`` is not changed).

    Returns:
      A numpy array with the same values and shape in the dtype above.

    Example::

        >>> import torch
        >>> to_numpy(torch.tensor([1.5], dtype=torch.float16)).dtype, to_numpy(torch.tensor([2])).dtype
        (dtype('float32'), dtype('int32'))
    """
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.to(torch.float32)
    elif not tensor.is_floating_point() and tensor.dtype != torch.bool:
        # int32 is JAX's default integer width (num_batches_tracked, labels).
        tensor = tensor.to(torch.int32)
    return tensor.numpy()


def to_jax(tensor: torch.Tensor) -> Array:
    """A torch tensor as a JAX array, with :func:`to_numpy`'s dtypes.

    Args:
      tensor: any torch tensor.

    Returns:
      A JAX array with the same values and shape.

    Example::

        >>> import torch
        >>> to_jax(torch.ones(2, 3, dtype=torch.float64)).shape
        (2, 3)
    """
    return jnp.asarray(to_numpy(tensor))


def to_torch(array, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A JAX/numpy array as a torch tensor, cast to ``like``'s dtype and device if given.

    Args:
      array: a JAX or numpy array (or anything ``np.array`` takes); copied, never shared.
      like: the torch tensor whose dtype and device the result takes; ``None`` keeps the array's
        dtype, on the CPU.

    Returns:
      A new torch tensor.

    Example::

        >>> import numpy as np, torch
        >>> to_torch(np.zeros(2, np.float32), like=torch.zeros(2, dtype=torch.float64)).dtype
        torch.float64
    """
    tensor = torch.from_numpy(np.array(array))
    if like is not None:
        tensor = tensor.to(dtype=like.dtype, device=like.device)
    return tensor


def nchw_to_nhwc(images: torch.Tensor) -> Array:
    """A torch image batch (NCHW) as a JAX batch in the Flax layout (NHWC).

    Args:
      images: torch images, ``[batch, channels, height, width]``.

    Returns:
      The JAX images, ``[batch, height, width, channels]``, with :func:`to_numpy`'s dtypes.

    Example::

        >>> import torch
        >>> nchw_to_nhwc(torch.zeros(2, 3, 4, 5)).shape
        (2, 4, 5, 3)
    """
    return jnp.transpose(to_jax(images), (0, 2, 3, 1))


def nhwc_to_nchw(images, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A JAX image batch (NHWC) as a torch batch (NCHW).

    Args:
      images: JAX or numpy images, ``[batch, height, width, channels]``.
      like: as for :func:`to_torch`: the tensor whose dtype and device the result takes, or ``None``.

    Returns:
      A contiguous torch tensor, ``[batch, channels, height, width]``.

    Example::

        >>> import numpy as np
        >>> tuple(nhwc_to_nchw(np.zeros((2, 4, 5, 3), np.float32)).shape)
        (2, 3, 4, 5)
    """
    return to_torch(np.transpose(np.asarray(images), (0, 3, 1, 2)), like).contiguous()

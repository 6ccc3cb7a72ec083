"""Local defences: the reference's clipping rule, and Gaussian/Laplace noise from explicit keys."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

# breaching adds this to the norm before dividing; it makes the clipped norm slightly below the bound.
CLIP_EPSILON = 1e-6


def global_norm(tree: PyTree) -> Array:
    """L2 norm of the per-leaf L2 norms, as breaching stacks ``torch.norm`` of each gradient."""
    norms = jnp.stack([jnp.linalg.norm(jnp.ravel(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])
    return jnp.linalg.norm(norms)


def clip_factor(norm: Array, clip_value: float) -> Array:
    """Scale that clips a gradient of this norm: ``C / (norm + 1e-6)`` only if ``norm > C`` (strict)."""
    return jnp.where(norm > clip_value, clip_value / (norm + CLIP_EPSILON), jnp.ones_like(norm))


def clip_by_global_norm(tree: PyTree, clip_value: float) -> PyTree:
    """breaching's ``_clip_list_of_grad_`` without mutation."""
    factor = clip_factor(global_norm(tree), clip_value)
    return jax.tree_util.tree_map(lambda leaf: leaf * factor.astype(leaf.dtype), tree)


def sample(key: Array, shape: tuple[int, ...], dtype: Any, scale: float, distribution: str) -> Array:
    """Zero-centred noise: Normal with std ``scale`` or Laplace with scale ``b = scale``."""
    if distribution == "gaussian":
        return scale * jax.random.normal(key, shape, dtype)
    if distribution == "laplacian":
        return scale * jax.random.laplace(key, shape, dtype)
    raise ValueError(f"unknown distribution {distribution!r}")


def add_noise(key: Array, tree: PyTree, scale: float, distribution: str) -> PyTree:
    """Add i.i.d. noise to every entry of every leaf; scale 0 is a no-op.

    One flat draw split into the leaves: the same distribution as a draw per leaf, and one random
    op instead of one per leaf (a noisy user compiles several times faster).
    """
    if scale <= 0:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [leaf.size for leaf in leaves]
    flat = sample(key, (sum(sizes),), jnp.result_type(*leaves), scale, distribution)
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
    noised = [leaf + piece.reshape(leaf.shape).astype(leaf.dtype) for leaf, piece in zip(leaves, pieces)]
    return jax.tree_util.tree_unflatten(treedef, noised)

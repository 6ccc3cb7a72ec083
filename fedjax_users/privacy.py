"""Local defences: the reference's clipping rule, and Gaussian/Laplace noise from explicit keys.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from fedjax_users import privacy
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
    >>> float(privacy.global_norm(grads))
    13.0
    >>> @jax.jit
    ... def defended(key, grads):  # clipped to norm 1, then noised
    ...     return privacy.add_noise(key, privacy.clip_by_global_norm(grads, 1.0), 0.01, "gaussian")
    >>> jax.tree_util.tree_map(jnp.shape, defended(jax.random.key(0), grads))
    {'a': (2,), 'b': (1,)}
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

__all__ = ["CLIP_EPSILON", "add_noise", "clip_by_global_norm", "clip_factor", "global_norm", "sample"]

# breaching adds this to the norm before dividing; it makes the clipped norm slightly below the bound.
CLIP_EPSILON = 1e-6


def global_norm(tree: PyTree) -> Array:
    """L2 norm of the per-leaf L2 norms, as breaching stacks ``torch.norm`` of each gradient.

    Args:
      tree: a pytree of arrays (a gradient).

    Returns:
      The scalar norm, in the leaves' dtype.

    Example::

        >>> import jax.numpy as jnp
        >>> float(global_norm({"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}))
        13.0
    """
    norms = jnp.stack([jnp.linalg.norm(jnp.ravel(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])
    return jnp.linalg.norm(norms)


def clip_factor(norm: Array, clip_value: float) -> Array:
    """Scale that clips a gradient of this norm: ``C / (norm + 1e-6)`` only if ``norm > C`` (strict).

    Args:
      norm: the gradient's norm (``global_norm``), any shape (one per example, say).
      clip_value: the bound ``C``.

    Returns:
      The factor to multiply the gradient by, shaped like ``norm``: 1 where ``norm <= C``.

    Example::

        >>> import jax.numpy as jnp
        >>> clip_factor(jnp.array([0.5, 1.0, 4.0]), 1.0).round(3).tolist()
        [1.0, 1.0, 0.25]
    """
    return jnp.where(norm > clip_value, clip_value / (norm + CLIP_EPSILON), jnp.ones_like(norm))


def clip_by_global_norm(tree: PyTree, clip_value: float) -> PyTree:
    """breaching's ``_clip_list_of_grad_`` without mutation: the tree scaled by ``clip_factor`` of its norm.

    Args:
      tree: a pytree of arrays (one gradient).
      clip_value: the bound ``C``.

    Returns:
      A new tree of the same structure and dtypes whose global norm is at most ``C``.

    Example::

        >>> import jax.numpy as jnp
        >>> clipped = clip_by_global_norm({"w": jnp.array([3.0, 4.0])}, 1.0)
        >>> print(clipped["w"].round(3))
        [0.6 0.8]
    """
    factor = clip_factor(global_norm(tree), clip_value)
    return jax.tree_util.tree_map(lambda leaf: leaf * factor.astype(leaf.dtype), tree)


def sample(key: Array, shape: tuple[int, ...], dtype: Any, scale: float, distribution: str) -> Array:
    """Zero-centred noise: Normal with std ``scale`` or Laplace with scale ``b = scale``.

    Args:
      key: a ``jax.random`` key.
      shape: the shape of the draw.
      dtype: its floating dtype.
      scale: the standard deviation (Gaussian) or ``b`` (Laplace).
      distribution: ``"gaussian"`` or ``"laplacian"`` (breaching's names).

    Returns:
      The noise, ``shape`` in ``dtype``.

    Raises:
      ValueError: another distribution.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> sample(jax.random.key(0), (2, 3), jnp.float32, 0.1, "laplacian").shape
        (2, 3)
    """
    if distribution == "gaussian":
        return scale * jax.random.normal(key, shape, dtype)
    if distribution == "laplacian":
        return scale * jax.random.laplace(key, shape, dtype)
    raise ValueError(f"unknown distribution {distribution!r}")


def add_noise(key: Array, tree: PyTree, scale: float, distribution: str) -> PyTree:
    """Add i.i.d. noise to every entry of every leaf; scale 0 is a no-op.

    One flat draw split into the leaves: the same distribution as a draw per leaf, and one random
    op instead of one per leaf (a noisy user compiles several times faster).

    Args:
      key: a ``jax.random`` key.
      tree: a pytree of floating arrays.
      scale: as in ``sample``; ``<= 0`` returns ``tree`` itself.
      distribution: ``"gaussian"`` or ``"laplacian"``.

    Returns:
      ``tree`` plus the noise, leaf by leaf in each leaf's dtype.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> tree = {"w": jnp.zeros(3), "b": jnp.zeros(1)}
        >>> add_noise(jax.random.key(0), tree, 0.0, "gaussian") is tree
        True
        >>> noisy = jax.jit(lambda key, tree: add_noise(key, tree, 0.1, "gaussian"))
        >>> jax.tree_util.tree_map(jnp.shape, noisy(jax.random.key(0), tree))
        {'b': (1,), 'w': (3,)}
    """
    if scale <= 0:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [leaf.size for leaf in leaves]
    flat = sample(key, (sum(sizes),), jnp.result_type(*leaves), scale, distribution)
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
    noised = [leaf + piece.reshape(leaf.shape).astype(leaf.dtype) for leaf, piece in zip(leaves, pieces)]
    return jax.tree_util.tree_unflatten(treedef, noised)

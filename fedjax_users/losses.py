"""Per-example losses matching breaching's torch losses, and the mean that makes them torch's loss.

A loss maps ``(logits, labels)`` to each example's share of torch's default ``reduction="mean"``:
either one loss per example, shape ``[B]``, when torch averages over the examples, or a
``SummedLosses`` (each example's summed terms and their count) when torch averages over a count
of its own, as over the counted tokens of a masked-LM batch. ``mean_loss`` forms the batch loss
from either, over the examples a mask keeps; since each example's terms stay its own, a padded
step (masked rows) and a single example (per-example clipping) get the loss torch gives them.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from fedjax_users import losses
    >>> batch_loss = jax.jit(lambda logits, labels: losses.mean_loss(losses.softmax_cross_entropy(logits, labels)))
    >>> float(batch_loss(jnp.zeros((3, 4)), jnp.array([0, 1, 2]))) == float(jnp.log(4.0))
    True
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

Array = jax.Array

__all__ = [
    "IGNORE_INDEX",
    "LossFn",
    "SummedLosses",
    "causal_lm_loss",
    "masked_lm_loss",
    "mean_loss",
    "softmax_cross_entropy",
]


@flax.struct.dataclass
class SummedLosses:
    """Each example's summed loss terms and how many terms it sums: a loss torch averages over its own count.

    Attributes:
      total: ``[B]``, each example's summed loss terms.
      count: ``[B]``, how many terms each sums (counted tokens), in ``total``'s dtype.
    """

    total: Array
    count: Array


LossFn = Callable[[Array, Array], Union[Array, SummedLosses]]


def mean_loss(losses: Union[Array, SummedLosses], mask: Optional[Array] = None) -> Array:
    """torch's mean-reduced loss over the examples ``mask`` keeps (all when ``None``).

    Per-example losses ``[B]`` are averaged over the kept examples; ``SummedLosses`` give the kept
    totals over the kept counts (NaN when no term is counted, as torch's loss).

    Args:
      losses: a loss function's output: per-example losses ``[B]`` or ``SummedLosses``.
      mask: ``[B]`` booleans, the examples that count (a padded step's real rows), or ``None``.

    Returns:
      The scalar batch loss.

    Example::

        >>> import jax.numpy as jnp
        >>> float(mean_loss(jnp.array([1.0, 3.0]))), float(mean_loss(jnp.array([1.0, 3.0]), jnp.array([True, False])))
        (2.0, 1.0)
        >>> float(mean_loss(SummedLosses(total=jnp.array([6.0, 2.0]), count=jnp.array([3.0, 1.0]))))
        2.0
    """
    if isinstance(losses, SummedLosses):
        total, count = losses.total, losses.count
        if mask is not None:
            total, count = total * mask.astype(total.dtype), count * mask.astype(count.dtype)
        return jnp.sum(total) / jnp.sum(count)
    if mask is None:
        return jnp.mean(losses)
    weights = mask.astype(losses.dtype)
    return jnp.sum(losses * weights) / jnp.sum(weights)


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Cross-entropy of ``logits [B, C]`` against integer ``labels [B]``, as torch's CrossEntropyLoss.

    Args:
      logits: ``[B, C]`` unnormalised scores.
      labels: ``[B]`` class indices.

    Returns:
      ``[B]``, each example's loss (``mean_loss`` of it is torch's ``reduction="mean"``).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> jax.jit(softmax_cross_entropy)(jnp.array([[0.0, 0.0], [10.0, -10.0]]), jnp.array([0, 0])).round(3)
        Array([0.693, 0.   ], dtype=float32)
    """
    chex.assert_rank(logits, 2)
    chex.assert_shape(labels, logits.shape[:1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def causal_lm_loss(logits: Array, labels: Array) -> Array:
    """Next-token cross-entropy of ``logits [B, T, V]`` vs ``labels [B, T]``, averaged per sequence.

    As breaching's causal-LM loss: position ``t`` predicts token ``t + 1``.

    Args:
      logits: ``[B, T, V]`` scores over the vocabulary at every position.
      labels: ``[B, T]`` token ids (the inputs themselves, for breaching's text data).

    Returns:
      ``[B]``, each sequence's mean over its ``T - 1`` predicted tokens.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> jax.jit(causal_lm_loss)(jnp.zeros((2, 3, 4)), jnp.array([[1, 2, 3], [0, 1, 1]])).shape
        (2,)
    """
    chex.assert_rank(logits, 3)
    chex.assert_shape(labels, logits.shape[:2])
    # Position t predicts token t + 1, so the last logit and the first label have no partner.
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels[:, 1:])
    # Every sequence has the same T - 1 targets, so the mean of these means is torch's token mean.
    return jnp.mean(per_token, axis=-1)


# torch's CrossEntropyLoss skips targets of this value (breaching's MLM data labels unmasked tokens so).
IGNORE_INDEX = -100


def masked_lm_loss(logits: Array, labels: Array) -> SummedLosses:
    """Token cross-entropy of ``logits [B, T, V]`` vs ``labels [B, T]`` (breaching's MLMLoss), labels ``-100`` ignored.

    torch's ``CrossEntropyLoss`` (``ignore_index=-100``) averages over the batch's counted tokens,
    not over its sequences, so each sequence gives its summed token losses and its number of
    counted tokens; ``mean_loss`` of these is torch's loss (NaN with no counted token, as torch's).

    Args:
      logits: ``[B, T, V]`` scores over the vocabulary at every position.
      labels: ``[B, T]`` the original ids at the masked positions, ``IGNORE_INDEX`` elsewhere.

    Returns:
      ``SummedLosses``: each sequence's summed token losses and its number of counted tokens.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> summed = jax.jit(masked_lm_loss)(jnp.zeros((2, 3, 4)), jnp.array([[1, 2, 3], [0, -100, -100]]))
        >>> summed.count.tolist()
        [3.0, 1.0]
    """
    chex.assert_rank(logits, 3)
    chex.assert_shape(labels, logits.shape[:2])
    counted = labels != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, labels, 0))
    total = jnp.sum(jnp.where(counted, per_token, 0.0), axis=-1)
    return SummedLosses(total=total, count=jnp.sum(counted, axis=-1).astype(total.dtype))

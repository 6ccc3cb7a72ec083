"""Per-example losses matching breaching's torch losses.

Every loss maps ``(logits, labels)`` to one loss per example, shape ``[B]``; the caller takes the
(masked) mean, which reproduces torch's default ``reduction="mean"``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Cross-entropy of ``logits [B, C]`` against integer ``labels [B]``, as torch's CrossEntropyLoss."""
    chex.assert_rank(logits, 2)
    chex.assert_shape(labels, logits.shape[:1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def causal_lm_loss(logits: Array, labels: Array) -> Array:
    """Next-token cross-entropy of ``logits [B, T, V]`` vs ``labels [B, T]``, averaged per sequence."""
    chex.assert_rank(logits, 3)
    chex.assert_shape(labels, logits.shape[:2])
    # Position t predicts token t + 1, so the last logit and the first label have no partner.
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels[:, 1:])
    # Every sequence has the same T - 1 targets, so the mean of these means is torch's token mean.
    return jnp.mean(per_token, axis=-1)


# torch's CrossEntropyLoss skips targets of this value (breaching's MLM data labels unmasked tokens so).
IGNORE_INDEX = -100


def masked_lm_loss(logits: Array, labels: Array) -> Array:
    """Token cross-entropy of ``logits [B, T, V]`` vs ``labels [B, T]`` (breaching's MLMLoss), labels ``-100`` ignored.

    torch's ``CrossEntropyLoss`` (``ignore_index=-100``) averages over the batch's counted tokens,
    so each sequence's value is its summed token losses over that count, times ``B``: the mean of
    these over the batch is torch's loss, whatever each sequence's share of counted tokens. With no
    counted token torch's loss is NaN, and so is this.
    """
    chex.assert_rank(logits, 3)
    chex.assert_shape(labels, logits.shape[:2])
    counted = labels != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, labels, 0))
    summed = jnp.sum(jnp.where(counted, per_token, 0.0), axis=-1)
    return summed * (labels.shape[0] / jnp.sum(counted).astype(summed.dtype))


# Losses whose per-example values are scaled by a count over the whole batch (torch's token mean):
# a masked mean over padded rows does not give their batch loss, so callers must not pad them.
BATCH_NORMALISED = (masked_lm_loss,)

"""One user's examples a chunk at a time, where its examples do not affect each other.

An unclipped single-step user in eval mode (the server sent its BatchNorm buffers) differentiates
the mean loss of independent examples (``fedjax_users.semantics.single_step_loss``): its gradient
is the sum over chunks of examples of the gradient of the chunk's share of that mean. Taking it a
chunk at a time (a ``lax.scan`` whose body is rematerialised in the backward pass) keeps one
chunk's activations alive instead of the whole batch's: breaching's ``8_industry_scale_fl`` gives
each user 1,000 ImageNet images, whose ResNet18 activations alone take tens of GB at once. The
numbers equal the whole batch's up to float rounding (the sum is taken in another order).

In train mode the batch's BatchNorm statistics couple the examples, so such users keep the whole
batch; clipping users have their own chunks (``strategy.clipping``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_users import semantics
from fedjax_users.config import LocalDiffPrivacy
from fedjax_users.losses import LossFn, SummedLosses
from fedjax_users.strategy import chunking

Array = jax.Array
PyTree = Any


def chunked_single_step_loss(examples_per_chunk: int) -> Callable[..., tuple[Array, tuple[PyTree, Array]]]:
    """``semantics.single_step_loss`` computed ``examples_per_chunk`` examples at a time (eval mode).

    Args:
      examples_per_chunk: examples whose activations are alive at once.

    Returns:
      A function with ``single_step_loss``'s arguments and result: the mean loss, and (the
      statistics, the noised inputs). In train mode it is ``single_step_loss`` itself.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> from fedjax_users import semantics
        >>> from fedjax_users.strategy import examples
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jax.random.normal(jax.random.key(0), (5, 4, 4, 1)), jnp.array([0, 2, 1, 1, 0])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> args = (model, fu.losses.softmax_cross_entropy, fu.LocalDiffPrivacy(), params, {}, False, x, y,
        ...         jax.random.key(2))
        >>> whole = jax.grad(semantics.single_step_loss, argnums=3, has_aux=True)(*args)[0]
        >>> chunked = jax.grad(examples.chunked_single_step_loss(2), argnums=3, has_aux=True)(*args)[0]
        >>> bool(jnp.allclose(whole["1"]["kernel"], chunked["1"]["kernel"], atol=1e-6))
        True
    """

    def loss(model, loss_fn: LossFn, dp: LocalDiffPrivacy, params: PyTree, stats: PyTree, train: bool,
             inputs: Array, labels: Array, input_key: Array) -> tuple[Array, tuple[PyTree, Array]]:
        if train:  # the batch's statistics couple its examples
            return semantics.single_step_loss(model, loss_fn, dp, params, stats, train, inputs, labels, input_key)
        recorded = semantics.noised_inputs(input_key, inputs, dp)
        total, count = _chunked_sums(model, loss_fn, params, stats, recorded, labels, examples_per_chunk)
        return total / count, (stats, recorded)

    return loss


def _chunked_sums(model, loss_fn: LossFn, params: PyTree, stats: PyTree, inputs: Array, labels: Array,
                  size: int) -> tuple[Array, Array]:
    """The summed loss and its count (examples, or counted tokens) over every chunk of examples."""
    count = inputs.shape[0]
    chunks = chunking.num_chunks(count, size)
    # Padding repeats the first example (a valid input) and is masked out of both sums.
    index = jnp.arange(chunks * size)
    kept = (index < count).reshape(chunks, size)
    index = jnp.where(index < count, index, 0).reshape(chunks, size)

    @jax.checkpoint  # the backward pass recomputes a chunk's forward pass instead of keeping them all
    def chunk_sums(p, idx, keep):
        logits, _ = semantics.apply_model(model, p, stats, inputs[idx], False, None, semantics.SINGLE_STEP_MOMENTUM)
        losses = loss_fn(logits, labels[idx])
        if isinstance(losses, SummedLosses):  # per-token totals over counted tokens
            total, counted = losses.total, losses.count
        else:
            total, counted = losses, jnp.ones_like(losses)
        weights = keep.reshape(keep.shape + (1,) * (total.ndim - 1))  # per example, over its tokens
        return (jnp.sum(jnp.where(weights, total, jnp.zeros((), total.dtype))),
                jnp.sum(jnp.where(weights, counted, jnp.zeros((), counted.dtype))))

    def body(sums, chunk):
        total, counted = chunk_sums(params, *chunk)
        return (sums[0] + total, sums[1] + counted), None

    first = jax.eval_shape(chunk_sums, params, index[0], kept[0])
    zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in first)
    (total, counted), _ = jax.lax.scan(body, zeros, (index, kept))
    return total, jax.lax.stop_gradient(counted).astype(total.dtype)


def chunkable(multi_step: bool, dp: LocalDiffPrivacy, eval_mode: bool) -> bool:
    """Whether a user's examples may run in chunks here: an unclipped single-step user in eval mode.

    Args:
      multi_step: whether the user takes several local steps.
      dp: its local differential privacy settings.
      eval_mode: whether the server sends BatchNorm buffers (no batch statistics couple the examples).

    Returns:
      Whether ``chunked_single_step_loss`` may replace ``semantics.single_step_loss`` for it.
    """
    return not multi_step and dp.per_example_clipping <= 0 and eval_mode


def auto_examples_per_chunk(num_examples: int, user_bytes: int, budget_bytes: Optional[int] = None) -> Optional[int]:
    """Examples per chunk so that one user fits ``budget_bytes``; ``None`` when the whole batch fits.

    Args:
      num_examples: the user's examples.
      user_bytes: what the user needs with all of them at once (XLA's estimate).
      budget_bytes: default a quarter of the free memory (``chunking.DEFAULT_MEMORY_FRACTION``):
        this is about fitting at all, not about the cache-sized chunks of users.

    Returns:
      The examples per chunk (at least 1), or ``None``.
    """
    if budget_bytes is None:
        budget_bytes = int(chunking.DEFAULT_MEMORY_FRACTION * chunking.available_memory_bytes())
    if user_bytes <= budget_bytes:
        return None
    # The activations grow with the examples; the parameters' gradient does not, so this errs small.
    return max(1, num_examples * budget_bytes // user_bytes)


__all__ = ["auto_examples_per_chunk", "chunkable", "chunked_single_step_loss"]

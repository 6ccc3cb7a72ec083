"""BatchNorm with PyTorch's semantics, and the pure running-statistics update it uses.

Flax's ``nn.BatchNorm`` differs from ``torch.nn.BatchNorm2d`` in ways that change the numbers an
attack sees: it stores the *biased* batch variance in its running average, has no cumulative
average (PyTorch's ``momentum=None``), no ``num_batches_tracked`` and its momentum is the weight of
the *old* value. This layer reproduces PyTorch:

* train mode normalises with the biased batch variance, but the running variance is updated with
  the unbiased one (``n / (n - 1)``, ``n`` = examples x spatial positions);
* ``momentum`` is the weight of the new batch statistic; ``momentum=None`` is the cumulative
  average ``running + (batch - running) / (num_batches_tracked + 1)``;
* ``num_batches_tracked`` grows by one per train-mode call;
* an optional per-example ``mask`` restricts the batch statistics to the valid examples, so a
  padded (shorter) step of ``local_update`` behaves exactly like PyTorch on the short batch.

Variables are declared in ``torch.nn.BatchNorm2d``'s order: params ``scale`` (weight), ``bias``;
batch_stats ``mean``, ``var``, ``num_batches_tracked``.

``param_dtype`` is the dtype of the parameters and running statistics (as ``module.double()``
makes torch's buffers float64 too), ``dtype`` the dtype the layer computes in; ``None`` (the
default) follows the inputs for both, as the layer always did.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from fedjax_users.batchnorm import BatchNorm
    >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> variables = BatchNorm().init(jax.random.key(0), x, train=False)
    >>> train = jax.jit(lambda variables, x: BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"]))
    >>> _, updated = train(variables, x)
    >>> print(updated["batch_stats"]["var"])  # 0.9 * 1 + 0.1 * the unbiased variance [2, 8]
    [1.1 1.7]
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

STAT_KEYS = ("mean", "var", "num_batches_tracked")

__all__ = ["BatchNorm", "batch_moments", "fold_batch_stats", "map_layers", "update_running_stats"]


def batch_moments(x: Array, mask: Optional[Array]) -> tuple[Array, Array, Array]:
    """Per-feature mean, biased variance and element count over all axes but the last.

    Args:
      x: ``[N, ..., features]`` activations.
      mask: ``[N]`` booleans, the examples that count, or ``None`` for all.

    Returns:
      ``(mean, var, count)``: ``[features]`` mean and biased variance over the kept examples and
      every position, and the number of elements each averages (a scalar in ``x``'s dtype).

    Example::

        >>> import jax.numpy as jnp
        >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
        >>> [a.tolist() for a in batch_moments(x, None)]
        [[2.0, 4.0], [1.0, 4.0], 2.0]
        >>> [a.tolist() for a in batch_moments(x, jnp.array([True, False]))]
        [[1.0, 2.0], [0.0, 0.0], 1.0]
    """
    reduce_axes = tuple(range(x.ndim - 1))
    if mask is None:
        count = jnp.asarray(x.size // x.shape[-1], x.dtype)
        mean = jnp.mean(x, axis=reduce_axes)
        var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
        return mean, var, count
    chex.assert_shape(mask, (x.shape[0],))
    weights = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    per_example = x.size // (x.shape[0] * x.shape[-1])
    count = jnp.sum(weights) * per_example
    mean = jnp.sum(x * weights, axis=reduce_axes) / count
    var = jnp.sum(jnp.square(x - mean) * weights, axis=reduce_axes) / count
    return mean, var, count


def update_running_stats(
    stats: Mapping[str, Array], mean: Array, unbiased_var: Array, momentum: Optional[float]
) -> dict[str, Array]:
    """One PyTorch running-average step of a single layer's ``{mean, var, num_batches_tracked}``.

    Args:
      stats: the layer's running statistics.
      mean: ``[features]``, the batch mean.
      unbiased_var: ``[features]``, the batch's unbiased variance.
      momentum: the weight of the batch statistic (torch's ``momentum``); ``None`` for the
        cumulative average over the batches tracked so far.

    Returns:
      The new ``{mean, var, num_batches_tracked}`` (``num_batches_tracked`` one higher).

    Example::

        >>> import jax.numpy as jnp
        >>> stats = {"mean": jnp.zeros(2), "var": jnp.ones(2), "num_batches_tracked": jnp.array(0)}
        >>> new = update_running_stats(stats, jnp.array([2.0, 4.0]), jnp.array([2.0, 8.0]), None)
        >>> new["mean"].tolist(), new["var"].tolist(), int(new["num_batches_tracked"])
        ([2.0, 4.0], [2.0, 8.0], 1)
    """
    tracked = stats["num_batches_tracked"] + 1
    if momentum is None:
        factor = 1.0 / tracked.astype(mean.dtype)
    else:
        factor = jnp.asarray(momentum, mean.dtype)
    return {
        "mean": (1.0 - factor) * stats["mean"] + factor * mean,
        "var": (1.0 - factor) * stats["var"] + factor * unbiased_var,
        "num_batches_tracked": tracked,
    }


def _is_layer_stats(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node.keys()) == set(STAT_KEYS)


def map_layers(fn: Callable[..., Any], *trees: Any) -> Any:
    """Apply ``fn`` to every BatchNorm layer's stats dict of one or more same-shaped trees.

    A buffer outside any BatchNorm layer (a fixed table such as breaching's sinusoidal positions,
    which no step changes) is taken from the first tree as it is.

    Args:
      fn: called with each layer's ``{mean, var, num_batches_tracked}`` from every tree.
      *trees: ``batch_stats`` trees of the same structure.

    Returns:
      The first tree's structure with each layer's stats replaced by ``fn``'s result.

    Example::

        >>> import jax.numpy as jnp
        >>> layer = {"mean": jnp.zeros(2), "var": jnp.ones(2), "num_batches_tracked": jnp.array(3)}
        >>> map_layers(lambda stats: int(stats["num_batches_tracked"]), {"bn": layer, "table": jnp.arange(2)})
        {'bn': 3, 'table': Array([0, 1], dtype=int32)}
    """
    first = trees[0]
    if _is_layer_stats(first):
        return fn(*trees)
    if not isinstance(first, Mapping):
        return first
    return {name: map_layers(fn, *(t[name] for t in trees)) for name in first}


def fold_batch_stats(
    stats: Mapping[str, Any], per_batch_stats: Mapping[str, Any], momentum: Optional[float]
) -> dict[str, Any]:
    """Fold a sequence of batch statistics (leading axis) into running stats, one batch at a time.

    This reproduces PyTorch looping over the batches in order, which is what the reference does
    for per-example clipping.

    Args:
      stats: the running ``batch_stats`` tree before the batches.
      per_batch_stats: the same tree whose layers hold, on a leading batches axis, each batch's
        mean and unbiased variance (as the model gives them when called with ``momentum=1.0``).
      momentum: as in ``update_running_stats``.

    Returns:
      The running statistics after every batch, in ``stats``' structure.

    Example::

        >>> import jax.numpy as jnp
        >>> stats = {"bn": {"mean": jnp.zeros(1), "var": jnp.ones(1), "num_batches_tracked": jnp.array(0)}}
        >>> batches = {"bn": {"mean": jnp.array([[2.0], [0.0]]), "var": jnp.ones((2, 1)),
        ...                   "num_batches_tracked": jnp.zeros(2)}}
        >>> folded = fold_batch_stats(stats, batches, None)["bn"]  # the cumulative average of 2 and 0
        >>> folded["mean"].tolist(), int(folded["num_batches_tracked"])
        ([1.0], 2)
    """

    def fold_layer(layer, batches):
        def step(carry, batch):
            return update_running_stats(carry, batch["mean"], batch["var"], momentum), None

        folded, _ = jax.lax.scan(step, dict(layer), {"mean": batches["mean"], "var": batches["var"]})
        return folded

    return map_layers(fold_layer, stats, per_batch_stats)


def _cast(dtype: Any, *arrays: Array) -> tuple[Array, ...]:
    """``arrays`` in ``dtype``, or unchanged when it is ``None``."""
    return arrays if dtype is None else tuple(a.astype(dtype) for a in arrays)


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm{1,2}d`` over the last (feature) axis, with PyTorch's running statistics.

    Attributes:
      epsilon: added to the variance before its square root (torch's ``eps``).
      dtype: the dtype the layer computes in; ``None`` follows the inputs.
      param_dtype: the dtype of the parameters and running statistics; ``None`` follows the inputs.
    """

    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool,
        mask: Optional[Array] = None,
        momentum: Optional[float] = 0.1,
    ) -> Array:
        """Normalise ``x``; in train mode update the running statistics (when mutable).

        Args:
          x: ``[N, ..., features]`` activations.
          train: normalise with the batch's statistics and update the running ones, else with
            the running ones.
          mask: ``[N]`` booleans, the examples the batch statistics count, or ``None`` for all.
          momentum: the weight of the batch statistics in the running average; ``None`` for the
            cumulative average.

        Returns:
          The normalised, scaled and shifted ``x``.
        """
        features = x.shape[-1]
        param_dtype = x.dtype if self.param_dtype is None else self.param_dtype
        scale = self.param("scale", nn.initializers.ones, (features,), param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), param_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), param_dtype)
        tracked = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        # No dtype: no cast, the arithmetic promotes as it always did.
        x, scale, bias = _cast(self.dtype, x, scale, bias)

        if train:
            mean, var, count = batch_moments(x, mask)
            if not self.is_initializing():
                # Bessel's correction with the count of valid elements, as torch does.
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                new = update_running_stats(
                    {"mean": running_mean.value, "var": running_var.value,
                     "num_batches_tracked": tracked.value},
                    mean, unbiased, momentum,
                )
                running_mean.value = new["mean"]
                running_var.value = new["var"]
                tracked.value = new["num_batches_tracked"]
        else:
            mean, var = _cast(self.dtype, running_mean.value, running_var.value)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return (x - mean) * inv + bias

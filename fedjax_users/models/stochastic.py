"""Train-mode randomness of torch models: ``torch.nn.Dropout`` and NFNet's stochastic depth.

In eval mode both layers are the identity, so a model holding them is a deterministic function
and equals its torch twin given the same weights. In train mode torch draws its masks from its
own generator, which JAX cannot reproduce; here the masks come from the ``dropout`` RNG stream
(``model.apply(..., rngs={"dropout": key})``), and are drawn by one method, ``keep_mask``, so that
a caller can supply torch's own masks instead (``flax.linen.intercept_methods``) and compare the
two frameworks exactly on the same draws. Everything but the draw is torch's arithmetic.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.models.dtypes import Dtype

Array = jax.Array
RNG_STREAM = "dropout"


class Dropout(nn.Module):
    """``torch.nn.Dropout(rate)``: in train mode ``x * keep / (1 - rate)``, ``keep ~ Bernoulli(1 - rate)``."""

    rate: float
    dtype: Optional[Dtype] = None

    def keep_mask(self, shape: tuple[int, ...]) -> Array:
        """Which entries survive (boolean, ``shape``)."""
        return jax.random.bernoulli(self.make_rng(RNG_STREAM), 1.0 - self.rate, shape)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not train or self.rate == 0.0:
            return x
        # torch scales the 0/1 noise by 1 / (1 - p) in the input's dtype, then multiplies.
        noise = self.keep_mask(x.shape).astype(x.dtype) / jnp.asarray(1.0 - self.rate, x.dtype)
        return x * noise


class StochasticDepth(nn.Module):
    """breaching's ``StochDepth(rate)``: in train mode each example's branch is kept with probability ``1 - rate``.

    torch draws ``u ~ U[0, 1)`` per example and multiplies by ``floor(u + 1 - rate)``, with no
    rescaling of the kept examples.
    """

    rate: float

    def keep_mask(self, shape: tuple[int, ...]) -> Array:
        """Per-example 0/1 factors of shape ``(batch, 1, 1, 1)`` (NHWC broadcast)."""
        uniform = jax.random.uniform(self.make_rng(RNG_STREAM), shape)
        return jnp.floor(uniform + (1.0 - self.rate))

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not train:
            return x
        return x * self.keep_mask((x.shape[0],) + (1,) * (x.ndim - 1)).astype(x.dtype)

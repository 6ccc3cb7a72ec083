"""Layers shared by the Flax ports of Hugging Face's torch BERT and GPT-2 (``transformers`` 5).

* ``ACTIVATIONS``: the ``hidden_act`` / ``activation_function`` names of ``transformers``'
  ``ACT2FN`` that these models' configs use, each the formula its torch class computes
  (``gelu`` is the exact erf form, ``gelu_new`` and ``gelu_pytorch_tanh`` the tanh form, ...).
* ``layer_norm``: ``torch.nn.LayerNorm`` with the config's epsilon (two-pass variance, as torch).
* ``Conv1D``: ``transformers.pytorch_utils.Conv1D``, a linear layer whose ``weight`` is stored
  ``[in, out]`` (so the torch name ``weight`` keeps its layout, unlike a ``kernel``).
* ``Attention``: scaled dot-product attention over heads, bidirectional or causal, optionally
  hiding padded keys (HF's ``attention_mask``), with dropout on the attention probabilities, as
  HF's eager and SDPA attention compute it.
* ``normal_init`` / ``embedding_init``: HF's ``_init_weights`` distributions (``N(0, initializer_range)``,
  the padding row of an embedding zero).

Dropout is ``fedjax_users.models.stochastic.Dropout`` (the ``dropout`` RNG stream), active only
when ``train`` is true, as torch's modules are only in ``model.train()``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.models.dtypes import Dtype, layer_dtypes
from fedjax_users.models.stochastic import Dropout
from fedjax_users.models.text import _compute_in, _param_dtype

Array = jax.Array
Initializer = Callable[..., Array]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


_A = TypeVar("_A", bound="Architecture")


class Architecture:
    """Base of the frozen dataclasses holding a Hugging Face config's architecture fields."""

    @classmethod
    def from_dict(cls: type[_A], config: Mapping[str, Any]) -> _A:
        """The architecture a ``config.json`` describes (its other keys are not read)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})


class ConfiguredModule(nn.Module):
    """A submodule of a ported model: its architecture ``config`` and the two dtypes it passes on."""

    config: Any
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @property
    def dtypes(self) -> dict[str, Dtype]:
        """The set dtypes, as keyword arguments for layers and submodules."""
        return layer_dtypes(self.dtype, self.param_dtype)


def _gelu_tanh(x: Array) -> Array:
    """``NewGELUActivation`` / ``gelu(approximate="tanh")``: the tanh approximation of GELU."""
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


# transformers' ACT2FN names, as the torch classes compute them.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation a Hugging Face config names; a ``ValueError`` listing the known ones otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not ported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def normal_init(std: float) -> Initializer:
    """``N(0, std)``: HF's initialisation of linear and embedding weights."""
    return nn.initializers.normal(std)


def embedding_init(std: float, padding_idx: Optional[int]) -> Initializer:
    """HF's embedding initialisation: ``N(0, std)`` with the ``padding_idx`` row zero."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        table = jax.random.normal(key, shape, dtype) * jnp.asarray(std, dtype)
        if padding_idx is None or not 0 <= padding_idx < shape[0]:
            return table
        return table.at[padding_idx].set(0)

    return init


def lookup(table: Array, ids: Array, padding_idx: Optional[int]) -> Array:
    """``torch.nn.Embedding(padding_idx=...)`` lookup: the padding row's lookups pass no gradient to it."""
    rows = jnp.take(table, ids, axis=0)
    if padding_idx is None:
        return rows
    return jnp.where((ids == padding_idx)[..., None], jax.lax.stop_gradient(rows), rows)


class Embedding(nn.Module):
    """``torch.nn.Embedding`` as HF initialises it; returns the looked-up rows and the table (for a tied decoder)."""

    num_embeddings: int
    features: int
    std: float = 0.02
    padding_idx: Optional[int] = None
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, ids: Array) -> tuple[Array, Array]:
        table = self.param(
            "embedding", embedding_init(self.std, self.padding_idx), (self.num_embeddings, self.features),
            *_param_dtype(self.param_dtype),
        )
        (table,) = _compute_in(self.dtype, table)
        return lookup(table, ids, self.padding_idx), table


def layer_norm(epsilon: float, name: str, **dtypes: Dtype) -> nn.LayerNorm:
    """``torch.nn.LayerNorm(eps=epsilon)``: two-pass variance, ``weight`` as ``scale``."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name, **dtypes)


def dense(features: int, std: float, name: str, **dtypes: Dtype) -> nn.Dense:
    """``torch.nn.Linear`` as HF initialises it: weight ``N(0, std)``, bias zero."""
    return nn.Dense(features, kernel_init=normal_init(std), bias_init=nn.initializers.zeros, name=name, **dtypes)


class Conv1D(nn.Module):
    """``transformers.pytorch_utils.Conv1D``: ``x @ weight + bias`` with ``weight [in, out]``."""

    features: int
    std: float = 0.02
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        param_dtype = _param_dtype(self.param_dtype)
        weight = self.param("weight", normal_init(self.std), (x.shape[-1], self.features), *param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), *param_dtype)
        x, weight, bias = _compute_in(self.dtype, x, weight, bias)
        return x @ weight + bias


def split_heads(x: Array, num_heads: int) -> Array:
    """``[B, T, E]`` as ``[B, T, heads, E / heads]``."""
    return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


class Attention(nn.Module):
    """Softmax attention of per-head ``query, key, value [B, T, H, D]``; ``[B, T, H * D]`` out.

    Scores are ``q . k * scaling``; a ``causal`` mask hides later keys, and ``key_mask [B, T]``
    (HF's ``attention_mask``: true where a token is attended to) hides the keys it marks false.
    A hidden key's probability is zero, as HF's additive mask of the dtype's minimum and SDPA's
    masks give. Dropout acts on the probabilities in train mode.
    """

    scaling: float
    causal: bool
    dropout_rate: float

    @nn.compact
    def __call__(self, query: Array, key: Array, value: Array, train: bool, key_mask: Optional[Array] = None) -> Array:
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) * jnp.asarray(self.scaling, query.dtype)
        length = query.shape[1]
        visible = jnp.tril(jnp.ones((length, length), bool)) if self.causal else None
        if key_mask is not None:
            keys = key_mask[:, None, None, :]  # every head and query of a sequence sees the same keys
            visible = keys if visible is None else visible & keys
        if visible is not None:
            scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = Dropout(self.dropout_rate, name="dropout")(probs, train)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
        return out.reshape(out.shape[:2] + (-1,))


def check_length(length: int, max_positions: int) -> int:
    """``length`` if the position table covers it; a ``ValueError`` (torch's failing lookup) otherwise."""
    if length > max_positions:
        raise ValueError(f"sequence length {length} exceeds the model's {max_positions} positions")
    return length


__all__ = [
    "ACTIVATIONS",
    "Architecture",
    "Attention",
    "ConfiguredModule",
    "Conv1D",
    "Embedding",
    "activation",
    "check_length",
    "dense",
    "embedding_init",
    "layer_norm",
    "lookup",
    "normal_init",
    "split_heads",
]

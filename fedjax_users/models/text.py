"""breaching's language models (``linear``, ``transformer3``, ``transformer3t``) in Flax.

Submodule and parameter names mirror the torch modules' ``named_parameters()`` so weights convert
by name: ``encoder`` is the token embedding, ``decoder`` the output projection,
``pos_encoder/embedding`` the learned positions, ``transformer_encoder/layers/<i>`` the encoder
layers with ``self_attn`` (packed ``in_proj_weight [3E, E]`` / ``in_proj_bias`` in torch layout,
``out_proj``), ``linear1``, ``linear2``, ``norm1``, ``norm2``. A tied decoder reuses the embedding
matrix and owns only its ``bias``, so the shared weight exists once, as in torch.

Initialisers follow torch's distributions so freshly initialised models behave alike; parity
itself comes from converting the reference's weights.

Models follow the package's model contract: ``apply(variables, token_ids [B, T], train, mask,
momentum) -> logits [B, T, vocab]``. They have no BatchNorm, so ``mask`` and ``momentum`` are
accepted and ignored, and there is no dropout (breaching builds them with ``dropout=0``).

Every model and submodule takes ``dtype`` (computation) and ``param_dtype`` (parameters), passed
to each of its layers; ``None`` (the default) keeps the layers' own defaults
(``fedjax_users.models.dtypes``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.models.dtypes import Dtype, layer_dtypes

Array = jax.Array
Initializer = Callable[..., Array]

# torch.nn.TransformerEncoderLayer's default LayerNorm epsilon.
LAYER_NORM_EPS = 1e-5

# Uniform(+-1/sqrt(fan_in)): torch.nn.Linear's default weight initialisation.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def uniform_init(bound: float) -> Initializer:
    """Initialiser drawing from Uniform(-bound, bound)."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear_bias_init(fan_in: int) -> Initializer:
    """torch.nn.Linear's default bias initialisation, Uniform(+-1/sqrt(fan_in))."""
    return uniform_init(1.0 / math.sqrt(fan_in))


def torch_dense(
    features: int,
    fan_in: int,
    name: str,
    kernel_init: Initializer = torch_linear_kernel_init,
    bias_init: Optional[Initializer] = None,
    **dtypes: Dtype,
) -> nn.Dense:
    """``nn.Dense`` initialised like ``torch.nn.Linear(fan_in, features)`` unless told otherwise."""
    return nn.Dense(
        features,
        kernel_init=kernel_init,
        bias_init=bias_init or torch_linear_bias_init(fan_in),
        name=name,
        **dtypes,
    )


def _param_dtype(param_dtype: Optional[Dtype]) -> tuple[Dtype, ...]:
    """The trailing ``self.param`` argument for ``param_dtype``: none when unset (the initialiser's default)."""
    return () if param_dtype is None else (param_dtype,)


def _compute_in(dtype: Optional[Dtype], *arrays: Array) -> tuple[Array, ...]:
    """``arrays`` cast to the computation ``dtype``, or unchanged when it is ``None``."""
    return arrays if dtype is None else tuple(jnp.asarray(a, dtype) for a in arrays)


class Bias(nn.Module):
    """The bias of a linear layer whose weight lives elsewhere (a decoder tied to its embedding)."""

    features: int
    fan_in: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = torch_linear_bias_init(self.fan_in)
        bias = self.param("bias", init, (self.features,), *_param_dtype(self.param_dtype))
        x, bias = _compute_in(self.dtype, x, bias)
        return x + bias


def decode(encoder: nn.Embed, hidden: Array, tied: bool, kernel_init: Initializer, **dtypes: Dtype) -> Array:
    """Vocabulary logits from ``hidden``, through a ``decoder`` tied to ``encoder`` or its own."""
    vocab_size, embed_dim = encoder.num_embeddings, encoder.features
    if tied:
        return Bias(vocab_size, embed_dim, name="decoder", **dtypes)(encoder.attend(hidden))
    return torch_dense(vocab_size, embed_dim, "decoder", kernel_init=kernel_init, **dtypes)(hidden)


class LinearModel(nn.Module):
    """Embedding followed by a linear decoder tied to it (breaching's ``linear``)."""

    vocab_size: int
    embedding_size: int = 200
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Optional[float] = 0.1
    ) -> Array:
        del train, mask, momentum  # no BatchNorm, no dropout
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        # torch.nn.Embedding draws N(0, 1); tying happens after, so the shared weight keeps it.
        encoder = nn.Embed(
            self.vocab_size, self.embedding_size, embedding_init=nn.initializers.normal(1.0), name="encoder",
            **dtypes,
        )
        return decode(encoder, encoder(x), tied=True, kernel_init=torch_linear_kernel_init, **dtypes)


class LearnablePositionalEmbedding(nn.Module):
    """Adds a learned embedding of each position ``0 .. T-1`` to batch-first inputs."""

    max_len: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        length = x.shape[1]
        if length > self.max_len:
            # torch fails on the out-of-range lookup; jnp.take would silently fill NaNs instead.
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        table = nn.Embed(
            self.max_len, x.shape[-1], embedding_init=nn.initializers.normal(1.0), name="embedding",
            **layer_dtypes(self.dtype, self.param_dtype),
        )
        return x + table(jnp.arange(length))[None]


class MultiheadSelfAttention(nn.Module):
    """torch.nn.MultiheadAttention on (x, x, x) with no mask, parameters in torch's packed layout."""

    num_heads: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        embed_dim = x.shape[-1]
        head_dim = embed_dim // self.num_heads
        if head_dim * self.num_heads != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {self.num_heads}")
        param_dtype = _param_dtype(self.param_dtype)
        # The sum fan_in + fan_out of [3E, E] is the same read either way, so Xavier matches torch.
        in_proj_weight = self.param(
            "in_proj_weight", nn.initializers.xavier_uniform(), (3 * embed_dim, embed_dim), *param_dtype
        )
        in_proj_bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * embed_dim,), *param_dtype)
        x, in_proj_weight, in_proj_bias = _compute_in(self.dtype, x, in_proj_weight, in_proj_bias)
        qkv = x @ in_proj_weight.T + in_proj_bias
        heads = qkv.reshape(x.shape[:-1] + (3, self.num_heads, head_dim))
        query, key, value = heads[..., 0, :, :], heads[..., 1, :, :], heads[..., 2, :, :]
        # Scales the query by 1/sqrt(head_dim) and softmaxes over keys, as torch does.
        attended = nn.dot_product_attention(query, key, value, deterministic=True, dtype=self.dtype)
        merged = attended.reshape(x.shape)
        out_proj = torch_dense(
            embed_dim, embed_dim, "out_proj", bias_init=nn.initializers.zeros,
            **layer_dtypes(self.dtype, self.param_dtype),
        )
        return out_proj(merged)


def torch_layer_norm(name: str, **dtypes: Dtype) -> nn.LayerNorm:
    """LayerNorm computing the variance as torch does (two-pass), with torch's epsilon."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name, **dtypes)


class TransformerEncoderLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer defaults: post-norm, ReLU feed-forward, no dropout."""

    num_heads: int
    hidden_dim: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        embed_dim = x.shape[-1]
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        attention = MultiheadSelfAttention(self.num_heads, name="self_attn", **dtypes)
        x = torch_layer_norm("norm1", **dtypes)(x + attention(x))
        hidden = nn.relu(torch_dense(self.hidden_dim, embed_dim, "linear1", **dtypes)(x))
        feed_forward = torch_dense(embed_dim, self.hidden_dim, "linear2", **dtypes)(hidden)
        return torch_layer_norm("norm2", **dtypes)(x + feed_forward)


class EncoderLayers(nn.Module):
    """``num_layers`` encoder layers in sequence, named ``0, 1, ...`` like a torch ModuleList."""

    num_layers: int
    num_heads: int
    hidden_dim: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        for index in range(self.num_layers):
            x = TransformerEncoderLayer(self.num_heads, self.hidden_dim, name=str(index), **dtypes)(x)
        return x


class TransformerEncoder(nn.Module):
    """torch.nn.TransformerEncoder without a final norm; holds its layers under ``layers``."""

    num_layers: int
    num_heads: int
    hidden_dim: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        return EncoderLayers(self.num_layers, self.num_heads, self.hidden_dim, name="layers", **dtypes)(x)


class TransformerModel(nn.Module):
    """breaching's ``TransformerModel`` with learnable positions, unmasked (its default forward)."""

    vocab_size: int
    embed_dim: int = 96
    num_heads: int = 8
    hidden_dim: int = 1536
    num_layers: int = 3
    max_len: int = 1024  # the reference's LearnablePositionalEmbedding table size
    tie_weights: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Optional[float] = 0.1
    ) -> Array:
        del train, mask, momentum  # no BatchNorm, no dropout
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        # The reference re-initialises both embedding and decoder weight as Uniform(+-0.1).
        init_range = uniform_init(0.1)
        encoder = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=init_range, name="encoder", **dtypes)
        inputs = encoder(x) * math.sqrt(self.embed_dim)
        inputs = LearnablePositionalEmbedding(self.max_len, name="pos_encoder", **dtypes)(inputs)
        encoder_layers = TransformerEncoder(
            self.num_layers, self.num_heads, self.hidden_dim, name="transformer_encoder", **dtypes
        )
        return decode(encoder, encoder_layers(inputs), tied=self.tie_weights, kernel_init=init_range, **dtypes)


# breaching's text model names and how it builds each (``_construct_text_model``); each also
# takes ``dtype=`` / ``param_dtype=``.
TEXT_MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear": lambda vocab_size, **dtypes: LinearModel(vocab_size, embedding_size=200, **dtypes),
    "transformer3": lambda vocab_size, **dtypes: TransformerModel(vocab_size, **dtypes),
    "transformer3t": lambda vocab_size, **dtypes: TransformerModel(vocab_size, tie_weights=True, **dtypes),
}


def get_text_model(
    name: str, vocab_size: int, dtype: Optional[Dtype] = None, param_dtype: Optional[Dtype] = None
) -> nn.Module:
    """The Flax counterpart of breaching's text model ``name`` for a ``vocab_size`` vocabulary."""
    if name not in TEXT_MODELS:
        raise ValueError(f"unknown text model {name!r}; known: {sorted(TEXT_MODELS)}")
    return TEXT_MODELS[name](vocab_size, **layer_dtypes(dtype, param_dtype))


def _registry_constructor(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Adapt ``build(vocab_size, **dtypes)`` to the registry's ``(num_classes=..., num_channels=...)`` call."""

    def construct(num_classes: int, num_channels: Optional[int] = None, **dtypes: Dtype) -> nn.Module:
        del num_channels  # token ids have no channels
        return build(num_classes, **dtypes)

    return construct


# For ``fedjax_users.models.register("text", MODELS)``: num_classes is read as the vocabulary size.
MODELS: dict[str, Callable[..., nn.Module]] = {name: _registry_constructor(b) for name, b in TEXT_MODELS.items()}

"""breaching's language models (``linear``, ``transformer1/S/3/3f/3t``, ``LSTM``) in Flax.

Submodule and parameter names mirror the torch modules' ``named_parameters()`` so weights convert
by name: ``encoder`` is the token embedding, ``decoder`` the output projection,
``pos_encoder/embedding`` the learned positions, ``transformer_encoder/layers/<i>`` the encoder
layers with ``self_attn`` (packed ``in_proj_weight [3E, E]`` / ``in_proj_bias`` in torch layout,
``out_proj``), ``linear1``, ``linear2``, ``norm1``, ``norm2``. A tied decoder reuses the embedding
matrix and owns only its ``bias``, so the shared weight exists once, as in torch.

breaching's fixed sinusoidal positions are a torch *buffer* (``pos_encoder.pe``, shape
``[1, max_len, E]``), so here they are the ``batch_stats`` entry ``pos_encoder/pe``: the server
sends it with the buffers and the user shares it back, as breaching's users do with every buffer.
No layer ever changes it. ``LSTM`` holds ``torch.nn.LSTM``'s ``rnn/weight_ih_l<k>``,
``weight_hh_l<k>``, ``bias_ih_l<k>``, ``bias_hh_l<k>`` in torch's layout (gate rows i, f, g, o).

Initialisers follow torch's distributions so freshly initialised models behave alike; parity
itself comes from converting the reference's weights.

Models follow the package's model contract: ``apply(variables, token_ids [B, T], train, mask,
momentum) -> logits [B, T, vocab]``. They have no BatchNorm, so ``mask`` and ``momentum`` are
accepted and ignored, and there is no dropout (breaching builds them with ``dropout=0``). The
LSTM starts every call from a zero state and returns only the logits (see ``LSTMModel``).

Every model and submodule takes ``dtype`` (computation) and ``param_dtype`` (parameters), passed
to each of its layers; ``None`` (the default) keeps the layers' own defaults
(``fedjax_users.models.dtypes``).
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_users.models.dtypes import Dtype, layer_dtypes

Array = jax.Array
Initializer = Callable[..., Array]

# torch.nn.TransformerEncoderLayer's default LayerNorm epsilon.
LAYER_NORM_EPS = 1e-5
# Table sizes of the reference's positional embeddings (their ``max_len`` defaults).
LEARNABLE_MAX_LEN = 1024
FIXED_MAX_LEN = 5000

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
    vocab_size, fan_in = encoder.num_embeddings, hidden.shape[-1]
    if tied:
        return Bias(vocab_size, fan_in, name="decoder", **dtypes)(encoder.attend(hidden))
    return torch_dense(vocab_size, fan_in, "decoder", kernel_init=kernel_init, **dtypes)(hidden)


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


def check_length(length: int, max_len: int) -> int:
    """``length``, if a positional table of ``max_len`` rows covers it; a ``ValueError`` otherwise."""
    if length > max_len:
        # torch fails on the out-of-range lookup or sum; jnp.take would silently fill NaNs instead.
        raise ValueError(f"sequence length {length} exceeds max_len {max_len}")
    return length


def sinusoidal_table(max_len: int, embed_dim: int) -> np.ndarray:
    """breaching's ``PositionalEmbedding.pe`` ``[1, max_len, E]`` in float32: sines on even features, cosines on odd.

    The frequencies and angles are the same float32 products torch forms; each ``exp``, ``sin``
    and ``cos`` is evaluated in float64 and rounded once, so every entry is the correctly rounded
    float32 value. torch's float32 kernels land within float32 rounding of it, not always on it
    (and differently on different CPUs), so a converted reference buffer and this table can differ
    in the last bit.
    """
    if embed_dim % 2:
        raise ValueError(f"sinusoidal positions need an even embedding width, got {embed_dim}")
    scale = np.float32(-math.log(10000.0) / embed_dim)
    exponents = np.arange(0, embed_dim, 2, dtype=np.float32) * scale
    frequencies = np.exp(exponents.astype(np.float64)).astype(np.float32)
    angles = (np.arange(max_len, dtype=np.float32)[:, None] * frequencies).astype(np.float64)
    table = np.empty((max_len, embed_dim), np.float32)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table[None]


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds breaching's fixed sinusoidal table to batch-first inputs; the table is the buffer ``pe``.

    As a torch buffer it lives in ``batch_stats`` (so it converts with the other buffers, the
    server may send it and users share it); nothing here updates it. Its dtype is ``param_dtype``
    (float32 when unset), as ``module.double()`` casts torch's float32 table.
    """

    max_len: int = FIXED_MAX_LEN
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        length = check_length(x.shape[1], self.max_len)
        table_dtype = self.param_dtype or jnp.float32
        pe = self.variable(
            "batch_stats", "pe", lambda: jnp.asarray(sinusoidal_table(self.max_len, x.shape[-1]), table_dtype)
        ).value
        x, pe = _compute_in(self.dtype, x, pe)
        return x + pe[:, :length]


class LearnablePositionalEmbedding(nn.Module):
    """Adds a learned embedding of each position ``0 .. T-1`` to batch-first inputs."""

    max_len: int
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        length = check_length(x.shape[1], self.max_len)
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

    # torch registers both norms after the feed-forward; the post-norm forward calls norm1 before it
    # (breaching's list order, ``fedjax_users.interop.order``).
    torch_children: ClassVar[tuple[str, ...]] = ("self_attn", "linear1", "linear2", "norm1", "norm2")

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
    """breaching's ``TransformerModel``, unmasked (its default forward).

    ``positional_embedding`` is ``"learnable"`` (a trained table, a parameter) or ``"fixed"`` (the
    sinusoidal buffer); breaching's constructor defaults to ``"fixed"``, this class to
    ``"learnable"`` as it always has. ``max_len`` ``None`` is the reference's table size for the kind.
    """

    # breaching registers the token embedding after the positions and the encoder layers, though
    # its forward calls it first (breaching's list order, ``fedjax_users.interop.order``).
    torch_children: ClassVar[tuple[str, ...]] = ("pos_encoder", "transformer_encoder", "encoder", "decoder")

    vocab_size: int
    embed_dim: int = 96
    num_heads: int = 8
    hidden_dim: int = 1536
    num_layers: int = 3
    max_len: Optional[int] = None
    tie_weights: bool = False
    positional_embedding: str = "learnable"
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
        inputs = self._positions(dtypes)(inputs)
        encoder_layers = TransformerEncoder(
            self.num_layers, self.num_heads, self.hidden_dim, name="transformer_encoder", **dtypes
        )
        return decode(encoder, encoder_layers(inputs), tied=self.tie_weights, kernel_init=init_range, **dtypes)

    def _positions(self, dtypes: dict) -> nn.Module:
        """The ``pos_encoder`` submodule of the chosen kind."""
        kinds = {"learnable": (LearnablePositionalEmbedding, LEARNABLE_MAX_LEN),
                 "fixed": (SinusoidalPositionalEmbedding, FIXED_MAX_LEN)}
        if self.positional_embedding not in kinds:
            raise ValueError(
                f"positional_embedding must be one of {sorted(kinds)}, got {self.positional_embedding!r}"
            )
        module, default_len = kinds[self.positional_embedding]
        return module(self.max_len or default_len, name="pos_encoder", **dtypes)


def lstm_layer(x: Array, weight_ih: Array, weight_hh: Array, bias_ih: Array, bias_hh: Array) -> Array:
    """One ``torch.nn.LSTM`` layer over batch-first ``x [B, T, in]`` from a zero state: hidden states ``[B, T, H]``.

    Weights in torch's layout, gate rows in torch's order (input, forget, cell, output), both biases.
    """
    hidden_dim = weight_hh.shape[1]
    input_gates = x @ weight_ih.T + bias_ih  # every step's input part at once

    def step(carry: tuple[Array, Array], gates_in: Array) -> tuple[tuple[Array, Array], Array]:
        h, c = carry
        gates = gates_in + (h @ weight_hh.T + bias_hh)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros(x.shape[:1] + (hidden_dim,), input_gates.dtype)
    _, hidden = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(input_gates, 0, 1))
    return jnp.swapaxes(hidden, 0, 1)


class LSTM(nn.Module):
    """``torch.nn.LSTM(batch_first=True, dropout=0)`` from a zero state; the last layer's outputs.

    Parameters are torch's: ``weight_ih_l<k> [4H, in]``, ``weight_hh_l<k> [4H, H]``,
    ``bias_ih_l<k>``, ``bias_hh_l<k> [4H]``, all drawn from Uniform(+-1/sqrt(H)) as torch does.
    """

    hidden_dim: int
    num_layers: int = 1
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gates, param_dtype = 4 * self.hidden_dim, _param_dtype(self.param_dtype)
        init = uniform_init(1.0 / math.sqrt(self.hidden_dim))
        for layer in range(self.num_layers):
            weights = (
                self.param(f"weight_ih_l{layer}", init, (gates, x.shape[-1]), *param_dtype),
                self.param(f"weight_hh_l{layer}", init, (gates, self.hidden_dim), *param_dtype),
                self.param(f"bias_ih_l{layer}", init, (gates,), *param_dtype),
                self.param(f"bias_hh_l{layer}", init, (gates,), *param_dtype),
            )
            x, *weights = _compute_in(self.dtype, x, *weights)
            x = lstm_layer(x, *weights)
        return x


class LSTMModel(nn.Module):
    """breaching's ``RNNModel("LSTM", ...)``: embedding, LSTM, decoder (tied to the embedding by default).

    breaching's ``forward(input_ids, hiddens)`` takes the initial state as an argument and returns
    ``(logits [B*T, vocab], final_state)``; it keeps no state between calls. This model is that
    forward with ``hiddens=None`` (torch's zero state), each sequence of the batch on its own, and
    returns the logits as ``[B, T, vocab]`` like every text model here; the final state is dropped.
    """

    vocab_size: int
    embed_dim: int = 96
    hidden_dim: int = 96
    num_layers: int = 1
    tie_weights: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Optional[float] = 0.1
    ) -> Array:
        del train, mask, momentum  # no BatchNorm, no dropout
        if self.tie_weights and self.hidden_dim != self.embed_dim:
            raise ValueError(
                f"a tied decoder needs hidden_dim == embed_dim, got {self.hidden_dim} and {self.embed_dim}"
            )
        dtypes = layer_dtypes(self.dtype, self.param_dtype)
        # The reference re-initialises both embedding and decoder weight as Uniform(+-0.1).
        init_range = uniform_init(0.1)
        encoder = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=init_range, name="encoder", **dtypes)
        hidden = LSTM(self.hidden_dim, self.num_layers, name="rnn", **dtypes)(encoder(x))
        return decode(encoder, hidden, tied=self.tie_weights, kernel_init=init_range, **dtypes)


# breaching's text model names and how it builds each (``_construct_text_model``); each also
# takes ``dtype=`` / ``param_dtype=``.
TEXT_MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear": lambda vocab_size, **dtypes: LinearModel(vocab_size, embedding_size=200, **dtypes),
    "transformer1": lambda vocab_size, **dtypes: TransformerModel(
        vocab_size, embed_dim=200, num_heads=1, hidden_dim=200, num_layers=1, positional_embedding="fixed", **dtypes
    ),
    "transformerS": lambda vocab_size, **dtypes: TransformerModel(
        vocab_size, embed_dim=512, num_heads=1, hidden_dim=512, num_layers=1, positional_embedding="fixed", **dtypes
    ),
    "transformer3": lambda vocab_size, **dtypes: TransformerModel(vocab_size, **dtypes),
    "transformer3f": lambda vocab_size, **dtypes: TransformerModel(vocab_size, positional_embedding="fixed", **dtypes),
    "transformer3t": lambda vocab_size, **dtypes: TransformerModel(vocab_size, tie_weights=True, **dtypes),
    "LSTM": lambda vocab_size, **dtypes: LSTMModel(vocab_size, embed_dim=96, hidden_dim=96, num_layers=1, **dtypes),
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

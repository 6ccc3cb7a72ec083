"""Hugging Face's torch ``GPT2LMHeadModel`` (``transformers`` 5) in Flax.

Submodules and parameters carry the torch names, so ``fedjax_users.interop`` converts HF state
dicts both ways: ``transformer/wte``, ``transformer/wpe``, ``transformer/h/<i>/ln_1``,
``.../attn/c_attn``, ``.../attn/c_proj``, ``.../ln_2``, ``.../mlp/c_fc``, ``.../mlp/c_proj`` and
``transformer/ln_f``. The attention and MLP projections are HF's ``Conv1D``, whose ``weight`` is
stored ``[in, out]`` and keeps that layout here. ``lm_head`` is tied to ``wte`` and has no bias,
so it owns no parameter (torch's ``named_parameters()`` lists the shared weight once, as
``transformer.wte.weight``). ``transformers`` 5 keeps no causal-mask buffer, so there are no
buffers.

The forward is the one breaching's ``HuggingFaceContainer`` runs, ``model(input_ids=...)``:
positions ``0 .. T-1``, causal attention, no padding mask. Dropout (embeddings, attention
probabilities, residual branches) draws from the ``dropout`` RNG stream in train mode only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.models import hf_layers
from fedjax_users.models.stochastic import Dropout
from fedjax_users.models.text import _compute_in

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPT2Architecture(hf_layers.Architecture):
    """The fields of ``transformers.GPT2Config`` that shape the forward; defaults are ``GPT2Config()``'s
    (gpt2's architecture)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True

    def check(self) -> "GPT2Architecture":
        """This architecture, if the port computes it; a ``ValueError`` naming what it lacks otherwise."""
        hf_layers.activation(self.activation_function)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.add_cross_attention:
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not ported")
        if not self.tie_word_embeddings:
            raise ValueError("an untied GPT-2 head (tie_word_embeddings=False) is not ported")
        return self


class GPT2Attention(hf_layers.ConfiguredModule):
    """``GPT2Attention`` (self-attention): ``c_attn`` to q, k, v, causal attention, ``c_proj``, dropout."""

    layer_idx: int = 0

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg, dtypes = self.config, self.dtypes
        qkv = hf_layers.Conv1D(3 * cfg.n_embd, cfg.initializer_range, name="c_attn", **dtypes)(x)
        q, k, v = (hf_layers.split_heads(part, cfg.n_head) for part in jnp.split(qkv, 3, axis=-1))
        scaling = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scaling /= float(self.layer_idx + 1)
        attended = hf_layers.Attention(scaling, True, cfg.attn_pdrop, name="attend")(q, k, v, train)
        # HF re-initialises every c_proj with a smaller std (_init_weights).
        projection_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        out = hf_layers.Conv1D(cfg.n_embd, projection_std, name="c_proj", **dtypes)(attended)
        return Dropout(cfg.resid_pdrop, name="resid_dropout")(out, train)


class GPT2MLP(hf_layers.ConfiguredModule):
    """``GPT2MLP``: ``c_fc``, the config's activation, ``c_proj``, dropout."""


    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg, dtypes = self.config, self.dtypes
        inner = cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd
        hidden = hf_layers.activation(cfg.activation_function)(
            hf_layers.Conv1D(inner, cfg.initializer_range, name="c_fc", **dtypes)(x)
        )
        projection_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        out = hf_layers.Conv1D(cfg.n_embd, projection_std, name="c_proj", **dtypes)(hidden)
        return Dropout(cfg.resid_pdrop, name="dropout")(out, train)


class GPT2Block(hf_layers.ConfiguredModule):
    """``GPT2Block``: pre-norm attention and MLP, each added to its residual."""

    layer_idx: int = 0

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg, dtypes = self.config, self.dtypes
        attention = GPT2Attention(cfg, layer_idx=self.layer_idx, name="attn", **dtypes)
        x = x + attention(hf_layers.layer_norm(cfg.layer_norm_epsilon, "ln_1", **dtypes)(x), train)
        mlp = GPT2MLP(cfg, name="mlp", **dtypes)
        return x + mlp(hf_layers.layer_norm(cfg.layer_norm_epsilon, "ln_2", **dtypes)(x), train)


class GPT2Blocks(hf_layers.ConfiguredModule):
    """The ``h`` ModuleList: ``n_layer`` blocks named ``0, 1, ...``."""


    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        dtypes = self.dtypes
        for index in range(self.config.n_layer):
            x = GPT2Block(self.config, layer_idx=index, name=str(index), **dtypes)(x, train)
        return x


class GPT2Model(hf_layers.ConfiguredModule):
    """``GPT2Model``: token + position embeddings, dropout, the blocks, ``ln_f``.

    Returns the final hidden states ``[B, T, E]`` and the token embedding table (for the tied head).
    """

    @nn.compact
    def __call__(self, input_ids: Array, train: bool) -> tuple[Array, Array]:
        cfg, dtypes = self.config, self.dtypes
        length = hf_layers.check_length(input_ids.shape[1], cfg.n_positions)
        tokens, table = hf_layers.Embedding(cfg.vocab_size, cfg.n_embd, cfg.initializer_range, name="wte", **dtypes)(
            input_ids
        )
        positions, _ = hf_layers.Embedding(cfg.n_positions, cfg.n_embd, cfg.initializer_range, name="wpe", **dtypes)(
            jnp.arange(length)[None]
        )
        hidden = Dropout(cfg.embd_pdrop, name="drop")(tokens + positions, train)
        hidden = GPT2Blocks(cfg, name="h", **dtypes)(hidden, train)
        return hf_layers.layer_norm(cfg.layer_norm_epsilon, "ln_f", **dtypes)(hidden), table


class GPT2LMHeadModel(hf_layers.ConfiguredModule):
    """``GPT2LMHeadModel`` as breaching's container runs it: ``input_ids [B, T] -> logits [B, T, vocab]``.

    Follows the package's model contract ``(x, train, mask, momentum)``; there is no BatchNorm, so
    ``mask`` and ``momentum`` are ignored.
    """

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Optional[float] = 0.1
    ) -> Array:
        del mask, momentum  # no BatchNorm
        hidden, table = GPT2Model(
            self.config.check(), name="transformer", **self.dtypes
        )(x, train)
        hidden, table = _compute_in(self.dtype, hidden, table)
        return hidden @ table.T  # lm_head: tied to wte, no bias

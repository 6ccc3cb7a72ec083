"""Hugging Face's torch ``BertForMaskedLM``, ``BertForPreTraining`` and ``BertForSequenceClassification``
(``transformers`` 5) in Flax.

Submodules and parameters carry the torch names, so ``fedjax_users.interop`` converts HF state
dicts both ways: ``bert/embeddings/{word,position,token_type}_embeddings``, ``bert/embeddings/LayerNorm``,
``bert/encoder/layer/<i>/attention/self/{query,key,value}``, ``.../attention/output/{dense,LayerNorm}``,
``.../intermediate/dense``, ``.../output/{dense,LayerNorm}``, ``bert/pooler/dense``,
``cls/predictions/transform/{dense,LayerNorm}``, ``cls/predictions/bias`` and the sequence
classifier's ``classifier``. The decoder is tied to the word embeddings and its bias *is*
``cls.predictions.bias``, as HF ties them (``named_parameters()`` lists each shared tensor once),
so neither appears twice here. The torch buffers ``position_ids`` (``arange``) and
``token_type_ids`` (zeros) are ``batch_stats`` entries of ``bert/embeddings``: breaching's server
sends them with the other buffers; nothing changes them.

The forward is the one breaching's ``HuggingFaceContainer`` runs, ``model(input_ids=...)``: no
attention mask (every token attends to every token), token types from the zero buffer, positions
``0 .. T-1``. ``BertForPreTraining`` adds the pooler and the next-sentence head, whose output
breaching's container drops (it returns ``prediction_logits``). ``BertForSequenceClassification``
classifies the pooled first token; on CoLA breaching hands it the tokenizer's padding mask too,
which it rebuilds from the padding token (see the class). Dropout (embeddings, attention
probabilities, hidden states, the classifier's input) draws from the ``dropout`` RNG stream in
train mode only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_users.models import hf_layers
from fedjax_users.models.stochastic import Dropout
from fedjax_users.models.text import _compute_in, _param_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertArchitecture(hf_layers.Architecture):
    """The fields of ``transformers.BertConfig`` that shape the forward; defaults are ``BertConfig()``'s
    (bert-base-uncased's architecture)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    is_decoder: bool = False
    tie_word_embeddings: bool = True
    # BertForSequenceClassification's head: its classes, and its dropout (None: hidden_dropout_prob).
    num_labels: int = 2
    classifier_dropout: Optional[float] = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "BertArchitecture":
        """The architecture a ``config.json`` describes; ``num_labels`` as ``PretrainedConfig`` sets it.

        A saved config names its classes in ``id2label``; an explicit ``num_labels`` wins over it
        (transformers warns, and keeps ``num_labels``); neither leaves the default of 2.

        Args:
          config: a ``config.json``'s keys (others than the architecture's fields are not read).

        Returns:
          The architecture.

        Example::

            >>> BertArchitecture.from_dict({"id2label": {"0": "no", "1": "maybe", "2": "yes"}}).num_labels
            3
        """
        labels = config.get("id2label")
        if "num_labels" not in config and isinstance(labels, Mapping):
            config = {**config, "num_labels": len(labels)}
        return super().from_dict(config)

    def check(self) -> "BertArchitecture":
        """This architecture, if the port computes it; a ``ValueError`` naming what it lacks otherwise."""
        hf_layers.activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.is_decoder:
            raise ValueError("a BERT decoder (is_decoder=True) is not ported; breaching builds encoders")
        if not self.tie_word_embeddings:
            raise ValueError("an untied BERT decoder (tie_word_embeddings=False) is not ported")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {self.num_labels}")
        return self


class BertEmbeddings(hf_layers.ConfiguredModule):
    """Word + token type (from the zero buffer) + position embeddings, LayerNorm, dropout."""

    # Hugging Face registers position before token type embeddings (breaching's list order,
    # ``fedjax_users.interop.order``).
    torch_children: ClassVar[tuple[str, ...]] = (
        "word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"
    )

    @nn.compact
    def __call__(self, input_ids: Array, train: bool) -> tuple[Array, Array]:
        """The embeddings ``[B, T, E]`` and the word embedding table (for the tied decoder)."""
        cfg, dtypes = self.config, self.dtypes
        length = hf_layers.check_length(input_ids.shape[1], cfg.max_position_embeddings)
        positions = self.variable(
            "batch_stats", "position_ids", lambda: jnp.arange(cfg.max_position_embeddings, dtype=jnp.int32)[None]
        ).value
        token_types = self.variable(
            "batch_stats", "token_type_ids", lambda: jnp.zeros((1, cfg.max_position_embeddings), jnp.int32)
        ).value
        embeddings, table = hf_layers.Embedding(
            cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, cfg.pad_token_id, name="word_embeddings", **dtypes
        )(input_ids)
        position_ids = positions[:, :length]
        token_type_ids = jnp.broadcast_to(jnp.take_along_axis(token_types, position_ids, axis=1), input_ids.shape)
        init = hf_layers.embedding_init(cfg.initializer_range, None)
        embeddings = embeddings + nn.Embed(
            cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="token_type_embeddings", **dtypes
        )(token_type_ids)
        embeddings = embeddings + nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, name="position_embeddings", **dtypes
        )(position_ids)
        embeddings = hf_layers.layer_norm(cfg.layer_norm_eps, "LayerNorm", **dtypes)(embeddings)
        return Dropout(cfg.hidden_dropout_prob, name="dropout")(embeddings, train), table


class BertSelfAttention(hf_layers.ConfiguredModule):
    """``query``, ``key``, ``value`` projections and bidirectional attention over the heads."""


    @nn.compact
    def __call__(self, x: Array, train: bool, key_mask: Optional[Array] = None) -> Array:
        cfg, dtypes = self.config, self.dtypes
        heads = cfg.num_attention_heads
        q, k, v = (
            hf_layers.split_heads(hf_layers.dense(cfg.hidden_size, cfg.initializer_range, name, **dtypes)(x), heads)
            for name in ("query", "key", "value")
        )
        scaling = (cfg.hidden_size // heads) ** -0.5
        attend = hf_layers.Attention(scaling, False, cfg.attention_probs_dropout_prob, name="attend")
        return attend(q, k, v, train, key_mask)


class BertResidualOutput(hf_layers.ConfiguredModule):
    """``BertSelfOutput`` / ``BertOutput``: dense, dropout, LayerNorm of the sum with the residual."""


    @nn.compact
    def __call__(self, x: Array, residual: Array, train: bool) -> Array:
        cfg, dtypes = self.config, self.dtypes
        x = hf_layers.dense(cfg.hidden_size, cfg.initializer_range, "dense", **dtypes)(x)
        x = Dropout(cfg.hidden_dropout_prob, name="dropout")(x, train)
        return hf_layers.layer_norm(cfg.layer_norm_eps, "LayerNorm", **dtypes)(x + residual)


class BertAttention(hf_layers.ConfiguredModule):
    """``BertAttention``: self-attention (``self``) and its output block (``output``)."""


    @nn.compact
    def __call__(self, x: Array, train: bool, key_mask: Optional[Array] = None) -> Array:
        dtypes = self.dtypes
        attended = BertSelfAttention(self.config, name="self", **dtypes)(x, train, key_mask)
        return BertResidualOutput(self.config, name="output", **dtypes)(attended, x, train)


class BertIntermediate(hf_layers.ConfiguredModule):
    """``BertIntermediate``: dense to ``intermediate_size`` and the config's activation."""


    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = hf_layers.dense(
            cfg.intermediate_size, cfg.initializer_range, "dense", **self.dtypes
        )
        return hf_layers.activation(cfg.hidden_act)(dense(x))


class BertLayer(hf_layers.ConfiguredModule):
    """``BertLayer``: attention, then the feed-forward block (``intermediate``, ``output``)."""


    @nn.compact
    def __call__(self, x: Array, train: bool, key_mask: Optional[Array] = None) -> Array:
        dtypes = self.dtypes
        x = BertAttention(self.config, name="attention", **dtypes)(x, train, key_mask)
        hidden = BertIntermediate(self.config, name="intermediate", **dtypes)(x)
        return BertResidualOutput(self.config, name="output", **dtypes)(hidden, x, train)


class BertLayers(hf_layers.ConfiguredModule):
    """The ``layer`` ModuleList: ``num_hidden_layers`` layers named ``0, 1, ...``."""


    @nn.compact
    def __call__(self, x: Array, train: bool, key_mask: Optional[Array] = None) -> Array:
        dtypes = self.dtypes
        for index in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=str(index), **dtypes)(x, train, key_mask)
        return x


class BertEncoder(hf_layers.ConfiguredModule):
    """``BertEncoder``: holds its layers under ``layer``."""


    @nn.compact
    def __call__(self, x: Array, train: bool, key_mask: Optional[Array] = None) -> Array:
        return BertLayers(self.config, name="layer", **self.dtypes)(x, train, key_mask)


class BertModel(hf_layers.ConfiguredModule):
    """``BertModel``: embeddings, encoder and (``add_pooling_layer``) the tanh pooler of the first token."""

    add_pooling_layer: bool = False

    @nn.compact
    def __call__(
        self, input_ids: Array, train: bool, attention_mask: Optional[Array] = None
    ) -> tuple[Array, Optional[Array], Array]:
        """The sequence output ``[B, T, E]``, the pooled output (or ``None``), and the word embedding table.

        ``attention_mask [B, T]`` (true: attended to) hides the keys it marks false; ``None``, as
        ``model(input_ids=...)``, attends everywhere.
        """
        cfg, dtypes = self.config, self.dtypes
        embeddings, table = BertEmbeddings(cfg, name="embeddings", **dtypes)(input_ids, train)
        sequence = BertEncoder(cfg, name="encoder", **dtypes)(embeddings, train, attention_mask)
        pooled = None
        if self.add_pooling_layer:
            pooler = BertPooler(cfg, name="pooler", **dtypes)
            pooled = pooler(sequence)
        return sequence, pooled, table


class BertPooler(hf_layers.ConfiguredModule):
    """``BertPooler``: ``tanh(dense(first token))``."""


    @nn.compact
    def __call__(self, sequence: Array) -> Array:
        cfg = self.config
        dense = hf_layers.dense(cfg.hidden_size, cfg.initializer_range, "dense", **self.dtypes)
        return jnp.tanh(dense(sequence[:, 0]))


class BertPredictionHeadTransform(hf_layers.ConfiguredModule):
    """``BertPredictionHeadTransform``: dense, the config's activation, LayerNorm."""


    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dtypes = self.config, self.dtypes
        x = hf_layers.activation(cfg.hidden_act)(hf_layers.dense(cfg.hidden_size, cfg.initializer_range, "dense", **dtypes)(x))
        return hf_layers.layer_norm(cfg.layer_norm_eps, "LayerNorm", **dtypes)(x)


class BertLMPredictionHead(hf_layers.ConfiguredModule):
    """``BertLMPredictionHead``: the transform, then the decoder tied to the word embeddings, bias ``bias``."""


    @nn.compact
    def __call__(self, sequence: Array, table: Array) -> Array:
        dtypes = self.dtypes
        hidden = BertPredictionHeadTransform(self.config, name="transform", **dtypes)(sequence)
        # HF initialises this bias to zero (_init_weights); it is the decoder's bias too.
        bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,), *_param_dtype(self.param_dtype))
        hidden, table, bias = _compute_in(self.dtype, hidden, table, bias)
        return hidden @ table.T + bias


class BertHeads(hf_layers.ConfiguredModule):
    """``cls``: the masked-LM head ``predictions`` and, with ``next_sentence``, ``seq_relationship``."""

    next_sentence: bool = False

    @nn.compact
    def __call__(self, sequence: Array, pooled: Optional[Array], table: Array) -> tuple[Array, Optional[Array]]:
        dtypes = self.dtypes
        logits = BertLMPredictionHead(self.config, name="predictions", **dtypes)(sequence, table)
        relationship = None
        if self.next_sentence:
            relationship = hf_layers.dense(2, self.config.initializer_range, "seq_relationship", **dtypes)(pooled)
        return logits, relationship


class BertForMaskedLM(hf_layers.ConfiguredModule):
    """``BertForMaskedLM`` as breaching's container runs it: ``input_ids [B, T] -> logits [B, T, vocab]``.

    Follows the package's model contract ``(x, train, mask, momentum)``; there is no BatchNorm, so
    ``mask`` and ``momentum`` are ignored.
    """

    # BertForPreTraining's pooler and next-sentence head.
    pre_training: ClassVar[bool] = False

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Optional[float] = 0.1
    ) -> Array:
        del mask, momentum  # no BatchNorm
        bert = BertModel(self.config.check(), add_pooling_layer=self.pre_training, name="bert", **self.dtypes)
        sequence, pooled, table = bert(x, train)
        logits, _ = BertHeads(self.config, next_sentence=self.pre_training, name="cls", **self.dtypes)(
            sequence, pooled, table
        )
        return logits


class BertForPreTraining(BertForMaskedLM):
    """``BertForPreTraining`` as breaching's container runs it: its ``prediction_logits [B, T, vocab]``.

    The pooler and next-sentence head exist (they are parameters the server sends) but do not
    reach the logits, so their gradients are zero, as in torch.
    """

    pre_training: ClassVar[bool] = True


def padding_mask(input_ids: Array, pad_token_id: Optional[int]) -> Optional[Array]:
    """The ``attention_mask`` a tokenizer padding with ``pad_token_id`` returns: true except at the padding.

    Args:
      input_ids: token ids ``[B, T]``, padded at the end with ``pad_token_id``.
      pad_token_id: the padding token, or ``None`` (nothing is padding: no mask).

    Returns:
      A boolean ``[B, T]``, or ``None`` when ``pad_token_id`` is ``None``.

    Example::

        >>> padding_mask(jnp.array([[101, 7, 102, 0, 0]]), 0).tolist()
        [[True, True, True, False, False]]
    """
    return None if pad_token_id is None else input_ids != pad_token_id


class BertForSequenceClassification(hf_layers.ConfiguredModule):
    """``BertForSequenceClassification`` as breaching runs it on CoLA: ``input_ids [B, T] -> logits [B, num_labels]``.

    ``BertModel`` with its pooler, dropout (``classifier_dropout``, or ``hidden_dropout_prob``
    when unset) and the linear ``classifier``. breaching's users call ``model(**data)`` with the
    whole tokenizer output, so this model gets the tokenizer's ``attention_mask`` and
    ``token_type_ids`` too (``HuggingFaceContainer`` passes them on). Only the ids reach the Flax
    model, so both are rebuilt from them: the mask is false exactly at the padding token
    (:func:`padding_mask` with the config's ``pad_token_id``, ``[PAD]`` = 0 in BERT's tokenizer
    and config), and a single sentence's token types are zeros, the zero buffer's. A sentence
    whose text spells the padding token itself (``"[PAD]"``, which the tokenizer reads as that
    special token but marks attended) is the one input where the rebuilt mask differs.

    Follows the package's model contract ``(x, train, mask, momentum)``; there is no BatchNorm, so
    ``mask`` and ``momentum`` are ignored.
    """

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, mask: Optional[Array] = None, momentum: Optional[float] = 0.1
    ) -> Array:
        del mask, momentum  # no BatchNorm
        cfg, dtypes = self.config.check(), self.dtypes
        bert = BertModel(cfg, add_pooling_layer=True, name="bert", **dtypes)
        _, pooled, _ = bert(x, train, padding_mask(x, cfg.pad_token_id))
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = Dropout(rate, name="dropout")(pooled, train)
        return hf_layers.dense(cfg.num_labels, cfg.initializer_range, "classifier", **dtypes)(pooled)

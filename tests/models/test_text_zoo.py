"""breaching's other text models (transformer1, transformerS, transformer3f, LSTM) against its torch code.

Each test builds the reference with breaching's own ``_construct_text_model`` (via
``parity.reference``); logits, loss and gradients from the reference's weights are checked in
``tests/models/test_text.py``, our weights converted to torch here. The sequence length is the text data configs' (``shape: [32]``); the vocabulary
is small so the tests stay fast (``test_builds_at_breaching_vocabulary`` covers the real one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedjax_users import interop, models
from fedjax_users.models import text
from parity import reference

VOCAB, B, T = 64, 2, 32  # T: breaching's shakespeare/stackoverflow/wikitext sequence length
BREACHING_VOCAB = 50257  # their GPT-2 tokenizer's vocabulary
NEW = ["transformer1", "transformerS", "transformer3f", "LSTM"]
FIXED_POSITIONS = ["transformer1", "transformerS", "transformer3f"]
# Float32 rounding of a forward pass a few layers deep, relative to the largest entry.
RTOL = 2e-5


def _torch_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return reference.text_model(name, VOCAB)


def _tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T))


def _assert_close(actual, expected, what: str, rtol: float = RTOL) -> None:
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def _init(model, seed: int = 0):
    return model.init(jax.random.key(seed), jnp.zeros((1, T), jnp.int32))


@pytest.mark.parametrize("name", NEW)
def test_our_weights_converted_to_torch_give_our_logits(name):
    model = text.get_text_model(name, VOCAB)
    variables = _init(model, seed=3)
    torch_model = _torch_model(name, seed=1)
    before = [p.detach().clone() for p in torch_model.parameters()]
    interop.variables_to_torch(variables, torch_model)
    assert any(not torch.equal(a, b) for a, b in zip(before, torch_model.parameters()))

    tokens = _tokens(seed=5)
    ours = model.apply(variables, jnp.asarray(tokens))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(tokens)).numpy()
    _assert_close(ours, theirs, "logits")
    # And back: the torch model's state is our variables, leaf for leaf.
    again = interop.variables_from_torch(torch_model, variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)


@pytest.mark.parametrize("name", NEW)
def test_parameters_and_buffers_pair_with_torchs_one_to_one(name):
    model = text.get_text_model(name, VOCAB)
    torch_model = _torch_model(name)
    variables = _init(model)
    count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    assert count(variables["params"]) == sum(p.numel() for p in torch_model.parameters())
    assert count(variables.get("batch_stats", {})) == sum(b.numel() for b in torch_model.buffers())


@pytest.mark.parametrize("name", FIXED_POSITIONS)
def test_fixed_positions_are_the_references_buffer_within_float32_rounding(name):
    table = _init(text.get_text_model(name, VOCAB))["batch_stats"]["pos_encoder"]["pe"]
    reference_table = dict(_torch_model(name).named_buffers())["pos_encoder.pe"].numpy()
    assert table.shape == reference_table.shape and table.dtype == jnp.float32
    # torch's float32 exp is not always correctly rounded: where a frequency is one unit in the last
    # place (at most 2**-24 for frequencies <= 1) off, the angle at position p is p units off.
    # Entries lie in [-1, 1], where rounding itself is at most 2**-24.
    positions = np.arange(table.shape[1])[None, :, None]
    assert np.all(np.abs(np.asarray(table) - reference_table) <= 2.0**-24 * (2 + 2 * positions))
    assert np.mean(np.asarray(table) == reference_table) > 0.9


def test_fixed_positions_are_not_trained():
    model = text.get_text_model("transformer1", VOCAB)
    variables = _init(model)
    _, updated = model.apply(variables, jnp.asarray(_tokens()), train=True, mutable=["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, updated["batch_stats"], variables["batch_stats"])


def test_float64_table_holds_the_float32_values():
    """As ``module.double()`` casts torch's float32 table."""
    with jax.enable_x64(True):
        layer = text.SinusoidalPositionalEmbedding(max_len=16, param_dtype=jnp.float64)
        table = layer.init(jax.random.key(0), jnp.zeros((1, 4, 8), jnp.float64))["batch_stats"]["pe"]
        assert table.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(table), text.sinusoidal_table(16, 8))


def test_lstm_sequences_are_independent_and_start_from_zero_state():
    """No state carries over between calls or between the sequences of a batch."""
    model = text.get_text_model("LSTM", VOCAB)
    variables = _init(model)
    tokens = jnp.asarray(_tokens())
    together = model.apply(variables, tokens)
    alone = model.apply(variables, tokens[1:])
    np.testing.assert_allclose(together[1:], alone, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.apply(variables, tokens), together)


def test_lstm_is_causal():
    model = text.get_text_model("LSTM", VOCAB)
    variables = _init(model)
    tokens = _tokens()
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    a, b = model.apply(variables, jnp.asarray(tokens)), model.apply(variables, jnp.asarray(changed))
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    assert not np.allclose(a[:, -1], b[:, -1])


def test_two_layer_untied_lstm_matches_torch():
    """The layer stacking and untied decoder (not used by breaching's ``LSTM``) follow torch too."""
    rnn_model = reference.language_models_module().RNNModel
    torch.manual_seed(0)
    torch_model = reference.zero_state_rnn_class()(rnn_model("LSTM", VOCAB, 12, 16, 2, dropout=0.0))
    model = text.LSTMModel(VOCAB, embed_dim=12, hidden_dim=16, num_layers=2, tie_weights=False)
    variables = interop.variables_from_torch(torch_model, _init(model))
    tokens = _tokens()
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(tokens)).numpy()
    _assert_close(model.apply(variables, jnp.asarray(tokens)), theirs, "logits")


def test_tied_lstm_needs_equal_widths():
    with pytest.raises(ValueError, match="hidden_dim == embed_dim"):
        _init(text.LSTMModel(VOCAB, embed_dim=8, hidden_dim=16))


def test_unknown_positional_embedding_raises():
    with pytest.raises(ValueError, match="positional_embedding"):
        _init(text.TransformerModel(VOCAB, embed_dim=8, num_heads=2, hidden_dim=16, num_layers=1,
                                    positional_embedding="rotary"))


def test_sequence_longer_than_the_fixed_table_raises():
    model = text.TransformerModel(VOCAB, embed_dim=8, num_heads=2, hidden_dim=16, num_layers=1,
                                  positional_embedding="fixed", max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))


@pytest.mark.parametrize("name", NEW)
def test_builds_at_breaching_vocabulary(name):
    model = models.get(name, num_classes=BREACHING_VOCAB, modality="text")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    assert shapes["params"]["encoder"]["embedding"].shape[0] == BREACHING_VOCAB
    out = jax.eval_shape(model.apply, shapes, jnp.zeros((B, T), jnp.int32))
    assert out.shape == (B, T, BREACHING_VOCAB)


def test_zoo_names_are_registered():
    assert set(NEW) <= set(models.names("text"))

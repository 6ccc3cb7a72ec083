"""Flax text models against breaching's torch language models: same weights, same logits and grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedjax_users import interop, losses
from fedjax_users.models import text
from parity import reference

VOCAB, B, T = 50, 3, 8
NAMES = ["linear", "transformer3", "transformer3t"]
# The rest of breaching's text zoo (tests/models/test_text_zoo.py checks the rest of their contract).
ZOO = ["transformer1", "transformerS", "transformer3f", "LSTM"]


def _torch_model(name: str) -> torch.nn.Module:
    """breaching's model, built by its own ``_construct_text_model`` (``LSTM`` in parity's zero-state wrapper)."""
    torch.manual_seed(0)
    return reference.text_model(name, VOCAB)


def _torch_run(model: torch.nn.Module, tokens: np.ndarray) -> tuple[np.ndarray, float, list[torch.Tensor]]:
    """Logits, CausalLoss and parameter gradients, as a breaching user computes them (train mode)."""
    model.train()
    model.zero_grad()
    ids = torch.tensor(tokens)
    logits = model(input_ids=ids)
    loss = reference.losses_module().CausalLoss()(logits, ids)
    loss.backward()
    return logits.detach().numpy(), loss.item(), [p.grad.clone() for p in model.parameters()]


def _jax_run(model, variables, tokens: np.ndarray) -> tuple[np.ndarray, float, dict]:
    ids = jnp.asarray(tokens)
    buffers = {k: v for k, v in variables.items() if k != "params"}  # the fixed positional table

    def mean_loss(p):
        logits = model.apply({"params": p, **buffers}, ids, train=True)
        return jnp.mean(losses.causal_lm_loss(logits, ids)), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(variables["params"])
    return np.asarray(logits), float(loss), grads


def _assert_close(actual, expected, rtol: float, what: str) -> None:
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("name", NAMES + ZOO)
def test_logits_loss_and_gradients_match_torch(name):
    torch_model = _torch_model(name)
    model = text.get_text_model(name, VOCAB)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(B, T))
    variables = interop.variables_from_torch(torch_model, model.init(jax.random.key(0), jnp.asarray(tokens)))

    ref_logits, ref_loss, ref_grads = _torch_run(torch_model, tokens)
    logits, loss, grads = _jax_run(model, variables, tokens)

    assert logits.shape == (B, T, VOCAB)
    _assert_close(logits, ref_logits, 1e-5, "logits")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # The tied models' shared weight is checked here too: torch sums both uses into its .grad.
    expected_grads = interop.grads_from_torch_list(ref_grads, torch_model, variables)
    jax.tree_util.tree_map_with_path(
        lambda path, got, want: _assert_close(got, want, 1e-5, jax.tree_util.keystr(path)), grads, expected_grads
    )


@pytest.mark.parametrize("name", ["linear", "transformer3t"])
def test_tied_models_hold_the_shared_weight_once(name):
    model = text.get_text_model(name, VOCAB)
    params = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    assert set(params["decoder"]) == {"bias"}
    assert params["encoder"]["embedding"].shape[0] == VOCAB
    torch_count = sum(p.numel() for p in _torch_model(name).parameters())
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == torch_count


def test_contract_arguments_are_accepted_and_ignored():
    model = text.get_text_model("transformer3", VOCAB)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, size=(B, T)))
    variables = model.init(jax.random.key(0), tokens)
    plain = model.apply(variables, tokens)
    with_contract = model.apply(variables, tokens, train=True, mask=jnp.array([True, False, True]), momentum=None)
    np.testing.assert_array_equal(plain, with_contract)


def test_sequence_longer_than_positions_raises():
    model = text.TransformerModel(VOCAB, embed_dim=8, num_heads=2, hidden_dim=16, num_layers=1, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="unknown text model"):
        text.get_text_model("transformer2", VOCAB)


@pytest.mark.parametrize("name", NAMES)
def test_registry_constructors_read_num_classes_as_vocab(name):
    built = text.MODELS[name](num_classes=VOCAB, num_channels=3)
    assert built == text.get_text_model(name, VOCAB)
    assert built != text.get_text_model(name, VOCAB + 1)

"""Per-example losses against breaching's torch losses (CrossEntropyLoss, CausalLoss and MLMLoss), and their mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedjax_users import losses
from parity import reference

B, T, V, C = 4, 7, 11, 10


def _data(seed: int, logits_shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=logits_shape).astype(np.float32) * 3.0
    labels = rng.integers(0, num_classes, size=logits_shape[:-1])
    return logits, labels


def _torch_mean_and_grad(loss_fn, logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    leaf = torch.tensor(logits, requires_grad=True)
    value = loss_fn(leaf, torch.tensor(labels))
    value.backward()
    return value.item(), leaf.grad.numpy()


def _jax_mean_and_grad(loss_fn, logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    value, grad = jax.value_and_grad(lambda z: losses.mean_loss(loss_fn(z, jnp.asarray(labels))))(jnp.asarray(logits))
    return float(value), np.asarray(grad)


def test_softmax_cross_entropy_matches_torch_per_example_and_mean():
    logits, labels = _data(0, (B, C), C)
    per_example = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    expected = torch.nn.CrossEntropyLoss(reduction="none")(torch.tensor(logits), torch.tensor(labels))
    assert per_example.shape == (B,)
    np.testing.assert_allclose(per_example, expected.numpy(), rtol=1e-6, atol=1e-6)

    value, grad = _jax_mean_and_grad(losses.softmax_cross_entropy, logits, labels)
    ref_value, ref_grad = _torch_mean_and_grad(torch.nn.CrossEntropyLoss(), logits, labels)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "jit_script"])
def test_causal_lm_loss_mean_matches_causal_loss(scripted):
    causal = reference.losses_module().CausalLoss()
    if scripted:  # breaching scripts its loss in construct_model
        causal = torch.jit.script(causal)
    logits, labels = _data(1, (B, T, V), V)
    value, grad = _jax_mean_and_grad(losses.causal_lm_loss, logits, labels)
    ref_value, ref_grad = _torch_mean_and_grad(causal, logits, labels)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert np.all(grad[:, -1] == 0.0)  # the last position predicts nothing


def test_causal_lm_loss_per_example_is_each_sequence_alone():
    causal = reference.losses_module().CausalLoss()
    logits, labels = _data(2, (B, T, V), V)
    per_example = losses.causal_lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert per_example.shape == (B,)
    expected = [causal(torch.tensor(logits[i : i + 1]), torch.tensor(labels[i : i + 1])).item() for i in range(B)]
    np.testing.assert_allclose(per_example, expected, rtol=1e-6)
    assert len(set(np.round(expected, 4))) == B  # the examples really differ


def test_losses_reject_mismatched_labels():
    with pytest.raises(AssertionError):
        losses.softmax_cross_entropy(jnp.zeros((B, C)), jnp.zeros((B + 1,), jnp.int32))
    with pytest.raises(AssertionError):
        losses.causal_lm_loss(jnp.zeros((B, T, V)), jnp.zeros((B, T - 1), jnp.int32))


def _masked_lm_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = _data(seed, (B, T, V), V)
    rng = np.random.default_rng(seed + 1)
    labels = np.where(rng.random((B, T)) < 0.6, -100, labels)
    labels[0, :] = -100  # a sequence with no counted token
    labels[1, :2] = (3, 5)  # and one with at least two
    return logits, labels


def test_masked_lm_loss_ignores_label_minus_100_as_breachings_mlm_loss():
    """breaching's MLMLoss is CrossEntropyLoss(ignore_index=-100): the mean over the batch's counted tokens."""
    mlm = reference.losses_module().MLMLoss(vocab_size=V)
    logits, labels = _masked_lm_data(3)
    terms = losses.masked_lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert terms.total.shape == terms.count.shape == (B,)
    np.testing.assert_array_equal(terms.count, (labels != -100).sum(axis=1))
    assert terms.total[0] == 0.0
    value, grads = _jax_mean_and_grad(losses.masked_lm_loss, logits, labels)
    ref_value, ref_grads = _torch_mean_and_grad(mlm, logits, labels)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-8)
    assert np.isnan(float(losses.mean_loss(losses.masked_lm_loss(jnp.asarray(logits), jnp.full((B, T), -100)))))


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "causal_lm_loss", "masked_lm_loss"])
def test_masked_mean_loss_is_the_loss_of_the_kept_examples_alone(name):
    """A padded step masks rows out: its loss must be torch's loss of the real rows, whatever the loss normalises by."""
    loss = getattr(losses, name)
    if name == "softmax_cross_entropy":
        logits, labels = _data(5, (B, C), C)
    elif name == "causal_lm_loss":
        logits, labels = _data(5, (B, T, V), V)
    else:
        logits, labels = _masked_lm_data(5)
    keep = np.array([True, False, True, True])
    masked = losses.mean_loss(loss(jnp.asarray(logits), jnp.asarray(labels)), jnp.asarray(keep))
    alone = losses.mean_loss(loss(jnp.asarray(logits[keep]), jnp.asarray(labels[keep])))
    np.testing.assert_allclose(masked, alone, rtol=1e-6)
    # The dropped row changes the unmasked loss, so the mask did something.
    assert abs(float(losses.mean_loss(loss(jnp.asarray(logits), jnp.asarray(labels)))) - float(alone)) > 1e-3


def test_one_masked_lm_example_is_its_own_token_mean():
    """Per-example clipping evaluates one sequence as a batch of one: torch's MLMLoss of that sequence alone."""
    mlm = reference.losses_module().MLMLoss(vocab_size=V)
    logits, labels = _masked_lm_data(6)
    for i in range(1, B):
        one = losses.mean_loss(losses.masked_lm_loss(jnp.asarray(logits[i : i + 1]), jnp.asarray(labels[i : i + 1])))
        expected = mlm(torch.tensor(logits[i : i + 1]), torch.tensor(labels[i : i + 1])).item()
        np.testing.assert_allclose(float(one), expected, rtol=1e-6)

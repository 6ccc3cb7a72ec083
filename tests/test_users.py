"""``local_gradient`` and ``local_update`` against straightforward loops written here, step by step.

The references below follow breaching's user classes line by line (slice, forward, mean loss,
gradient, clip, SGD), so the vectorised core (vmap, scan, masks) must reproduce them exactly.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    TinyBNNet,
    TinyDense,
    assert_trees_close,
    check_noise,
    counting_loss,
    make_data,
    mean_cross_entropy,
    server_payload,
)

import fedjax_users as fu

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "user")
SINGLE = fu.UserConfig.from_yaml(os.path.join(CONFIGS, "local_gradient.yaml"))
MULTI = fu.UserConfig.from_yaml(os.path.join(CONFIGS, "local_updates.yaml"))


def _dp(**kwargs) -> fu.LocalDiffPrivacy:
    return fu.LocalDiffPrivacy(**{"distribution": "gaussian", **kwargs})


def _multi(n=5, k=2, steps=4, lr=0.5, **kwargs) -> fu.UserConfig:
    return MULTI.replace(num_data_points=n, num_data_per_local_update_step=k, num_local_updates=steps,
                         local_learning_rate=lr, **kwargs)


# Configs shared between tests: the config is static in the core's jit, so sharing one means one
# compilation. Metadata flags are on; the tests of hidden metadata turn them off.
SINGLE5 = SINGLE.replace(num_data_points=5, provide_buffers=True, provide_labels=True)
MULTI5 = _multi(5, 2, 4, provide_buffers=True, provide_labels=True)


def _sgd(params, grads, lr):
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)


@functools.partial(jax.jit, static_argnames=("model", "train", "momentum", "loss"))
def _grad(model, params, stats, x, y, train, momentum, loss=mean_cross_entropy):
    """Gradient of the mean loss on exactly this batch, and the stats after the forward pass."""

    def objective(p):
        if stats is None:
            return loss(model.apply({"params": p}, x, train=train), y), None
        if train:
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, momentum=momentum,
                                      mutable=["batch_stats"])
            return loss(logits, y), upd["batch_stats"]
        return loss(model.apply({"params": p, "batch_stats": stats}, x, train=False), y), stats

    grads, new_stats = jax.grad(objective, has_aux=True)(params)
    return grads, new_stats


def _clip(grads, bound):
    """breaching's rule: global norm of the per-leaf norms; n > C -> g * C / (n + 1e-6)."""
    leaves = jax.tree_util.tree_leaves(grads)
    norm = np.linalg.norm([np.linalg.norm(np.ravel(leaf)) for leaf in leaves])
    return grads if not norm > bound else jax.tree_util.tree_map(lambda g: g * (bound / (norm + 1e-6)), grads)


def reference_local_update(model, params, stats, x, y, k, steps, lr, train, clip=0.0):
    """UserMultiStep as a Python loop: data[seen:seen+k], mean loss, SGD, BatchNorm momentum 0.1."""
    seen, n = 0, x.shape[0]
    current = params
    for _ in range(steps):
        xb, yb = x[seen : seen + k], y[seen : seen + k]
        seen = (seen + k) % n
        grads, stats = _grad(model, current, stats, xb, yb, train, 0.1)
        if clip > 0:
            grads = _clip(grads, clip)
        current = _sgd(current, grads, lr)
    return jax.tree_util.tree_map(jnp.subtract, current, params), stats


def _user_stats(model, x):
    """A model's fresh BatchNorm statistics (what a user starts with)."""
    return model.init(jax.random.key(0), x[:1])["batch_stats"]


# ----------------------------------------------------------------------------------------------
# step_slices


def test_step_slices_ragged_example():
    slices = fu.step_slices(5, 2, 4)
    assert slices == [(0, 2), (2, 2), (4, 1), (1, 2)]
    assert [list(range(s, s + n)) for s, n in slices] == [[0, 1], [2, 3], [4], [1, 2]]


@pytest.mark.parametrize("n, k, steps", [(4, 2, 3), (3, 5, 2), (1, 1, 3), (5, 3, 3), (7, 3, 6), (6, 4, 5)])
def test_step_slices_match_python_slicing(n, k, steps):
    data, seen, expected = list(range(n)), 0, []
    for _ in range(steps):
        expected.append(data[seen : seen + k])
        seen = (seen + k) % n
    assert [data[s : s + length] for s, length in fu.step_slices(n, k, steps)] == expected
    assert all(length >= 1 for _, length in fu.step_slices(n, k, steps))


# ----------------------------------------------------------------------------------------------
# local_update against the reference loop


@pytest.mark.parametrize(
    "n, k, steps, buffers",
    [(5, 2, 4, False), (5, 2, 4, True), (3, 5, 2, False), (4, 2, 3, True), (5, 2, 19, False), (5, 2, 18, True)],
    # More than MAX_UNROLLED_STEPS steps run as a lax.scan with masked short steps instead of a loop.
    ids=["ragged-train", "ragged-eval", "longer-than-data-train", "even-eval", "scan-ragged-train",
         "scan-ragged-eval"],
)
def test_local_update_equals_reference_loop(n, k, steps, buffers):
    assert (steps > fu.strategy.cpu.MAX_UNROLLED_STEPS) == (steps > 16)
    model = TinyBNNet()
    x, y = make_data(n, seed=3)
    payload = server_payload(model, x, buffers=buffers)
    cfg = _multi(n, k, steps, provide_buffers=True, provide_labels=True)
    shared, true_data, state = fu.local_update(model, payload, fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0))

    start = payload.batch_stats if buffers else _user_stats(model, x)
    delta, stats = reference_local_update(model, payload.params, start, x, y, k, steps, 0.5, train=not buffers)
    assert_trees_close(shared.gradients, delta, rtol=1e-4, atol=1e-6)
    assert_trees_close(shared.batch_stats, stats, rtol=1e-5)
    assert_trees_close(true_data.batch_stats, stats, rtol=1e-5)
    assert_trees_close(state, stats, rtol=1e-5)
    assert int(stats["bn"]["num_batches_tracked"]) == (1 if buffers else steps)
    if buffers:  # eval mode: the server's buffers come back untouched
        jax.tree_util.tree_map(np.testing.assert_array_equal, shared.batch_stats, payload.batch_stats)
    # The steps did something: one plain gradient step would be a different delta.
    one_step, _ = reference_local_update(model, payload.params, start, x, y, k, 1, 0.5, train=not buffers)
    assert not np.allclose(shared.gradients["fc"]["kernel"], one_step["fc"]["kernel"], atol=1e-4)


def test_local_update_clips_the_batch_gradient_of_each_step():
    model = TinyBNNet()
    x, y = make_data(5, seed=4)
    payload = server_payload(model, x)
    cfg = _multi(5, 2, 4, lr=0.5, local_diff_privacy=_dp(per_example_clipping=0.05))
    shared, _, _ = fu.local_update(model, payload, fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0))
    delta, _ = reference_local_update(model, payload.params, _user_stats(model, x), x, y, 2, 4, 0.5, True, clip=0.05)
    assert_trees_close(shared.gradients, delta, rtol=1e-4, atol=1e-6)
    unclipped, _ = reference_local_update(model, payload.params, _user_stats(model, x), x, y, 2, 4, 0.5, True)
    assert not np.allclose(delta["fc"]["kernel"], unclipped["fc"]["kernel"], atol=1e-4)


def test_local_update_without_batchnorm():
    model = TinyDense()
    x, y = make_data(5, seed=5)
    payload = server_payload(model, x)
    shared, true_data, state = fu.local_update(model, payload, fu.UserData(inputs=x, labels=y), MULTI5,
                                               jax.random.key(0))
    delta, _ = reference_local_update(model, payload.params, None, x, y, 2, 4, 0.5, train=True)
    assert_trees_close(shared.gradients, delta, rtol=1e-4, atol=1e-6)
    # breaching shares the model's (empty) buffer list: an empty tree, not None.
    assert shared.batch_stats == {} and true_data.batch_stats == {} and state == {}


def test_local_update_truncates_to_num_data_points():
    model = TinyBNNet()
    x, y = make_data(7, seed=6)
    payload = server_payload(model, x)
    full, full_true, _ = fu.local_update(model, payload, fu.UserData(inputs=x, labels=y), MULTI5, jax.random.key(0))
    cut, _, _ = fu.local_update(model, payload, fu.UserData(inputs=x[:5], labels=y[:5]), MULTI5, jax.random.key(0))
    assert_trees_close(full.gradients, cut.gradients, rtol=1e-6)
    np.testing.assert_array_equal(full_true.data, x[:5])
    np.testing.assert_array_equal(full_true.labels, y[:5])


def test_local_update_metadata():
    model = TinyBNNet()
    x, _ = make_data(5, seed=7)
    y = np.asarray([2, 0, 1, 2, 0], np.int32)
    assert MULTI5.provide_local_hyperparams
    shared, _, _ = fu.local_update(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), MULTI5,
                                   jax.random.key(0))
    meta = shared.metadata
    assert meta.num_data_points == 5
    np.testing.assert_array_equal(meta.labels, [2, 0, 1, 2, 0])  # the user's order, not sorted
    assert meta.data_key == "inputs"
    hp = meta.local_hyperparams
    assert (hp.lr, hp.steps, hp.data_per_step) == (0.5, 4, 2)
    expected = [[0, 2], [1, 2], [0], [0, 1]]  # sorted labels of [0,1], [2,3], [4], [1,2]
    assert [np.asarray(lab).tolist() for lab in hp.labels] == expected

    hidden = MULTI5.replace(provide_labels=False, provide_local_hyperparams=False, provide_num_data_points=False,
                            provide_buffers=False)
    shared, true_data, _ = fu.local_update(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), hidden,
                                           jax.random.key(0))
    assert shared.metadata.labels is None
    assert shared.metadata.local_hyperparams is None
    assert shared.metadata.num_data_points is None
    assert shared.metadata.data_key == "inputs"
    assert shared.batch_stats is None
    assert int(true_data.batch_stats["bn"]["num_batches_tracked"]) == 4  # kept, only not shared


# ----------------------------------------------------------------------------------------------
# local_gradient: BatchNorm modes


def test_local_gradient_eval_mode():
    model = TinyBNNet()
    x, y = make_data(5, seed=8)
    payload = server_payload(model, x, buffers=True)
    shared, true_data, _ = fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=y), SINGLE5,
                                             jax.random.key(0))
    grads, _ = _grad(model, payload.params, payload.batch_stats, x, y, False, None)
    assert_trees_close(shared.gradients, grads, rtol=1e-5, atol=1e-7)
    assert shared.batch_stats is None and true_data.batch_stats is None
    # Eval mode really used the server's statistics: train mode gives another gradient.
    train_grads, _ = _grad(model, payload.params, payload.batch_stats, x, y, True, None)
    assert not np.allclose(grads["conv"]["kernel"], train_grads["conv"]["kernel"], atol=1e-5)


def test_local_gradient_train_mode_cumulative_stats_persist():
    model = TinyBNNet()
    x1, y1 = make_data(5, seed=9)
    x2, y2 = make_data(5, seed=10)
    x2 = 2.0 * x2 + 1.0  # other statistics than the first query
    payload = server_payload(model, x1)

    first, first_true, state = fu.local_gradient(model, payload, fu.UserData(inputs=x1, labels=y1), SINGLE5,
                                                 jax.random.key(0))
    fresh = _user_stats(model, x1)
    grads, _ = _grad(model, payload.params, fresh, x1, y1, True, None)
    assert_trees_close(first.gradients, grads, rtol=1e-5, atol=1e-7)

    # Batch statistics of each query's data (a momentum-1 pass records them).
    batch1 = _grad(model, payload.params, fresh, x1, y1, True, 1.0)[1]["bn"]
    batch2 = _grad(model, payload.params, fresh, x2, y2, True, 1.0)[1]["bn"]
    # Cumulative average from a fresh layer: the first query's stats are its batch stats.
    assert_trees_close(state["bn"], batch1, rtol=1e-5)
    assert_trees_close(first.batch_stats, state, rtol=1e-6)
    assert_trees_close(first_true.batch_stats, state, rtol=1e-6)

    second, _, state2 = fu.local_gradient(model, payload, fu.UserData(inputs=x2, labels=y2), SINGLE5,
                                          jax.random.key(0), user_state=state)
    assert int(state2["bn"]["num_batches_tracked"]) == 2
    np.testing.assert_allclose(state2["bn"]["mean"], (batch1["mean"] + batch2["mean"]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state2["bn"]["var"], (batch1["var"] + batch2["var"]) / 2, rtol=1e-5)
    assert_trees_close(second.batch_stats, state2, rtol=1e-6)


def test_local_gradient_without_batchnorm():
    model = TinyDense()
    x, y = make_data(5, seed=12)
    payload = server_payload(model, x)
    data = fu.UserData(inputs=x, labels=y)
    shared, true_data, state = fu.local_gradient(model, payload, data, SINGLE5, jax.random.key(0))
    assert_trees_close(shared.gradients, _grad(model, payload.params, None, x, y, True, None)[0], rtol=1e-5, atol=1e-7)
    # Train mode: the model's (empty) buffer list; eval mode: None.
    assert shared.batch_stats == {} and true_data.batch_stats == {} and state == {}


# ----------------------------------------------------------------------------------------------
# local_gradient: per-example clipping


def _per_example_grads(model, params, stats, x, y, train):
    """Each example as its own batch of one, in order (the reference's loop)."""
    grads = []
    for i in range(x.shape[0]):
        g, stats = _grad(model, params, stats, x[i : i + 1], y[i : i + 1], train, None)
        grads.append(g)
    return grads, stats


def _norm(tree):
    return np.linalg.norm([np.linalg.norm(np.ravel(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


def _mean(trees):
    return jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *trees)


@pytest.mark.parametrize("where", ["above", "below", "between"])
def test_local_gradient_per_example_clipping_train_mode(where):
    model = TinyBNNet()
    x, y = make_data(4, seed=13)
    payload = server_payload(model, x)
    fresh = _user_stats(model, x)
    per_example, stats = _per_example_grads(model, payload.params, fresh, x, y, True)
    norms = np.array([_norm(g) for g in per_example])
    assert len(set(np.round(norms, 4))) == 4  # distinct norms, so "between" clips some only
    bound = {"above": 2 * norms.max(), "below": 0.5 * norms.min(), "between": float(np.median(norms))}[where]
    cfg = SINGLE.replace(num_data_points=4, provide_buffers=True, local_diff_privacy=_dp(per_example_clipping=bound))
    shared, _, state = fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0))

    expected = _mean([_clip(g, bound) for g in per_example])
    assert_trees_close(shared.gradients, expected, rtol=1e-4, atol=1e-7)
    if where == "above":
        # Unclipped per-example mean: in train mode this is not the batch gradient.
        batch, _ = _grad(model, payload.params, fresh, x, y, True, None)
        assert not np.allclose(expected["conv"]["kernel"], batch["conv"]["kernel"], atol=1e-5)
    # Running stats: the cumulative average over the four single-example batches, in order.
    assert_trees_close(state, stats, rtol=1e-5)
    assert_trees_close(shared.batch_stats, stats, rtol=1e-5)
    assert int(state["bn"]["num_batches_tracked"]) == 4

    _, _, state2 = fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=y), cfg, jax.random.key(1),
                                     user_state=state)
    _, stats2 = _per_example_grads(model, payload.params, stats, x, y, True)
    assert int(state2["bn"]["num_batches_tracked"]) == 8
    assert_trees_close(state2, stats2, rtol=1e-5)


def test_local_gradient_per_example_clipping_eval_mode():
    model = TinyBNNet()
    x, y = make_data(4, seed=14)
    payload = server_payload(model, x, buffers=True)
    per_example, _ = _per_example_grads(model, payload.params, payload.batch_stats, x, y, False)
    bound = 0.5 * min(_norm(g) for g in per_example)
    cfg = SINGLE.replace(num_data_points=4, provide_buffers=True, local_diff_privacy=_dp(per_example_clipping=bound))
    shared, true_data, _ = fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0))
    assert_trees_close(shared.gradients, _mean([_clip(g, bound) for g in per_example]), rtol=1e-4, atol=1e-7)
    assert shared.batch_stats is None and true_data.batch_stats is None


class NoBias(nn.Module):
    """Linear map without bias: with loss = logit 0 its gradient is the input, norms are exact."""

    @nn.compact
    def __call__(self, x, train=False, mask=None, momentum=0.1):
        return nn.Dense(3, use_bias=False, name="fc")(x)


def _first_logit(logits, labels):
    return logits[:, 0]


@pytest.mark.parametrize("bound, factor", [(5.0, 1.0), (5.5, 1.0), (4.0, 4.0 / (5.0 + 1e-6))],
                         ids=["at-norm", "above", "below"])
def test_clipping_is_strict(bound, factor):
    # Both examples have gradient norm exactly 5 (3-4-5); a bound of exactly 5 must not clip.
    model = NoBias()
    x = np.asarray([[3.0, 4.0], [4.0, 3.0]], np.float32)
    y = np.zeros(2, np.int32)
    payload = server_payload(model, x)
    cfg = SINGLE.replace(num_data_points=2, local_diff_privacy=_dp(per_example_clipping=bound))
    shared, _, _ = fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0),
                                     loss=_first_logit)
    expected = np.zeros((2, 3), np.float32)
    expected[:, 0] = np.float32(3.5) * np.float32(factor)
    if factor == 1.0:
        np.testing.assert_array_equal(shared.gradients["fc"]["kernel"], expected)
    else:
        np.testing.assert_allclose(shared.gradients["fc"]["kernel"], expected, rtol=1e-7)


# ----------------------------------------------------------------------------------------------
# local_gradient: metadata and the recorded data


def test_local_gradient_metadata_sorts_labels():
    model = TinyBNNet()
    x, _ = make_data(5, seed=15)
    y = np.asarray([2, 0, 1, 2, 0], np.int32)
    cfg = SINGLE5
    shared, true_data, _ = fu.local_gradient(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), cfg,
                                             jax.random.key(0))
    np.testing.assert_array_equal(shared.metadata.labels, [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(true_data.labels, [2, 0, 1, 2, 0])
    assert shared.metadata.num_data_points == 5
    assert shared.metadata.local_hyperparams is None

    hidden = cfg.replace(provide_labels=False, provide_num_data_points=False, provide_buffers=False)
    shared, true_data, state = fu.local_gradient(model, server_payload(model, x), fu.UserData(inputs=x, labels=y),
                                                 hidden, jax.random.key(0))
    assert shared.metadata.labels is None and shared.metadata.num_data_points is None
    assert shared.batch_stats is None  # train mode, but buffers not provided
    assert_trees_close(true_data.batch_stats, state, rtol=0)
    assert int(state["bn"]["num_batches_tracked"]) == 1


# Input noise only, so the gradient can be recomputed from the recorded inputs.
NOISY_SINGLE = SINGLE5.replace(local_diff_privacy=_dp(input_noise=0.3))


def _assert_deterministic_per_key(fn, model, payload, data, cfg, key, **kwargs):
    """Same key: bitwise the same result; another key: another result."""
    first, first_true, first_state = fn(model, payload, data, cfg, key, **kwargs)
    again, again_true, again_state = fn(model, payload, data, cfg, key, **kwargs)
    other, _, _ = fn(model, payload, data, cfg, jax.random.fold_in(key, 1), **kwargs)
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.gradients, again.gradients)
    jax.tree_util.tree_map(np.testing.assert_array_equal, first_state, again_state)
    np.testing.assert_array_equal(first_true.data, again_true.data)
    flat = [np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(r.gradients)]) for r in (first, other)]
    assert not np.array_equal(*flat)
    return first, first_true, first_state


def test_true_data_holds_noised_inputs_only_without_clipping():
    model = TinyBNNet()
    x, y = make_data(5, seed=16)
    payload = server_payload(model, x)
    data = fu.UserData(inputs=x, labels=y)
    shared, true_data, state = _assert_deterministic_per_key(fu.local_gradient, model, payload, data, NOISY_SINGLE,
                                                             jax.random.key(0))
    assert not np.allclose(true_data.data, x, atol=1e-3)
    # The gradient and the statistics come from exactly the recorded (noised) inputs.
    grads, stats = _grad(model, payload.params, _user_stats(model, x), true_data.data, y, True, None)
    assert_trees_close(shared.gradients, grads, rtol=1e-5, atol=1e-7)
    assert_trees_close(state, stats, rtol=1e-5)

    clipped = NOISY_SINGLE.replace(local_diff_privacy=_dp(input_noise=0.3, per_example_clipping=1e6))
    shared, true_data, _ = fu.local_gradient(model, payload, data, clipped, jax.random.key(0))
    np.testing.assert_array_equal(true_data.data, x)
    # ... although the gradient was computed on noised inputs.
    clean = _mean(_per_example_grads(model, payload.params, _user_stats(model, x), x, y, True)[0])
    assert not np.allclose(shared.gradients["conv"]["kernel"], clean["conv"]["kernel"], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Noise through the users

WIDE = (16, 16, 2)  # TinyDense(10) on this shape has 5130 gradient entries


@pytest.mark.parametrize("distribution", ["gaussian", "laplacian"])
def test_local_gradient_noise_statistics(distribution):
    model = TinyDense(num_classes=10)
    x, y = make_data(8, shape=WIDE, num_classes=10, seed=17)
    payload = server_payload(model, x)
    dp = fu.LocalDiffPrivacy(gradient_noise=0.05, input_noise=0.2, distribution=distribution)
    cfg = SINGLE.replace(num_data_points=8, local_diff_privacy=dp)
    shared, true_data, _ = _assert_deterministic_per_key(fu.local_gradient, model, payload,
                                                         fu.UserData(inputs=x, labels=y), cfg, jax.random.key(4))
    check_noise(true_data.data - x, distribution, 0.2)
    clean, _ = _grad(model, payload.params, None, true_data.data, y, True, None)
    noise = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(shared.gradients),
                                                             jax.tree_util.tree_leaves(clean))])
    check_noise(noise, distribution, 0.05)


def _zero_loss(logits, labels):
    return 0.0 * logits[:, 0]


def test_local_update_steps_get_independent_gradient_noise():
    # Zero loss: the update is -lr * (sum of the 4 steps' noise); independent steps give std sqrt(4) = 2
    # times the single-step std, one draw reused would give 4 times.
    model = TinyDense(num_classes=10)
    x, y = make_data(2, shape=WIDE, num_classes=10, seed=19)
    cfg = _multi(2, 1, 4, lr=1.0, local_diff_privacy=_dp(gradient_noise=0.1))
    shared, _, _ = _assert_deterministic_per_key(fu.local_update, model, server_payload(model, x),
                                                 fu.UserData(inputs=x, labels=y), cfg, jax.random.key(7),
                                                 loss=_zero_loss)
    total = -np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(shared.gradients)])
    check_noise(total, "gaussian", 0.1 * 2)


def test_local_update_steps_get_independent_input_noise():
    # loss = logit 0: the kernel's first column gets the (noised) input as gradient. One example,
    # 4 steps on it: delta = -(4 x + sum of the 4 steps' input noise).
    model = TinyDense(num_classes=3)
    x, y = make_data(1, shape=(32, 32, 4), seed=20)
    cfg = _multi(1, 1, 4, lr=1.0, local_diff_privacy=_dp(input_noise=0.3))
    shared, _, _ = _assert_deterministic_per_key(fu.local_update, model, server_payload(model, x),
                                                 fu.UserData(inputs=x, labels=y), cfg, jax.random.key(8),
                                                 loss=_first_logit)
    summed_noise = -np.asarray(shared.gradients["fc"]["kernel"][:, 0]) - 4 * np.ravel(x)
    check_noise(summed_noise, "gaussian", 0.3 * 2)
    np.testing.assert_array_equal(shared.gradients["fc"]["kernel"][:, 1:], 0.0)


# ----------------------------------------------------------------------------------------------
# Errors, raised before anything is computed


class TinyText(nn.Module):
    """Token ids -> embedding -> mean over positions -> logits."""

    @nn.compact
    def __call__(self, x, train=False, mask=None, momentum=0.1):
        return nn.Dense(3, name="fc")(jnp.mean(nn.Embed(11, 4, name="embed")(x), axis=1))




USERS = [(fu.local_gradient, SINGLE5), (fu.local_update, MULTI5)]
USER_IDS = ["local_gradient", "local_update"]


@pytest.mark.parametrize("fn, cfg", USERS, ids=USER_IDS)
def test_too_few_examples(fn, cfg):
    model = TinyBNNet()
    x, y = make_data(3)
    loss, calls = counting_loss()
    with pytest.raises(ValueError, match=r"holds 3 examples, fewer than num_data_points=5"):
        fn(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0), loss=loss)
    assert calls == []


@pytest.mark.parametrize("fn, cfg", USERS, ids=USER_IDS)
def test_inputs_and_labels_of_different_lengths(fn, cfg):
    model = TinyBNNet()
    x, y = make_data(6)
    loss, calls = counting_loss()
    with pytest.raises(ValueError, match=r"different lengths: 6 and 5"):
        fn(model, server_payload(model, x), fu.UserData(inputs=x, labels=y[:5]), cfg, jax.random.key(0), loss=loss)
    assert calls == []


@pytest.mark.parametrize("fn, cfg", USERS, ids=USER_IDS)
def test_input_noise_on_token_ids(fn, cfg):
    model = TinyText()
    tokens = np.random.default_rng(0).integers(0, 11, (5, 6)).astype(np.int32)
    y = np.zeros(5, np.int32)
    loss, calls = counting_loss()
    noisy = cfg.replace(local_diff_privacy=_dp(input_noise=0.1))
    with pytest.raises(fu.ConfigError, match="input_noise"):
        fn(model, server_payload(model, tokens), fu.UserData(inputs=tokens, labels=y), noisy, jax.random.key(0),
           loss=loss)
    assert calls == []


def test_token_inputs_work_and_name_their_data_key():
    model = TinyText()
    tokens = np.random.default_rng(0).integers(0, 11, (5, 6)).astype(np.int32)
    y = np.asarray([0, 1, 2, 1, 0], np.int32)
    payload = server_payload(model, tokens)
    shared, true_data, _ = fu.local_update(model, payload, fu.UserData(inputs=tokens, labels=y), MULTI5,
                                           jax.random.key(0))
    assert shared.metadata.data_key == "input_ids"
    np.testing.assert_array_equal(true_data.data, tokens)
    delta, _ = reference_local_update(model, payload.params, None, tokens, y, 2, 4, 0.5, train=True)
    assert_trees_close(shared.gradients, delta, rtol=1e-4, atol=1e-6)


def _drop_fc_bias(payload):
    params = {**payload.params, "fc": {"kernel": payload.params["fc"]["kernel"]}}
    return fu.ServerPayload(params=params, batch_stats=payload.batch_stats)


def _wrong_kernel(payload):
    params = {**payload.params, "fc": {**payload.params["fc"], "kernel": jnp.zeros((5, 3))}}
    return fu.ServerPayload(params=params, batch_stats=payload.batch_stats)


def _extra_entry(payload):
    return fu.ServerPayload(params={**payload.params, "head": {"kernel": jnp.zeros(2)}},
                            batch_stats=payload.batch_stats)


def _wrong_stats(payload):
    stats = {"bn": {**payload.batch_stats["bn"], "var": jnp.ones(7)}}
    return fu.ServerPayload(params=payload.params, batch_stats=stats)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_drop_fc_bias, r"params\['fc'\]\['bias'\] is missing"),
        (_wrong_kernel, r"params\['fc'\]\['kernel'\] has shape \(5, 3\), the model expects \(4, 3\)"),
        (_extra_entry, r"unexpected entry params\['head'\]"),
        (_wrong_stats, r"batch_stats\['bn'\]\['var'\] has shape \(7,\)"),
    ],
)
@pytest.mark.parametrize("fn, cfg", USERS, ids=USER_IDS)
def test_payload_that_does_not_fit_the_model(fn, cfg, damage, message):
    model = TinyBNNet()
    x, y = make_data(5)
    loss, calls = counting_loss()
    payload = damage(server_payload(model, x, buffers=True))
    with pytest.raises(ValueError, match=message):
        fn(model, payload, fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0), loss=loss)
    assert calls == []


def test_payload_must_be_a_server_payload():
    model = TinyBNNet()
    x, y = make_data(1)
    with pytest.raises(TypeError, match="ServerPayload"):
        fu.local_gradient(model, {"params": server_payload(model, x).params}, fu.UserData(inputs=x, labels=y), SINGLE,
                          jax.random.key(0))


def test_local_update_needs_multi_step_keys():
    model = TinyBNNet()
    x, y = make_data(1)
    with pytest.raises(fu.ConfigError, match="num_local_updates"):
        fu.local_update(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), SINGLE, jax.random.key(0))


class TinyDropoutNet(nn.Module):
    """A Dense layer behind torch-style dropout: random in train mode, the identity in eval mode."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None, momentum=0.1):
        from fedjax_users.models.stochastic import Dropout

        return nn.Dense(3, name="fc")(Dropout(0.5)(x.reshape((x.shape[0], -1)), train))


@pytest.mark.parametrize("fn, cfg", [(fu.local_gradient, SINGLE), (fu.local_update, MULTI)], ids=["single", "multi"])
def test_train_mode_dropout_is_refused_before_computing(fn, cfg):
    """Without server buffers the user runs in train mode, where a dropout model would need masks it never draws."""
    model = TinyDropoutNet()
    x, y = make_data(cfg.num_data_points)
    loss, calls = counting_loss()
    with pytest.raises(fu.ConfigError, match="dropout"):
        fn(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0), loss=loss)
    assert calls == []
    # With the server's (empty) buffers the user runs in eval mode, where dropout is the identity.
    sent = fu.ServerPayload(params=server_payload(model, x).params, batch_stats={})
    shared, _, _ = fn(model, sent, fu.UserData(inputs=x, labels=y), cfg, jax.random.key(0))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(shared.gradients))


def test_aggregate_refuses_train_mode_dropout():
    model = TinyDropoutNet()
    cfg = fu.UserConfig.from_yaml(os.path.join(CONFIGS, "multiuser_aggregate.yaml"))
    x, y = make_data(cfg.num_data_points)
    users = fu.UserData(inputs=np.stack([x, x]), labels=np.stack([y, y]))
    with pytest.raises(fu.ConfigError, match="dropout"):
        fu.aggregate(model, server_payload(model, x), users, cfg.replace(user_range=(0, 2)), jax.random.key(0))


# ----------------------------------------------------------------------------------------------
# jit


def _assert_same_outputs(a, b):
    for got, want in zip(a, b):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


@pytest.mark.parametrize("fn, cfg", USERS, ids=USER_IDS)
def test_public_functions_jit(fn, cfg):
    model = TinyBNNet()
    x, y = make_data(cfg.num_data_points, seed=21)
    payload = server_payload(model, x)
    data = fu.UserData(inputs=x, labels=y)
    state = _user_stats(model, x)
    jitted = jax.jit(fn, static_argnums=(0, 3))
    _assert_same_outputs(jitted(model, payload, data, cfg, jax.random.key(1), state),
                         fn(model, payload, data, cfg, jax.random.key(1), state))


def test_cached_initial_stats_hold_no_tracers():
    # Shapes and fresh statistics are cached per (model, input shape); the first request may come
    # under an outer jit, and what it caches must still work eagerly afterwards.
    model = TinyBNNet(num_classes=7)  # a model no other test builds, so the first call is the jitted one
    x = jnp.ones((3, 6, 6, 2))
    under_jit = jax.jit(lambda inputs: fu.users.initial_batch_stats(model, inputs))(x)
    eager = fu.users.initial_batch_stats(model, x)
    for leaf in jax.tree_util.tree_leaves(eager):
        assert not isinstance(leaf, jax.core.Tracer)
    fresh = model.init(jax.random.key(1), x[:1])["batch_stats"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, under_jit, fresh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, eager, fresh)


@pytest.mark.parametrize("user_type", ["local_gradient", "local_update", "multiuser_aggregate"])
def test_compute_is_the_user_the_config_describes(user_type):
    # The one dispatch on the user kind: the same bits as calling that kind's function.
    model = TinyDense()
    x, y = make_data(8, shape=(4, 4, 1), num_classes=3, seed=4)
    cfg = fu.UserConfig(user_type=user_type, num_data_points=4, num_local_updates=2 if user_type != "local_gradient" else 1,
                        num_data_per_local_update_step=2, local_learning_rate=0.1,
                        user_range=(0, 2) if user_type == "multiuser_aggregate" else None)
    payload = server_payload(model, x[:4])
    if cfg.is_aggregate:
        data = fu.UserData(x.reshape((2, 4) + x.shape[1:]), y.reshape(2, 4))
        expected = fu.aggregate(model, payload, data, cfg, jax.random.key(1))[0]
    else:
        data = fu.UserData(x[:4], y[:4])
        expected = {"local_gradient": fu.local_gradient, "local_update": fu.local_update}[user_type](
            model, payload, data, cfg, jax.random.key(1))[0]
    shared, _, _ = fu.compute(model, payload, data, cfg, jax.random.key(1))
    assert cfg.kind is fu.UserKind(user_type)
    assert_trees_close(shared.gradients, expected.gradients, rtol=0, atol=0)
    if not cfg.is_aggregate:
        with pytest.raises(fu.ConfigError, match="follow an aggregate's users"):
            fu.compute(model, payload, data, cfg, jax.random.key(1), progress=lambda done, total: None)

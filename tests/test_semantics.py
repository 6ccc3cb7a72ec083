"""The semantics module as the oracle: every fast path the public functions take equals it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_users as fu
from fedjax_users import semantics, users
from fedjax_users.strategy import clipping
from fedjax_users.losses import softmax_cross_entropy
from conftest import TinyBNNet, assert_trees_close, make_data, server_payload

MODEL = TinyBNNet()
KEY = jax.random.key(7)
DEFENDED = dict(per_example_clipping=0.5, gradient_noise=0.01, input_noise=0.05, distribution="gaussian")


def _single(dp, n=6):
    return fu.UserConfig(user_type="local_gradient", num_data_points=n, local_diff_privacy=dp)


def _multi(steps, per_step, dp, n=5, user_type="local_update", user_range=None):
    return fu.UserConfig(
        user_type=user_type, num_data_points=n, num_local_updates=steps, num_data_per_local_update_step=per_step,
        local_learning_rate=0.3, local_diff_privacy=dp, user_range=user_range,
    )


def _oracle(fn, cfg, payload, x, y, key=KEY):
    stats = users.initial_batch_stats(MODEL, x)
    return fn(MODEL, softmax_cross_entropy, cfg, payload.params, payload.batch_stats, stats, jnp.asarray(x),
              jnp.asarray(y), key)


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("dp", [dict(), DEFENDED, dict(per_example_clipping=0.5)])
def test_local_gradient_equals_the_plain_single_step_user(buffers, dp):
    x, y = make_data(6)
    payload = server_payload(MODEL, x, buffers=buffers)
    cfg = _single(dp)
    shared, true_data, state = fu.local_gradient(MODEL, payload, fu.UserData(inputs=x, labels=y), cfg, KEY)
    expected = _oracle(semantics.single_step_user, cfg, payload, x, y)
    assert_trees_close(shared.gradients, expected.gradients)
    assert_trees_close(state, expected.batch_stats)
    np.testing.assert_allclose(true_data.data, expected.inputs, rtol=1e-6)


def test_chunked_fast_clipping_equals_the_plain_clipped_mean():
    x, y = make_data(6)
    payload = server_payload(MODEL, x)
    cfg = _single(DEFENDED)
    chunked = functools.partial(clipping.clipped_mean_gradient, examples_per_chunk=4)  # chunks of 4 and 2
    fast = _oracle(functools.partial(semantics.single_step_user, clipped_mean=chunked), cfg, payload, x, y)
    plain = _oracle(semantics.single_step_user, cfg, payload, x, y)
    assert_trees_close(fast.gradients, plain.gradients)
    assert_trees_close(fast.batch_stats, plain.batch_stats)


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("steps", [3, fu.strategy.cpu.MAX_UNROLLED_STEPS + 2])  # unrolled, then a masked lax.scan
def test_local_update_equals_the_plain_multi_step_user(buffers, steps):
    x, y = make_data(5)
    payload = server_payload(MODEL, x, buffers=buffers)
    cfg = _multi(steps, 2, DEFENDED)  # 5 points in steps of 2: every third step is short
    shared, _, state = fu.local_update(MODEL, payload, fu.UserData(inputs=x, labels=y), cfg, KEY)
    expected = _oracle(semantics.multi_step_user, cfg, payload, x, y)
    assert_trees_close(shared.gradients, expected.gradients, rtol=1e-4, atol=1e-6)
    assert_trees_close(state, expected.batch_stats, rtol=1e-4, atol=1e-6)


def test_im2col_convolutions_equal_the_plain_multi_step_user():
    x, y = make_data(5)
    payload = server_payload(MODEL, x)
    cfg = _multi(3, 2, DEFENDED)
    fast = _oracle(lambda m, l, c, *args: fu.User(m, c, l)._multi_step(*args, convs_as_matmuls=True), cfg, payload, x, y)
    plain = _oracle(semantics.multi_step_user, cfg, payload, x, y)
    assert_trees_close(fast.gradients, plain.gradients, rtol=1e-4, atol=1e-6)
    assert_trees_close(fast.batch_stats, plain.batch_stats, rtol=1e-4, atol=1e-6)


def test_one_local_step_on_all_data_is_minus_lr_times_the_gradient():
    # The two user kinds agree where breaching's definitions meet: one SGD step over every example.
    x, y = make_data(4)
    payload = server_payload(MODEL, x, buffers=True)
    step = _oracle(semantics.multi_step_user, _multi(1, 4, {}, n=4), payload, x, y)
    grad = _oracle(semantics.single_step_user, _single({}, n=4), payload, x, y)
    assert_trees_close(step.gradients, jax.tree_util.tree_map(lambda g: -0.3 * g, grad.gradients), atol=1e-7)


def _users(num_users, n):
    x, y = make_data(num_users * n)
    return x.reshape((num_users, n) + x.shape[1:]), y.reshape(num_users, n)


@pytest.mark.parametrize(
    "cfg, strategy",
    [
        (_multi(1, 2, dict(gradient_noise=0.01, input_noise=0.05, distribution="gaussian"), n=2,
                user_type="multiuser_aggregate", user_range=(0, 5)), fu.strategy.Strategy()),  # one summed gradient
        (_multi(1, 2, dict(per_example_clipping=0.5), n=2, user_type="multiuser_aggregate", user_range=(0, 5)),
         fu.strategy.Strategy(users_per_chunk=2)),  # clipped users, chunks of 2 (the last one padded)
        (_multi(3, 1, DEFENDED, n=2, user_type="multiuser_aggregate", user_range=(0, 5)),
         fu.strategy.Strategy(per_user_convs=True)),  # im2col convolutions, chunks in one scan
        (_multi(3, 1, DEFENDED, n=2, user_type="multiuser_aggregate", user_range=(0, 5)),
         fu.strategy.Strategy(per_user_convs=False, users_per_chunk=1)),
    ],
)
@pytest.mark.parametrize("buffers", [False, True])
def test_aggregate_equals_the_mean_of_plain_users(cfg, strategy, buffers):
    xs, ys = _users(5, 2)
    payload = server_payload(MODEL, xs[0], buffers=buffers)
    shared, true_data = fu.aggregate(MODEL, payload, fu.UserData(inputs=xs, labels=ys), cfg, KEY, strategy=strategy)
    fresh = users.initial_batch_stats(MODEL, xs[0])
    stats = None if buffers else jax.tree_util.tree_map(lambda s: jnp.broadcast_to(s, (5,) + s.shape), fresh)
    grads, mean_stats = semantics.aggregate_users(
        MODEL, softmax_cross_entropy, cfg, payload.params, payload.batch_stats, stats, jnp.asarray(xs),
        jnp.asarray(ys), KEY,
    )
    assert_trees_close(shared.gradients, grads, rtol=1e-4, atol=1e-6)
    if true_data.batch_stats is not None:
        assert_trees_close(true_data.batch_stats, mean_stats, rtol=1e-4, atol=1e-6)

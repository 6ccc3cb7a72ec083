"""``fedjax_users.user.User``: built once, hashable by its computation, ``run`` pure; and one user's
examples a chunk at a time (``fedjax_users.strategy.examples``) against the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_users as fu
from fedjax_users import semantics
from fedjax_users.losses import SummedLosses, softmax_cross_entropy
from fedjax_users.strategy import chunking, examples
from conftest import TinyBNNet, assert_trees_close, counting_loss, make_data, server_payload

MODEL = TinyBNNet()
KEY = jax.random.key(7)
NOISY = fu.LocalDiffPrivacy(input_noise=0.1, gradient_noise=0.01, distribution="gaussian")


def _single(n=6, **changes):
    return fu.UserConfig(**{**dict(user_type="local_gradient", num_data_points=n), **changes})


def _multi(**changes):
    values = dict(user_type="local_update", num_data_points=4, num_local_updates=2, num_data_per_local_update_step=2,
                  local_learning_rate=0.1)
    return fu.UserConfig(**{**values, **changes})


def test_users_equal_when_only_what_the_server_is_told_differs():
    cfg = _single()
    told = cfg.replace(provide_labels=not cfg.provide_labels, provide_buffers=not cfg.provide_buffers, user_idx=3)
    assert fu.User(MODEL, cfg) == fu.User(MODEL, told)
    assert hash(fu.User(MODEL, cfg)) == hash(fu.User(MODEL, told))
    # An aggregate's devices and chunk of users are not read by one user's run.
    assert fu.User(MODEL, cfg, strategy=fu.strategy.Strategy(users_per_chunk=2)) == fu.User(MODEL, cfg)
    # A single-step user reads no learning rate; a multi-step user does.
    assert fu.User(MODEL, cfg.replace(local_learning_rate=0.5)) == fu.User(MODEL, cfg)
    assert fu.User(MODEL, _multi()) != fu.User(MODEL, _multi(local_learning_rate=0.5))


@pytest.mark.parametrize("changes", [
    dict(local_diff_privacy=NOISY), dict(user_type="local_update", num_local_updates=2,
                                        num_data_per_local_update_step=3, local_learning_rate=0.1),
])
def test_users_differ_when_the_computation_differs(changes):
    assert fu.User(MODEL, _single()) != fu.User(MODEL, _single(**changes))
    assert fu.User(MODEL, _single(), loss=lambda logits, labels: softmax_cross_entropy(logits, labels)) != fu.User(
        MODEL, _single())
    assert fu.User(MODEL, _single(), strategy=fu.strategy.Strategy(examples_per_chunk=2)) != fu.User(MODEL, _single())


def test_equal_users_share_one_compiled_program():
    loss, calls = counting_loss()
    x, y = make_data(6)
    payload = server_payload(MODEL, x, buffers=True)
    args = (payload.params, payload.batch_stats, {}, jnp.asarray(x), jnp.asarray(y), KEY)
    first = fu.User(MODEL, _single(), loss).run(*args)
    traced = len(calls)
    again = fu.User(MODEL, _single(provide_labels=False, user_idx=4), loss).run(*args)
    assert traced > 0 and len(calls) == traced
    assert_trees_close(again.gradients, first.gradients, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [_single(local_diff_privacy=NOISY), _multi(local_diff_privacy=NOISY)])
def test_run_is_the_semantics_and_local_functions_call_it(cfg):
    x, y = make_data(cfg.num_data_points)
    payload = server_payload(MODEL, x)
    stats = fu.users.initial_batch_stats(MODEL, x)
    args = (payload.params, None, stats, jnp.asarray(x), jnp.asarray(y), KEY)
    result = fu.User(MODEL, cfg).run(*args)
    expected = semantics.user(MODEL, softmax_cross_entropy, cfg, *args)
    assert_trees_close(result.gradients, expected.gradients, rtol=1e-4, atol=1e-6)
    assert_trees_close(result.batch_stats, expected.batch_stats, rtol=1e-4, atol=1e-6)
    shared, true_data, _ = fu.compute(MODEL, payload, fu.UserData(x, y), cfg, KEY)
    assert_trees_close(shared.gradients, result.gradients, rtol=0, atol=0)
    np.testing.assert_array_equal(true_data.data, result.inputs)


def test_run_is_differentiable_in_the_inputs():
    x, y = make_data(4)
    payload = server_payload(MODEL, x, buffers=True)
    user = fu.User(MODEL, _single(4))

    def first_entry(inputs):
        return jax.tree_util.tree_leaves(user.run(payload.params, payload.batch_stats, {}, inputs, y, KEY).gradients)[0].sum()

    grad = jax.grad(first_entry)(jnp.asarray(x))
    eps = 1e-2
    bumped = jnp.asarray(x).at[0, 0, 0, 0].add(eps)
    numeric = (first_entry(bumped) - first_entry(jnp.asarray(x))) / eps
    np.testing.assert_allclose(grad[0, 0, 0, 0], numeric, rtol=0.1, atol=1e-3)


def test_run_checked_says_whether_the_result_is_finite():
    x, y = make_data(4)
    payload = server_payload(MODEL, x, buffers=True)
    user = fu.User(MODEL, _single(4))
    args = (payload.params, payload.batch_stats, {}, jnp.asarray(x), jnp.asarray(y), KEY)
    result, finite = user.run_checked(*args)
    assert bool(finite)
    assert_trees_close(result.gradients, user.run(*args).gradients, rtol=0, atol=0)
    _, finite = user.run_checked(*args[:3], args[3].at[0, 0, 0, 0].set(jnp.nan), *args[4:])
    assert not bool(finite)


# ----------------------------------------------------------------------------------------------
# A user's examples a chunk at a time


@pytest.mark.parametrize("chunk", [1, 4, 7])  # one example a chunk; 10 = 4 + 4 + 2 (padded); more than all
def test_chunked_examples_equal_the_whole_batch_in_eval_mode(chunk):
    x, y = make_data(10)
    payload = server_payload(MODEL, x, buffers=True)
    cfg = _single(10, local_diff_privacy=NOISY)
    data = fu.UserData(x, y)
    whole, whole_true, _ = fu.local_gradient(MODEL, payload, data, cfg, KEY)
    chunked, chunked_true, _ = fu.local_gradient(MODEL, payload, data, cfg, KEY,
                                                 strategy=fu.strategy.Strategy(examples_per_chunk=chunk))
    assert_trees_close(chunked.gradients, whole.gradients, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(chunked_true.data, whole_true.data)  # the same noised inputs


def test_chunked_examples_leave_train_mode_alone():
    # Train-mode BatchNorm normalises with the batch's statistics: chunks would change the numbers.
    x, y = make_data(6)
    payload = server_payload(MODEL, x)
    data, cfg = fu.UserData(x, y), _single()
    whole, _, whole_state = fu.local_gradient(MODEL, payload, data, cfg, KEY)
    chunked, _, chunked_state = fu.local_gradient(MODEL, payload, data, cfg, KEY,
                                                  strategy=fu.strategy.Strategy(examples_per_chunk=2))
    assert_trees_close(chunked.gradients, whole.gradients, rtol=0, atol=0)
    assert_trees_close(chunked_state, whole_state, rtol=0, atol=0)


def test_chunked_examples_in_an_aggregate_equal_the_mean_of_plain_users():
    x, y = make_data(15)
    xs, ys = x.reshape((3, 5) + x.shape[1:]), y.reshape(3, 5)
    payload = server_payload(MODEL, x, buffers=True)
    cfg = fu.UserConfig(user_type="multiuser_aggregate", num_data_points=5, user_range=(0, 3), local_diff_privacy=NOISY)
    shared, _ = fu.aggregate(MODEL, payload, fu.UserData(xs, ys), cfg, KEY,
                             strategy=fu.strategy.Strategy(examples_per_chunk=2, users_per_chunk=2))
    grads, _ = semantics.aggregate_users(MODEL, softmax_cross_entropy, cfg, payload.params, payload.batch_stats,
                                         None, jnp.asarray(xs), jnp.asarray(ys), KEY)
    assert_trees_close(shared.gradients, grads, rtol=1e-4, atol=1e-6)


def test_chunked_loss_over_counted_tokens():
    # A loss of summed terms over a count of its own (masked tokens) is the total over the total count.
    def token_loss(logits, labels):
        per_class = softmax_cross_entropy(logits, labels)
        return SummedLosses(total=per_class * (labels + 1), count=(labels + 1).astype(per_class.dtype))

    x, y = make_data(7)
    payload = server_payload(MODEL, x, buffers=True)
    args = (MODEL, token_loss, fu.LocalDiffPrivacy(), payload.params, payload.batch_stats, False, jnp.asarray(x),
            jnp.asarray(y), KEY)
    whole, _ = jax.grad(semantics.single_step_loss, argnums=3, has_aux=True)(*args)
    chunked, _ = jax.grad(examples.chunked_single_step_loss(3), argnums=3, has_aux=True)(*args)
    assert_trees_close(chunked, whole, rtol=1e-5, atol=1e-7)


def test_an_aggregate_chunks_the_examples_of_a_user_that_would_not_fit(monkeypatch):
    x, y = make_data(12)
    xs, ys = x.reshape((2, 6) + x.shape[1:]), y.reshape(2, 6)
    cfg = fu.UserConfig(user_type="multiuser_aggregate", num_data_points=6, user_range=(0, 2))
    data = fu.UserData(xs, ys)
    eval_payload, train_payload = server_payload(MODEL, x, buffers=True), server_payload(MODEL, x)
    assert fu.choose_strategy(MODEL, eval_payload, data, cfg).examples_per_chunk is None  # it fits
    one_user = chunking.user_bytes(*_one_user_sizing(eval_payload, xs, ys, cfg))
    monkeypatch.setattr(chunking, "available_memory_bytes", lambda device=None: one_user)  # a quarter of it left
    chosen = fu.choose_strategy(MODEL, eval_payload, data, cfg).examples_per_chunk
    assert chosen is not None and 1 <= chosen < 6
    assert fu.choose_strategy(MODEL, train_payload, data, cfg).examples_per_chunk is None  # coupled examples
    clipped = cfg.replace(local_diff_privacy=fu.LocalDiffPrivacy(per_example_clipping=1.0))
    assert fu.choose_strategy(MODEL, eval_payload, data, clipped).examples_per_chunk is None  # its own chunks


def _one_user_sizing(payload, xs, ys, cfg):
    user = fu.User(MODEL, cfg)
    fn = lambda shared, *rest: user._apply((*shared, *rest), False)  # noqa: E731
    spec = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # noqa: E731
    keys = jax.eval_shape(lambda: jax.random.split(KEY, 2))
    args = ((payload.params, payload.batch_stats), None, spec(xs), spec(ys), spec(keys))
    return fn, args, None


def test_auto_examples_per_chunk():
    assert examples.auto_examples_per_chunk(1000, 10_000, budget_bytes=20_000) is None
    assert examples.auto_examples_per_chunk(1000, 40_000, budget_bytes=10_000) == 250
    assert examples.auto_examples_per_chunk(3, 10**9, budget_bytes=1) == 1

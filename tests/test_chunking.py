"""Chunked sums over users and the automatic chunk size (``fedjax_users.strategy.chunking``)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TinyBNNet, TinyDense, make_data, server_payload

import fedjax_users as fu
from fedjax_users.strategy import chunking, sharding
from fedjax_users.models import vision


def _user(scale, x, k):
    """A toy user: the update is a pytree of two leaves, the per-user output a pair."""
    return {"a": x * scale, "b": jnp.stack([x, -x])}, (x + 1.0, k)


def _users(num):
    return jnp.arange(1.0, num + 1.0), jnp.arange(num, dtype=jnp.int32)


def _sum_users(fn, shared, users, size, valid=None, chunks_per_step=1, progress=None):
    """The users' summed update and per-user outputs, the way ``aggregate`` runs them on one device:
    a jitted step of ``scan_chunks`` over ``sharding.run_chunk`` of ``vmap_sum(fn)``, looped by ``sum_chunks``."""
    num_users = jax.tree_util.tree_leaves(users)[0].shape[0]
    valid = jnp.ones((num_users,), bool) if valid is None else valid
    size = min(size, num_users)

    @functools.partial(jax.jit, static_argnums=1)
    def step(first, count):
        run_one = lambda chunk: sharding.run_chunk(chunking.vmap_sum(fn), shared, users, valid, chunk, size)  # noqa: E731
        return chunking.scan_chunks(run_one, first, count)

    return chunking.sum_chunks(step, num_users, size, num_users, progress, chunks_per_step)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 50])
def test_chunked_sum_equals_plain_sum_in_user_order(chunk):
    x, k = _users(7)
    # Under an outer jit, as aggregate runs inside a caller's jit: sum_chunks' loop runs at trace time.
    total, (plus_one, ids) = jax.jit(lambda x, k: _sum_users(_user, 2.0, (x, k), chunk))(x, k)
    np.testing.assert_allclose(total["a"], 2.0 * x.sum())
    np.testing.assert_allclose(total["b"], [x.sum(), -x.sum()])
    np.testing.assert_array_equal(ids, np.arange(7))  # the shifted last chunk is put back in order
    np.testing.assert_allclose(plus_one, x + 1.0)


@pytest.mark.parametrize("chunks_per_step", [2, 100])
@pytest.mark.parametrize("with_progress", [False, True])
def test_chunks_scanned_in_one_step_give_the_same_sum(chunks_per_step, with_progress):
    # 25 users in chunks of 2: 13 chunks, the last shifted back; with progress, steps of 2 chunks
    # (a tenth, rounded up), so the last step also runs one chunk past the end, which adds nothing.
    x, k = _users(25)
    calls = []
    progress = (lambda done, total: calls.append((done, total))) if with_progress else None
    total, (plus_one, ids) = _sum_users(_user, 2.0, (x, k), 2, None, chunks_per_step, progress)
    np.testing.assert_allclose(total["a"], 2.0 * x.sum())
    np.testing.assert_allclose(total["b"], [x.sum(), -x.sum()])
    np.testing.assert_array_equal(ids, np.arange(25))
    np.testing.assert_allclose(plus_one, x + 1.0)
    if with_progress:
        assert calls == [(0, 25)] + [(min(25, 4 * i), 25) for i in range(1, 7)] + [(25, 25)]


@pytest.mark.parametrize("chunk", [2, 3, 4])
def test_invalid_users_are_left_out_even_when_not_finite(chunk):
    x, k = _users(7)
    x = x.at[5].set(jnp.inf).at[2].set(jnp.nan)
    valid = jnp.ones(7, bool).at[5].set(False).at[2].set(False)
    total, (_, ids) = _sum_users(_user, 2.0, (x, k), chunk, valid)
    kept = np.asarray(x)[np.asarray(valid)]
    np.testing.assert_allclose(total["a"], 2.0 * kept.sum())
    np.testing.assert_array_equal(ids, np.arange(7))


def test_auto_chunk_follows_the_budget():
    x, k = _users(1)
    one_user = (2.0, x[0], k[0])
    cost = chunking.per_user_bytes(_user, *one_user)
    assert cost > 0
    assert chunking.auto_users_per_chunk(_user, one_user, 1000, budget_bytes=5 * cost) == 5
    assert chunking.auto_users_per_chunk(_user, one_user, 3, budget_bytes=5 * cost) == 3  # capped by the users
    assert chunking.auto_users_per_chunk(_user, one_user, 1000, budget_bytes=1) == 1  # at least one
    # Default budget: a quarter of the free memory, far more than this toy user needs.
    assert chunking.auto_users_per_chunk(_user, one_user, 64) == 64


def test_per_user_cost_grows_with_the_batch():
    model = vision.LeNetZhu(num_classes=3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]

    def user(x):
        return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)))(params), None

    small = chunking.per_user_bytes(user, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
    large_user = (jax.ShapeDtypeStruct((32, 16, 16, 3), jnp.float32),)
    large = chunking.per_user_bytes(user, *large_user)
    assert large > 2 * small
    # On CPU the default budget is the cache-sized cpu.USERS_CHUNK_BYTES, far below a quarter of the RAM.
    assert jax.default_backend() == "cpu"
    assert chunking.auto_users_per_chunk(user, large_user, 10**6) == fu.strategy.cpu.USERS_CHUNK_BYTES // large


def test_available_memory_is_the_devices_free_bytes_or_the_hosts_available_ram():
    class Accelerator:
        def memory_stats(self):
            return {"bytes_limit": 10_000, "bytes_in_use": 2_500}

    assert chunking.available_memory_bytes(Accelerator()) == 7_500
    total_ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < chunking.available_memory_bytes(jax.devices("cpu")[0]) <= total_ram


@pytest.mark.parametrize("num_local_updates", [1, 2], ids=["single_step", "multi_step"])
def test_aggregate_does_not_depend_on_the_chunk(num_local_updates):
    model = vision.LeNetZhu(num_classes=3)
    users, examples = 5, 4
    x = jax.random.normal(jax.random.key(1), (users, examples, 8, 8, 3))
    y = jax.random.randint(jax.random.key(2), (users, examples), 0, 3)
    payload = fu.ServerPayload(params=model.init(jax.random.key(3), x[0, :1])["params"], batch_stats=None)
    cfg = fu.UserConfig.from_dict(
        {
            "user_type": "multiuser_aggregate",
            "user_range": [0, users],
            "num_data_points": examples,
            "num_local_updates": num_local_updates,
            "num_data_per_local_update_step": 2,
            "local_learning_rate": 0.1,
            "local_diff_privacy": {"gradient_noise": 0.01, "input_noise": 0.1, "distribution": "gaussian",
                                   "per_example_clipping": 0.0},
        }
    )
    data = fu.UserData(inputs=x, labels=y)
    results = [
        fu.aggregate(model, payload, data, cfg, jax.random.key(4), strategy=fu.strategy.Strategy(users_per_chunk=chunk))
        for chunk in (1, 2, 5, None)
    ]
    for shared, true_data in results[1:]:
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            (shared.gradients, true_data.data),
            (results[0][0].gradients, results[0][1].data),
        )


@pytest.mark.parametrize(
    "model_name, buffers, distribution",
    [("bn", False, "gaussian"), ("bn", True, "laplacian"), ("dense", False, "laplacian")],
    ids=["batchnorm-train", "batchnorm-eval", "no-batchnorm"],
)
def test_single_step_sum_equals_the_users_alone(model_name, buffers, distribution):
    """Unclipped single-step users are summed as one gradient: it must equal each user's own, noise included."""
    model = TinyBNNet() if model_name == "bn" else TinyDense()
    users, points = 5, 3
    x, y = make_data(users * points, seed=11)
    x, y = x.reshape((users, points) + x.shape[1:]), y.reshape(users, points)
    payload = server_payload(model, x[0], buffers=buffers)
    dp = fu.LocalDiffPrivacy(gradient_noise=0.05, input_noise=0.1, distribution=distribution)
    cfg = fu.UserConfig.from_dict(
        {"user_type": "multiuser_aggregate", "user_range": [0, users], "num_data_points": points,
         "num_local_updates": 1, "provide_buffers": True}
    ).replace(local_diff_privacy=dp)
    key = jax.random.key(12)
    shared, true_data = fu.aggregate(model, payload, fu.UserData(inputs=x, labels=y), cfg, key, strategy=fu.strategy.Strategy(users_per_chunk=2))

    alone_cfg = cfg.replace(user_type="local_gradient", user_range=None)
    keys = jax.random.split(key, users)
    alone = [fu.local_gradient(model, payload, fu.UserData(inputs=x[u], labels=y[u]), alone_cfg, keys[u])
             for u in range(users)]
    mean = jax.tree_util.tree_map(lambda *g: np.mean(np.stack(g), axis=0), *[a[0].gradients for a in alone])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), shared.gradients, mean)
    np.testing.assert_allclose(true_data.data, np.concatenate([a[1].data for a in alone]), rtol=1e-6, atol=1e-6)
    if not buffers:
        states = jax.tree_util.tree_map(lambda *s: np.stack(s), *[a[2] for a in alone])
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                               true_data.user_state, states)

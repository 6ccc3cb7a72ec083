"""``aggregate``: the mean of what each user would share alone, with the silo's metadata."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TinyBNNet, TinyDense, assert_trees_close, check_noise, make_data, server_payload

import fedjax_users as fu

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "user")
AGGREGATE = fu.UserConfig.from_yaml(os.path.join(CONFIGS, "multiuser_aggregate.yaml"))
USERS, POINTS = 5, 5


def _cfg(users=USERS, n=POINTS, steps=1, k=2, lr=0.5, **kwargs) -> fu.UserConfig:
    return AGGREGATE.replace(user_range=(0, users), num_data_points=n, num_local_updates=steps,
                             num_data_per_local_update_step=k, local_learning_rate=lr, **kwargs)


def _users_data(users=USERS, n=POINTS, seed=0, shape=(6, 6, 2), num_classes=3):
    x, y = make_data(users * n, shape=shape, num_classes=num_classes, seed=seed)
    return x.reshape((users, n) + shape), y.reshape(users, n)


def _one_by_one(model, payload, xs, ys, cfg, key, states=None):
    """Each user alone, with the key ``aggregate`` gives it (``jax.random.split(key, num_users)``)."""
    fn = fu.local_update if cfg.is_multi_step else fu.local_gradient
    user_cfg = cfg.replace(user_type="local_update" if cfg.is_multi_step else "local_gradient", user_range=None)
    keys = jax.random.split(key, xs.shape[0])
    return [
        fn(model, payload, fu.UserData(inputs=xs[u], labels=ys[u]), user_cfg, keys[u],
           None if states is None else states[u])
        for u in range(xs.shape[0])
    ]


def _mean(trees):
    return jax.tree_util.tree_map(lambda *leaves: np.mean(np.stack(leaves), axis=0), *jax.device_get(trees))


def _stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *jax.device_get(trees))


def _unstack(tree, n):
    tree = jax.device_get(tree)
    return [jax.tree_util.tree_map(lambda a: a[u], tree) for u in range(n)]


# Noise only where it tests the per-user keys, and input noise only: per-leaf gradient noise is the
# slowest thing to compile, and each user's gradient key comes from the same user key anyway.
INPUT_NOISE = fu.LocalDiffPrivacy(input_noise=0.1, distribution="gaussian")
CLIP = fu.LocalDiffPrivacy(per_example_clipping=0.1)
CASES = {
    # name: (config changes, server buffers, users_per_chunk)
    "single-train-noise-chunk2": (dict(local_diff_privacy=INPUT_NOISE), False, 2),
    "single-eval-clip-chunk3": (dict(local_diff_privacy=CLIP), True, 3),
    "multi-train-noise-chunk2": (dict(steps=3, local_diff_privacy=INPUT_NOISE), False, 2),
    "multi-train-chunk1": (dict(steps=3), False, 1),
    "multi-eval-nochunk": (dict(steps=4, k=3), True, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_aggregate_is_the_mean_of_the_users(case):
    changes, buffers, chunk = CASES[case]
    model = TinyBNNet()
    xs, ys = _users_data(seed=1)
    payload = server_payload(model, xs[0], buffers=buffers)
    cfg = _cfg(provide_buffers=True, provide_labels=True, provide_local_hyperparams=True, **changes)
    key = jax.random.key(3)
    shared, true_data = fu.aggregate(model, payload, fu.UserData(inputs=xs, labels=ys), cfg, key,
                                     strategy=fu.strategy.Strategy(users_per_chunk=chunk))
    alone = _one_by_one(model, payload, xs, ys, cfg, key)

    assert_trees_close(shared.gradients, _mean([s.gradients for s, _, _ in alone]), rtol=1e-4, atol=1e-7)
    # Users differ, so the mean is not any one user's update.
    assert not np.allclose(shared.gradients["fc"]["kernel"], alone[-1][0].gradients["fc"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(true_data.data, np.concatenate([t.data for _, t, _ in alone]), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(true_data.labels, ys.reshape(-1))

    user_buffers = [t.batch_stats for _, t, _ in alone]
    if user_buffers[0] is None:  # single-step users in eval mode share no buffers
        assert shared.batch_stats is None and true_data.batch_stats is None
    else:
        assert_trees_close(shared.batch_stats, _mean(user_buffers), rtol=1e-5)
        assert_trees_close(true_data.batch_stats, shared.batch_stats, rtol=0)
    if buffers:
        assert true_data.user_state is None
    else:
        assert_trees_close(true_data.user_state, _stack([state for _, _, state in alone]), rtol=1e-5)

    meta = shared.metadata
    assert meta.num_data_points == POINTS * USERS
    assert meta.num_users == USERS
    np.testing.assert_array_equal(meta.labels, np.sort(np.asarray(ys).reshape(-1)))
    hp = meta.local_hyperparams
    assert (hp.lr, hp.steps, hp.data_per_step) == (cfg.local_learning_rate, cfg.num_local_updates,
                                                    cfg.num_data_per_local_update_step)
    if cfg.is_multi_step:
        # Every user's per-step label lists, concatenated in user order.
        expected = [lab for s, _, _ in alone for lab in s.metadata.local_hyperparams.labels]
        assert len(hp.labels) == USERS * cfg.num_local_updates
        assert [np.asarray(a).tolist() for a in hp.labels] == [np.asarray(b).tolist() for b in expected]
    else:
        assert hp.labels == []  # single-step users report no per-step labels, as in the reference


@pytest.mark.parametrize("buffers", [True, False], ids=["eval", "train"])
def test_per_user_convs_give_the_same_update(buffers):
    # Steps after the first run their convolutions as im2col matmuls (the CPU default); forcing
    # either form must not change what the users share.
    model = TinyBNNet()
    xs, ys = _users_data(seed=9)
    payload = server_payload(model, xs[0], buffers=buffers)
    cfg = _cfg(steps=3, provide_buffers=True)
    data = fu.UserData(inputs=xs, labels=ys)
    runs = [fu.aggregate(model, payload, data, cfg, jax.random.key(4), strategy=fu.strategy.Strategy(users_per_chunk=USERS, per_user_convs=flag))
            for flag in (True, False)]
    (matmuls, matmul_data), (convs, conv_data) = runs
    assert_trees_close(matmuls.gradients, convs.gradients, rtol=1e-4, atol=1e-7)
    assert_trees_close(matmuls.batch_stats, convs.batch_stats, rtol=1e-5)
    if not buffers:
        assert_trees_close(matmul_data.user_state, conv_data.user_state, rtol=1e-5)


def test_numpy_inputs_come_back_without_a_copy():
    model = TinyDense()
    xs, ys = _users_data(users=3, seed=10)
    xs = np.asarray(xs)
    cfg = _cfg(users=3, steps=2)
    _, true_data = fu.aggregate(model, server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys), cfg,
                                jax.random.key(0))
    assert isinstance(true_data.data, np.ndarray) and np.shares_memory(true_data.data, xs)
    np.testing.assert_array_equal(true_data.data, xs.reshape((-1,) + xs.shape[2:]))
    # Recorded input noise is new data, and comes back as such.
    noisy = cfg.replace(num_local_updates=1, local_diff_privacy=INPUT_NOISE)
    _, true_data = fu.aggregate(model, server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys), noisy,
                                jax.random.key(0))
    assert not np.shares_memory(np.asarray(true_data.data), xs)
    assert not np.allclose(true_data.data, xs.reshape((-1,) + xs.shape[2:]))


def test_users_state_persists_across_queries():
    changes, _, chunk = CASES["single-train-noise-chunk2"]
    model = TinyBNNet()
    xs, ys = _users_data(seed=2)
    payload = server_payload(model, xs[0])
    cfg = _cfg(provide_buffers=True, provide_labels=True, provide_local_hyperparams=True, **changes)
    data = fu.UserData(inputs=xs, labels=ys)
    _, first = fu.aggregate(model, payload, data, cfg, jax.random.key(0), strategy=fu.strategy.Strategy(users_per_chunk=chunk))
    xs2 = 2.0 * xs + 1.0
    shared, second = fu.aggregate(model, payload, fu.UserData(inputs=xs2, labels=ys), cfg, jax.random.key(1),
                                  users_state=first.user_state, strategy=fu.strategy.Strategy(users_per_chunk=chunk))
    np.testing.assert_array_equal(second.user_state["bn"]["num_batches_tracked"], [2] * USERS)
    alone = _one_by_one(model, payload, xs2, ys, cfg, jax.random.key(1), _unstack(first.user_state, USERS))
    assert_trees_close(second.user_state, _stack([state for _, _, state in alone]), rtol=1e-5)
    assert_trees_close(shared.gradients, _mean([s.gradients for s, _, _ in alone]), rtol=1e-4, atol=1e-7)


def test_metadata_hides_what_the_config_hides():
    model = TinyBNNet()
    xs, ys = _users_data(users=2, seed=3)
    cfg = _cfg(users=2, steps=2, provide_num_data_points=False)  # the file's provide_* flags otherwise
    shared, _ = fu.aggregate(model, server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys), cfg,
                             jax.random.key(0))
    meta = shared.metadata
    assert meta.num_data_points is None and meta.labels is None and meta.local_hyperparams is None
    assert meta.num_users == 2
    assert shared.batch_stats is None  # provide_buffers is False in the file


def test_aggregate_without_batchnorm():
    model = TinyDense()
    xs, ys = _users_data(users=3, seed=4)
    payload = server_payload(model, xs[0])
    cfg = _cfg(users=3, steps=2, provide_buffers=True)
    shared, true_data = fu.aggregate(model, payload, fu.UserData(inputs=xs, labels=ys), cfg, jax.random.key(0),
                                     strategy=fu.strategy.Strategy(users_per_chunk=2))
    alone = _one_by_one(model, payload, xs, ys, cfg, jax.random.key(0))
    assert_trees_close(shared.gradients, _mean([s.gradients for s, _, _ in alone]), rtol=1e-4, atol=1e-7)
    # Users in train mode share the model's (empty) buffer list: an empty tree.
    assert shared.batch_stats == {} and true_data.batch_stats == {}


def test_users_get_independent_noise():
    # Every user holds the same data; any difference between their recorded inputs is their own noise.
    model = TinyDense()
    x, y = make_data(2, shape=(32, 32, 2), seed=5)
    users = 4
    xs, ys = np.broadcast_to(x, (users,) + x.shape), np.broadcast_to(y, (users,) + y.shape)
    cfg = _cfg(users=users, n=2, local_diff_privacy=fu.LocalDiffPrivacy(input_noise=0.3, distribution="gaussian"))
    _, true_data = fu.aggregate(model, server_payload(model, x), fu.UserData(inputs=xs, labels=ys), cfg,
                                jax.random.key(6))
    noise = np.asarray(true_data.data).reshape(users, -1) - np.ravel(x)
    for u in range(users):
        check_noise(noise[u], "gaussian", 0.3)
    assert np.all(np.abs(np.corrcoef(noise) - np.eye(users)) < 0.1)


def test_aggregate_jits():
    model = TinyBNNet()
    xs, ys = _users_data(seed=7)
    payload = server_payload(model, xs[0])
    data = fu.UserData(inputs=xs, labels=ys)
    changes, _, chunk = CASES["multi-train-chunk1"]
    cfg = _cfg(provide_buffers=True, provide_labels=True, provide_local_hyperparams=True, **changes)
    jitted = jax.jit(fu.aggregate, static_argnums=(0, 3), static_argnames=("strategy",))
    got = jitted(model, payload, data, cfg, jax.random.key(2), strategy=fu.strategy.Strategy(users_per_chunk=chunk))
    want = fu.aggregate(model, payload, data, cfg, jax.random.key(2), strategy=fu.strategy.Strategy(users_per_chunk=chunk))
    for a, b in zip(got, want):
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), a, b)


# ----------------------------------------------------------------------------------------------
# Errors


def test_user_range_must_match_the_users():
    model = TinyBNNet()
    xs, ys = _users_data(seed=8)
    with pytest.raises(ValueError, match=r"user_range \[0, 4\] names 4 users, users_data holds 5"):
        fu.aggregate(model, server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys), _cfg(users=4),
                     jax.random.key(0))
    with pytest.raises(ValueError, match=r"user_range \[3, 10\] names 7 users, users_data holds 5"):
        fu.aggregate(model, server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys),
                     _cfg().replace(user_range=(3, 10)), jax.random.key(0))


def test_aggregate_data_errors():
    model = TinyBNNet()
    xs, ys = _users_data(seed=9)
    payload = server_payload(model, xs[0])
    with pytest.raises(ValueError, match=r"inputs hold 5 users, labels hold 4"):
        fu.aggregate(model, payload, fu.UserData(inputs=xs, labels=ys[:4]), _cfg(), jax.random.key(0))
    with pytest.raises(ValueError, match=r"holds 5 examples, fewer than num_data_points=6"):
        fu.aggregate(model, payload, fu.UserData(inputs=xs, labels=ys), _cfg(n=6), jax.random.key(0))
    with pytest.raises(ValueError, match=r"different lengths: 5 and 4"):
        fu.aggregate(model, payload, fu.UserData(inputs=xs, labels=ys[:, :4]), _cfg(), jax.random.key(0))
    with pytest.raises(ValueError, match="users_per_chunk must be >= 1"):
        fu.aggregate(model, payload, fu.UserData(inputs=xs, labels=ys), _cfg(), jax.random.key(0),
                     strategy=fu.strategy.Strategy(users_per_chunk=0))
    with pytest.raises(ValueError, match=r"params\['fc'\]\['kernel'\] has shape"):
        bad = fu.ServerPayload(params={**payload.params, "fc": {**payload.params["fc"], "kernel": jnp.zeros((4, 5))}})
        fu.aggregate(model, bad, fu.UserData(inputs=xs, labels=ys), _cfg(), jax.random.key(0))


def test_the_chosen_strategy_is_the_one_aggregate_runs():
    # 5 multi-step users on one device: the chosen chunk decides how often a per-chunk progress
    # fires when the chunks run one per call (per_user_convs off), and per_user_convs what the
    # users' steps run as.
    model = TinyBNNet()
    xs, ys = _users_data(seed=11)
    payload, data, cfg = server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys), _cfg(steps=2)
    one = jax.devices()[:1]
    for chunk, flag, expected in ((2, False, (2, False)), (2, True, (2, True)), (1, True, (1, False)), (9, None, (5, True))):
        chosen = fu.choose_strategy(model, payload, data, cfg, fu.strategy.Strategy(devices=one, users_per_chunk=chunk, per_user_convs=flag))
        assert (chosen.users_per_chunk, chosen.per_user_convs) == expected
        assert chosen.devices == tuple(one)
    chosen = fu.choose_strategy(model, payload, data, cfg, fu.strategy.Strategy(devices=one, per_user_convs=False))
    reports = []
    fu.aggregate(model, payload, data, cfg, jax.random.key(0), strategy=fu.strategy.Strategy(devices=one, per_user_convs=False),
                 progress=lambda done, total: reports.append(done))
    assert len(reports) == -(-USERS // chosen.users_per_chunk) + 1  # before the first chunk, then after each
    # Single-step users never take the matmul path (their kernels are the server's).
    single = fu.choose_strategy(model, payload, data, _cfg(steps=1), fu.strategy.Strategy(devices=one, users_per_chunk=2, per_user_convs=True))
    assert not single.per_user_convs


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_what_an_accelerator_would_run_runs_here_and_computes_the_same(platform, monkeypatch):
    # The choice is made from the platform's name (issue 27): forced here, it is the strategy a GPU
    # or TPU would get, run on this CPU, so that the first accelerator run measures speed only.
    from fedjax_users.strategy import chunking, cpu

    model = TinyBNNet()
    xs, ys = _users_data(seed=11)
    payload, data, cfg = server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys), _cfg(steps=2)
    one = jax.devices()[:1]
    here = fu.choose_strategy(model, payload, data, cfg, fu.strategy.Strategy(devices=one))
    # Off CPU the users' budget is a quarter of the free memory, not cpu.USERS_CHUNK_BYTES: shrink
    # the CPU cap so that the two choices must differ if the platform is not what decides.
    monkeypatch.setattr(cpu, "USERS_CHUNK_BYTES", 1)
    capped = fu.choose_strategy(model, payload, data, cfg, fu.strategy.Strategy(devices=one))
    chunking._BYTES_CACHE.clear()
    away = fu.choose_strategy(model, payload, data, cfg, fu.strategy.Strategy(devices=one), platform=platform)
    assert here.per_user_convs and not away.per_user_convs  # im2col steps: measured on CPU only
    assert capped.users_per_chunk == 1 and away.users_per_chunk == USERS
    ran, _ = fu.aggregate(model, payload, data, cfg, jax.random.key(0), strategy=away)
    plain, _ = fu.aggregate(model, payload, data, cfg, jax.random.key(0), strategy=here)
    assert_trees_close(ran.gradients, plain.gradients, rtol=1e-5, atol=1e-6)


def test_a_strategy_with_bad_values_is_refused_before_computing():
    with pytest.raises(fu.ConfigError, match="users_per_chunk must be >= 1, got 0"):
        fu.strategy.Strategy(users_per_chunk=0)
    with pytest.raises(fu.ConfigError, match="examples_per_chunk must be an integer, got 2.5"):
        fu.strategy.Strategy(examples_per_chunk=2.5)
    with pytest.raises(fu.ConfigError, match="devices must name at least one device"):
        fu.strategy.Strategy(devices=())


def test_a_strategy_must_be_a_strategy():
    model = TinyDense()
    xs, ys = _users_data(seed=12)
    payload = server_payload(model, xs[0])
    with pytest.raises(fu.InputTypeError, match="strategy must be a fedjax_users.strategy.Strategy or None, got dict"):
        fu.aggregate(model, payload, fu.UserData(inputs=xs, labels=ys), _cfg(), jax.random.key(0),
                     strategy={"users_per_chunk": 2})
    with pytest.raises(fu.InputTypeError, match="got int"):
        fu.local_gradient(model, payload, fu.UserData(inputs=xs[0], labels=ys[0]),
                          fu.UserConfig(user_type="local_gradient", num_data_points=2), jax.random.key(0), strategy=3)

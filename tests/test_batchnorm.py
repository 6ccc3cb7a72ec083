"""``BatchNorm`` against PyTorch's formulas, written out in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_users.batchnorm import BatchNorm, batch_moments, fold_batch_stats, map_layers, update_running_stats

EPS = 1e-5
SHAPE = (4, 3, 3, 5)  # NHWC: the statistics run over 4 * 3 * 3 = 36 elements per channel


def _batch(seed, shape=SHAPE):
    return jax.random.normal(jax.random.key(seed), shape) * 2.0 + 0.5


def _variables(shape=SHAPE, seed=1):
    """Non-trivial affine params and running stats, so no formula passes by accident."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    c = shape[-1]
    return {
        "params": {"scale": 1.0 + 0.3 * jax.random.normal(k1, (c,)), "bias": jax.random.normal(k2, (c,))},
        "batch_stats": {
            "mean": jax.random.normal(k3, (c,)),
            "var": 0.5 + jax.random.uniform(k4, (c,)),
            "num_batches_tracked": jnp.asarray(3, jnp.int32),
        },
    }


def _np_moments(x):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return x.mean(0), x.var(0), x.var(0, ddof=1)


def _train(variables, x, mask=None, momentum=0.1):
    return BatchNorm().apply(variables, x, True, mask, momentum, mutable=["batch_stats"])


def test_init_matches_torch():
    v = BatchNorm().init(jax.random.key(0), _batch(0), True)
    np.testing.assert_array_equal(v["params"]["scale"], np.ones(5))
    np.testing.assert_array_equal(v["params"]["bias"], np.zeros(5))
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(5))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(5))
    assert v["batch_stats"]["num_batches_tracked"] == 0
    assert v["batch_stats"]["num_batches_tracked"].dtype == jnp.int32


def test_train_normalises_with_biased_and_tracks_unbiased_var():
    v, x = _variables(), _batch(0)
    out, upd = _train(v, x, momentum=0.1)
    mean, biased, unbiased = _np_moments(x)
    scale, bias = np.asarray(v["params"]["scale"]), np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(out, (np.asarray(x) - mean) / np.sqrt(biased + EPS) * scale + bias, rtol=1e-4, atol=1e-5)
    stats = upd["batch_stats"]
    old = v["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 * np.asarray(old["var"]) + 0.1 * unbiased, rtol=1e-5)
    assert not np.allclose(stats["var"], 0.9 * np.asarray(old["var"]) + 0.1 * biased, rtol=1e-3)
    assert stats["num_batches_tracked"] == 4 and stats["num_batches_tracked"].dtype == jnp.int32


def test_bessel_correction_counts_spatial_positions():
    # A batch of one image: n = 3 * 3 = 9 elements, unbiased = biased * 9 / 8.
    x = _batch(2, (1, 3, 3, 5))
    _, upd = _train(_variables((1, 3, 3, 5)), x, momentum=1.0)
    _, biased, _ = _np_moments(x)
    np.testing.assert_allclose(upd["batch_stats"]["var"], biased * 9 / 8, rtol=1e-5)


def test_batchnorm1d_on_features():
    x = _batch(3, (6, 5))
    v = _variables((6, 5))
    out, upd = _train(v, x, momentum=1.0)
    mean, biased, unbiased = _np_moments(x)
    np.testing.assert_allclose(
        out, (np.asarray(x) - mean) / np.sqrt(biased + EPS) * np.asarray(v["params"]["scale"]) + np.asarray(
            v["params"]["bias"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], unbiased, rtol=1e-5)


def test_momentum_recurrence_over_calls():
    v = _variables()
    mean_ref, var_ref = np.asarray(v["batch_stats"]["mean"]), np.asarray(v["batch_stats"]["var"])
    for seed in range(3):
        _, upd = _train(v, _batch(10 + seed), momentum=0.1)
        v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
        mean, _, unbiased = _np_moments(_batch(10 + seed))
        mean_ref, var_ref = 0.9 * mean_ref + 0.1 * mean, 0.9 * var_ref + 0.1 * unbiased
    np.testing.assert_allclose(v["batch_stats"]["mean"], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v["batch_stats"]["var"], var_ref, rtol=1e-5)
    assert v["batch_stats"]["num_batches_tracked"] == 6


def test_momentum_none_is_the_cumulative_average():
    # From a fresh layer (num_batches_tracked = 0), momentum None gives the plain average of the batches.
    v = BatchNorm().init(jax.random.key(0), _batch(0), True)
    batches = [_batch(20 + s) for s in range(4)]
    for x in batches:
        _, upd = _train(v, x, momentum=None)
        v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    moments = [_np_moments(x) for x in batches]
    np.testing.assert_allclose(v["batch_stats"]["mean"], np.mean([m[0] for m in moments], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v["batch_stats"]["var"], np.mean([m[2] for m in moments], 0), rtol=1e-5)
    assert v["batch_stats"]["num_batches_tracked"] == 4


def test_momentum_none_continues_from_tracked_count():
    # With 3 batches already tracked, the next one weighs 1/4.
    v, x = _variables(), _batch(5)
    _, upd = _train(v, x, momentum=None)
    mean, _, unbiased = _np_moments(x)
    old = v["batch_stats"]
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.75 * np.asarray(old["mean"]) + 0.25 * mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.75 * np.asarray(old["var"]) + 0.25 * unbiased, rtol=1e-5)


def test_eval_uses_running_stats_and_changes_nothing():
    v, x = _variables(), _batch(0)
    out, upd = BatchNorm().apply(v, x, False, mutable=["batch_stats"])
    s, p = v["batch_stats"], v["params"]
    expected = (np.asarray(x) - np.asarray(s["mean"])) / np.sqrt(np.asarray(s["var"]) + EPS) * np.asarray(
        p["scale"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, upd["batch_stats"], s)


def test_train_without_mutable_stats_still_normalises_with_batch_stats():
    v, x = _variables(), _batch(0)
    out = BatchNorm().apply(v, x, True, None, 0.1, mutable=["batch_stats"])[0]
    out_again = BatchNorm().apply({"params": v["params"], "batch_stats": _variables(seed=9)["batch_stats"]}, x, True,
                                  None, 0.1, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(out, out_again, rtol=1e-6)  # train-mode output ignores the running stats


@pytest.mark.parametrize("valid", [[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1]])
def test_mask_restricts_statistics_to_valid_rows(valid):
    x = _batch(4, (6, 3, 3, 5))
    mask = jnp.asarray(valid, bool)
    rows = np.flatnonzero(valid)
    mean, var, count = batch_moments(x, mask)
    ref_mean, ref_biased, _ = _np_moments(x[rows])
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, ref_biased, rtol=1e-5)
    assert count == len(rows) * 9

    v = _variables()
    out_masked, upd_masked = _train(v, x, mask, momentum=0.1)
    out_valid, upd_valid = _train(v, x[rows], momentum=0.1)
    np.testing.assert_allclose(out_masked[rows], out_valid, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           upd_masked["batch_stats"], upd_valid["batch_stats"])
    # The statistics of all rows differ, so the mask did matter.
    assert not np.allclose(_train(v, x, momentum=0.1)[1]["batch_stats"]["var"], upd_valid["batch_stats"]["var"])


def test_update_running_stats_formula():
    stats = {"mean": jnp.asarray([1.0, 2.0]), "var": jnp.asarray([3.0, 4.0]),
             "num_batches_tracked": jnp.asarray(1, jnp.int32)}
    mean, var = jnp.asarray([5.0, 6.0]), jnp.asarray([7.0, 8.0])
    new = update_running_stats(stats, mean, var, 0.25)
    np.testing.assert_allclose(new["mean"], [2.0, 3.0])
    np.testing.assert_allclose(new["var"], [4.0, 5.0])
    assert new["num_batches_tracked"] == 2
    cumulative = update_running_stats(stats, mean, var, None)  # weight 1 / 2
    np.testing.assert_allclose(cumulative["mean"], [3.0, 4.0])
    np.testing.assert_allclose(cumulative["var"], [5.0, 6.0])


def test_map_layers_visits_every_layer():
    layer = {"mean": jnp.zeros(2), "var": jnp.ones(2), "num_batches_tracked": jnp.asarray(0, jnp.int32)}
    tree = {"block": {"bn1": layer, "bn2": layer}, "bn0": layer}
    seen = []
    out = map_layers(lambda s: seen.append(1) or {**s, "mean": s["mean"] + 1}, tree)
    assert len(seen) == 3
    np.testing.assert_array_equal(out["block"]["bn2"]["mean"], [1.0, 1.0])


def test_fold_batch_stats_keeps_a_buffer_outside_batchnorm():
    """breaching's fixed positional table sits in the buffers beside BatchNorm statistics; folding leaves it."""
    layer = {"mean": jnp.zeros(2), "var": jnp.ones(2), "num_batches_tracked": jnp.asarray(0, jnp.int32)}
    table = jnp.arange(6.0).reshape(1, 3, 2)
    per_batch = {"bn": {"mean": jnp.ones((3, 2)), "var": jnp.ones((3, 2)), "num_batches_tracked": jnp.zeros(3)},
                 "pos_encoder": {"pe": jnp.zeros((3, 1, 3, 2))}}
    folded = fold_batch_stats({"bn": layer, "pos_encoder": {"pe": table}}, per_batch, None)
    np.testing.assert_array_equal(folded["pos_encoder"]["pe"], table)
    np.testing.assert_array_equal(folded["bn"]["mean"], [1.0, 1.0])


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_fold_batch_stats_equals_sequential_calls(momentum):
    batches = jnp.stack([_batch(30 + s, (1, 3, 3, 5)) for s in range(5)])
    start = {"bn": _variables()["batch_stats"]}
    params = _variables()["params"]
    # Sequential: PyTorch looping over the batches.
    seq = start["bn"]
    for x in batches:
        _, upd = _train({"params": params, "batch_stats": seq}, x, momentum=momentum)
        seq = upd["batch_stats"]
    # Folded: each batch's statistics recorded with momentum 1, then folded in order.
    per_batch = jax.vmap(lambda x: _train({"params": params, "batch_stats": start["bn"]}, x, momentum=1.0)[1][
        "batch_stats"])(batches)
    folded = fold_batch_stats(start, {"bn": per_batch}, momentum)["bn"]
    np.testing.assert_allclose(folded["mean"], seq["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded["var"], seq["var"], rtol=1e-5)
    assert folded["num_batches_tracked"] == seq["num_batches_tracked"] == 8
    # The order matters for momentum 0.1, and fold respects it.
    if momentum is not None:
        rev = fold_batch_stats(start, {"bn": jax.tree_util.tree_map(lambda a: a[::-1], per_batch)}, momentum)["bn"]
        assert not np.allclose(rev["mean"], seq["mean"], rtol=1e-4)


def test_batchnorm_jits():
    v, x = _variables(), _batch(0)
    fn = jax.jit(lambda v, x: _train(v, x, jnp.asarray([1, 1, 0, 1], bool), None))
    out, upd = fn(v, x)
    ref_out, ref_upd = _train(v, x, jnp.asarray([1, 1, 0, 1], bool), None)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), upd, ref_upd)

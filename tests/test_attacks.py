"""The attack's fast path through lenet_zhu's exact user equals the plain one.

On XLA:CPU ``attacks.invert`` and ``attacks.invert_each`` rewrite the convolutions of the attack's
loop into Eigen's form (``fedjax_users.convolutions``) and batch observations and restarts in one
program. Neither may change what is computed beyond float rounding: the rewritten attack equals
the attack as XLA compiles it unchanged, and each row of a batch equals that observation
attacked alone.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_users import attacks


@pytest.fixture(scope="module")
def digits():
    """Three digits' true updates from a local_gradient user of lenet_zhu, stacked, and the context."""
    images, labels = attacks.digit_images()
    model, params = attacks.example_server()
    update = functools.partial(attacks.shared_update, model, attacks.user_configs()["local_gradient"])
    chosen = [attacks.TRUE_INDEX, attacks.wrong_index(), attacks.TRUE_INDEX + 2]
    observed = [update(jnp.asarray(images[i : i + 1]), (params, jnp.asarray(labels[i : i + 1]))) for i in chosen]
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *observed)
    return update, params, observed, stacked, jnp.asarray(labels[chosen][:, None]), images[:1].shape


def _assert_close(a, b):
    """Equal to float rounding, but for a few pixels where Adam magnifies it.

    Convolutions computed another way (rewritten, or batched) add in another order. Adam's first
    step is about the step size times g / (|g| + 1e-8), so where a pixel's gradient is near zero
    that rounding moves the pixel by up to 4e-4 (7 of 6,144 values after one step when batched,
    the same without the rewrite); everywhere else the two agree to float rounding.
    """
    difference = np.abs(np.asarray(a) - np.asarray(b))
    assert difference.max() < 1e-3 and difference.mean() < 1e-5, (difference.max(), difference.mean())


@pytest.mark.parametrize("config", [
    attacks.AttackConfig(steps=8, restarts=2),
    attacks.AttackConfig(steps=3, restarts=1, objective="euclidean", optimizer="lbfgs", tv_scale=0.0),
], ids=["adam", "lbfgs"])
def test_rewritten_convolutions_give_the_attack_xla_compiles_unchanged(digits, config):
    update, params, _, stacked, labels, shape = digits
    run = functools.partial(attacks._invert_each, update, stacked, (params, labels), config, shape, (None, 0))
    (fast, fast_values), (plain, plain_values) = run(rewrite=True), run(rewrite=False)
    assert fast.shape == (3, config.restarts, *shape)
    _assert_close(fast, plain)
    np.testing.assert_allclose(fast_values, plain_values, rtol=1e-4)
    # The candidates moved from their start: equal results are not two untouched starts.
    start = jax.random.uniform(jax.random.key(config.seed), (config.restarts,) + shape)
    assert float(jnp.abs(fast[0] - start).max()) > 0.01


@pytest.mark.parametrize("cores", [1, 2])
def test_each_row_of_a_batch_equals_that_observation_attacked_alone(digits, monkeypatch, cores):
    # One core: the 3 rows in one program; two: in chunks of 2 (the last filled up) side by side.
    update, params, observed, stacked, labels, shape = digits
    config = attacks.AttackConfig(steps=8, restarts=2)
    monkeypatch.setattr(attacks, "_cores", lambda: cores)
    recs, values = attacks.invert_each(update, stacked, (params, labels), shape, config, context_axes=(None, 0))
    assert recs.shape == (3, *shape) and values.shape == (3,)
    for k in range(3):
        _assert_close(recs[k], attacks.invert(update, observed[k], (params, labels[k]), shape, config))
    # Different digits' updates lead to different reconstructions.
    assert float(jnp.abs(recs[0] - recs[1]).max()) > 0.01 and float(jnp.abs(recs[1] - recs[2]).max()) > 0.01

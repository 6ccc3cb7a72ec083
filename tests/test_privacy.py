"""The clipping rule and the noise samplers of ``fedjax_users.privacy``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_noise

from fedjax_users import privacy


def _tree(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"a": jax.random.normal(k1, (3, 4)), "b": {"c": jax.random.normal(k2, (5,)), "d": jax.random.normal(k3, ())}}


def test_global_norm_is_the_norm_of_all_entries():
    tree = _tree()
    flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])
    np.testing.assert_allclose(privacy.global_norm(tree), np.linalg.norm(flat), rtol=1e-6)
    per_leaf = [np.linalg.norm(np.ravel(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]
    np.testing.assert_allclose(privacy.global_norm(tree), np.linalg.norm(per_leaf), rtol=1e-6)


def test_clip_factor_rule():
    # n > C: C / (n + 1e-6); n <= C: 1, and a norm exactly at the bound is not clipped.
    norms = jnp.asarray([0.5, 2.0, 2.5, 10.0], jnp.float32)
    got = np.asarray(privacy.clip_factor(norms, 2.0))
    np.testing.assert_array_equal(got[:2], [1.0, 1.0])
    np.testing.assert_allclose(got[2:], [2.0 / (2.5 + 1e-6), 2.0 / (10.0 + 1e-6)], rtol=1e-7)
    assert privacy.clip_factor(jnp.float32(1e-3), 1e-3) == 1.0
    # Tiny bound: the epsilon is visible, so a rule without it (C / n) would fail here.
    np.testing.assert_allclose(privacy.clip_factor(jnp.float32(4e-6), 1e-6), 1e-6 / 5e-6, rtol=1e-5)


def test_clip_by_global_norm():
    tree = _tree()
    norm = float(privacy.global_norm(tree))
    clipped = privacy.clip_by_global_norm(tree, norm / 4)
    factor = (norm / 4) / (norm + 1e-6)
    jax.tree_util.tree_map(lambda c, t: np.testing.assert_allclose(c, t * factor, rtol=1e-6), clipped, tree)
    assert float(privacy.global_norm(clipped)) < norm / 4
    # Above the norm: unchanged, bit for bit.
    jax.tree_util.tree_map(np.testing.assert_array_equal, privacy.clip_by_global_norm(tree, norm * 2), tree)


@pytest.mark.parametrize("distribution", ["gaussian", "laplacian"])
@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_sample_distribution(distribution, scale):
    noise = privacy.sample(jax.random.key(7), (4096, 2), jnp.float32, scale, distribution)
    assert noise.shape == (4096, 2) and noise.dtype == jnp.float32
    check_noise(noise, distribution, scale)


def test_sample_unknown_distribution():
    with pytest.raises(ValueError, match="unknown distribution 'uniform'"):
        privacy.sample(jax.random.key(0), (3,), jnp.float32, 1.0, "uniform")


@pytest.mark.parametrize("distribution", ["gaussian", "laplacian"])
def test_add_noise_every_entry_of_every_leaf(distribution):
    tree = {"w": jnp.ones((64, 40)), "b": jnp.ones((64, 40)), "s": jnp.ones((3,), jnp.float16)}
    noised = privacy.add_noise(jax.random.key(3), tree, 0.5, distribution)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), noised) == jax.tree_util.tree_map(
        lambda a: (a.shape, a.dtype), tree
    )
    noise = jax.tree_util.tree_map(jnp.subtract, noised, tree)
    # Leaves of the same shape get independent noise, not one draw repeated.
    assert not np.allclose(noise["w"], noise["b"])
    assert abs(np.corrcoef(np.ravel(noise["w"]), np.ravel(noise["b"]))[0, 1]) < 0.1
    check_noise(np.concatenate([np.ravel(noise["w"]), np.ravel(noise["b"])]), distribution, 0.5)


def test_add_noise_is_deterministic_per_key():
    tree = _tree()
    first = privacy.add_noise(jax.random.key(11), tree, 1.0, "gaussian")
    again = privacy.add_noise(jax.random.key(11), tree, 1.0, "gaussian")
    other = privacy.add_noise(jax.random.key(12), tree, 1.0, "gaussian")
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_compare(np.not_equal, a, b), first, other)


def test_add_noise_zero_scale_is_a_no_op():
    tree = _tree()
    assert privacy.add_noise(jax.random.key(0), tree, 0.0, "laplacian") is tree


def test_privacy_functions_jit():
    tree = _tree()
    clip = jax.jit(privacy.clip_by_global_norm, static_argnums=1)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        clip(tree, 0.5),
        privacy.clip_by_global_norm(tree, 0.5),
    )
    noise = jax.jit(privacy.add_noise, static_argnums=(2, 3))
    # XLA may fuse scale * sample differently, so equal up to rounding.
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        noise(jax.random.key(2), tree, 0.1, "laplacian"),
        privacy.add_noise(jax.random.key(2), tree, 0.1, "laplacian"),
    )

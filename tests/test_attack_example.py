"""The worked attack of ``docs/attacks.md``: a shipped digit inverted through the exact user.

The attack differentiates through ``fu.local_gradient`` / ``fu.local_update`` themselves. With the
user's true update it must reconstruct the digit closer than any other validation digit is to it;
with another image's update (the same attack, a wrong observation) it must not come near.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_users import attacks

# The true reconstruction must beat the best any *other* real digit scores against the image
# (attacks.nearest_other_digit_psnr, 17.8 dB) by this much: such a reconstruction is this image,
# not a look-alike. The wrong observation must stay below that same line.
MARGIN_DB = 3.0


@pytest.fixture(scope="module")
def results():
    return {(r.user, r.observed): r for r in attacks.run_example()}


@pytest.mark.parametrize("user", ["local_gradient", "local_update"])
def test_true_update_reconstructs_the_digit_and_a_wrong_one_does_not(results, user):
    nearest = attacks.nearest_other_digit_psnr()
    true, wrong = results[(user, "true")], results[(user, "wrong")]
    assert true.psnr > nearest + MARGIN_DB, (true.psnr, nearest)
    assert wrong.psnr < nearest, (wrong.psnr, nearest)
    images, labels = attacks.digit_images()
    other = int(np.flatnonzero(labels != labels[attacks.TRUE_INDEX])[0])
    # The labels read off the observed updates are those of the images behind them.
    assert (true.label, wrong.label) == (labels[attacks.TRUE_INDEX], labels[other])
    assert true.reconstruction.shape == images[:1].shape
    assert 0.0 <= true.reconstruction.min() and true.reconstruction.max() <= 1.0  # boxed


def test_cosine_distance():
    a = {"w": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([3.0])}
    assert float(attacks.cosine_distance(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(attacks.cosine_distance(a, {k: -3.0 * v for k, v in a.items()})) == pytest.approx(2.0)
    orthogonal = {"w": jnp.asarray([2.0, -1.0]), "b": jnp.asarray([0.0])}
    assert float(attacks.cosine_distance(a, orthogonal)) == pytest.approx(1.0)


def test_total_variation_and_psnr():
    flat = jnp.full((1, 4, 4, 3), 0.5)
    stripes = jnp.tile(jnp.asarray([0.0, 1.0]), 2)[None, None, :, None] * jnp.ones((1, 4, 1, 3))
    assert float(attacks.total_variation(flat)) == 0.0
    assert float(attacks.total_variation(stripes)) == pytest.approx(1.0)  # every horizontal step is 1
    assert attacks.psnr(flat + 0.1, flat) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)


def test_infer_label_from_a_gradient_and_a_parameter_difference():
    gradient = {"fc": {"0": {"bias": jnp.asarray([0.1, -0.7, 0.2, 0.4])}}}
    assert attacks.infer_label(gradient) == 1
    difference = {"fc": {"0": {"bias": -0.5 * gradient["fc"]["0"]["bias"]}}}
    assert attacks.infer_label(difference, parameter_difference=True) == 1

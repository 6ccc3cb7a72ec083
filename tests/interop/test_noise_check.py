"""The parity check's noise comparison: a fixed first draw, and fresh draws pooled to judge its misses."""

import numpy as np
import pytest
from scipy import stats

from fedjax_users.interop import parity_check
from fedjax_users.interop.parity_check import Errors, compare_noise

N = 20_000


class Draws:
    """``draw(i)`` for ``compare_noise``: ours and theirs from given samplers, recording the draws asked for."""

    def __init__(self, ours, theirs, seed=0):
        self.ours, self.theirs, self.asked = ours, theirs, []
        self.rng = np.random.default_rng(seed)

    def __call__(self, i):
        self.asked.append(i)
        return self.ours(self.rng, i), self.theirs(self.rng, i)


def normal(shift=0.0, scale=1.0, first_shift=None, size=N):
    def sample(rng, i):
        offset = first_shift if (first_shift is not None and i == 0) else shift
        return rng.normal(offset, scale, size)
    return sample


def test_a_matching_first_draw_is_the_only_draw():
    draws = Draws(normal(), normal())
    errors = Errors()
    line = compare_noise(errors, "noise", draws)
    assert draws.asked == [0] and errors.mismatches == [] and "redrawn" not in line


def test_the_first_draw_is_judged_as_before_on_the_same_subsample():
    # A residual larger than KS_SAMPLES is subsampled ours first, theirs second, from one generator
    # seeded 0: the first draw's p-value is the one every committed row was judged on.
    rng = np.random.default_rng(3)
    ours, theirs = rng.normal(size=3 * N), rng.normal(size=2 * N)
    pick = np.random.default_rng(0)
    expected = stats.ks_2samp(ours[pick.choice(ours.size, parity_check.KS_SAMPLES, replace=False)],
                              theirs[pick.choice(theirs.size, parity_check.KS_SAMPLES, replace=False)]).pvalue
    line = compare_noise(Errors(), "noise", lambda i: (ours, theirs))
    assert f"KS p={expected:.2g} (n={parity_check.KS_SAMPLES}/{parity_check.KS_SAMPLES})" in line


def test_an_unlucky_first_draw_of_the_same_distribution_passes_on_fresh_draws():
    draws = Draws(normal(first_shift=0.1), normal())
    errors = Errors()
    line = compare_noise(errors, "noise", draws)
    assert draws.asked == list(range(parity_check.NOISE_RETRY_DRAWS + 1))
    assert errors.mismatches == []
    first_p = float(line.split("KS p=")[1].split(" ")[0])
    assert first_p < parity_check.NOISE_P_VALUE and "pooled" in line


@pytest.mark.parametrize("ours, theirs", [
    (normal(shift=0.1), normal()),  # a biased noise
    (normal(scale=1.2), normal()),  # a wrong scale
    (normal(), lambda rng, i: rng.laplace(0.0, 2 ** -0.5, N)),  # Gaussian for Laplace, same spread
], ids=["shift", "scale", "laplace"])
def test_a_real_difference_still_fails_after_the_redraw(ours, theirs):
    draws = Draws(ours, theirs)
    errors = Errors()
    compare_noise(errors, "noise", draws)
    assert len(draws.asked) == parity_check.NOISE_RETRY_DRAWS + 1
    assert len(errors.mismatches) == 1 and "pooled" in errors.mismatches[0]


def test_a_difference_too_small_for_one_draw_fails_the_pooled_draws():
    # 0.04 standard deviations: one draw of 20,000 a side misses it often; four pooled do not.
    errors = Errors()
    compare_noise(errors, "noise", Draws(normal(shift=0.04, first_shift=0.1), normal()))
    assert errors.mismatches


def test_ks_sample_picks_distinct_entries_and_keeps_small_samples_whole():
    values = np.arange(3 * parity_check.KS_SAMPLES, dtype=float)
    picked = parity_check.ks_sample(values, np.random.default_rng(0))
    assert picked.size == parity_check.KS_SAMPLES == np.unique(picked).size
    assert np.isin(picked, values).all()
    small = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(parity_check.ks_sample(small, np.random.default_rng(0)), small.ravel())

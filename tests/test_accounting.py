"""``fedjax_users.accounting`` against closed forms, and the mechanisms it derives for each user."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from scipy import optimize, stats

import fedjax_users as fu
from fedjax_users import accounting, cli, models
from fedjax_users.data import construct_users, load_case

DELTA = 1e-5


def analytic_gaussian_epsilon(z: float, delta: float) -> float:
    """Balle and Wang (2018): the epsilon at which delta(eps) = Phi(-eps z + 1/(2z)) - e^eps Phi(-eps z - 1/(2z))."""

    def excess(eps):
        return stats.norm.cdf(-eps * z + 1 / (2 * z)) - math.exp(eps) * stats.norm.cdf(-eps * z - 1 / (2 * z)) - delta

    return optimize.brentq(excess, 0.0, 500.0, xtol=1e-12)


def laplace_epsilon(l1_over_b: float, delta: float) -> float:
    """One Laplace release of sensitivity/scale ``r``: delta(eps) = 1 - exp((eps - r)/2), so eps = r + 2 log(1 - delta)."""
    return l1_over_b + 2 * math.log1p(-delta)


def single(clip=1.0, noise=1.0, points=4, distribution="gaussian", **keys):
    return fu.UserConfig(
        user_type="local_gradient", num_data_points=points,
        local_diff_privacy=dict(per_example_clipping=clip, gradient_noise=noise, distribution=distribution), **keys,
    )


def multi(points=4, steps=4, per_step=1, clip=1.0, noise=1.0, distribution="gaussian", **keys):
    return fu.UserConfig(
        user_type="local_update", num_data_points=points, num_local_updates=steps,
        num_data_per_local_update_step=per_step, local_learning_rate=0.1,
        local_diff_privacy=dict(per_example_clipping=clip, gradient_noise=noise, distribution=distribution), **keys,
    )


def silo(users=16, points=4, steps=1, per_step=4, clip=1.0, noise=1.0, distribution="gaussian"):
    return fu.UserConfig(
        user_type="multiuser_aggregate", user_range=(0, users), num_data_points=points, num_local_updates=steps,
        num_data_per_local_update_step=per_step, local_learning_rate=0.1,
        local_diff_privacy=dict(per_example_clipping=clip, gradient_noise=noise, distribution=distribution),
    )


def with_dp(cfg, **changes):
    return cfg.replace(local_diff_privacy=dataclasses.replace(cfg.local_diff_privacy, **changes))


# ----------------------------------------------------------------------------------------------
# The accountant against closed forms


@pytest.mark.parametrize("clip, noise, points", [(1.0, 1.0, 4), (0.5, 0.3, 2), (2.0, 10.0, 1), (1.0, 0.2, 16)])
def test_one_gaussian_release_is_the_analytic_gaussian_mechanism(clip, noise, points):
    g = accounting.guarantee(single(clip, noise, points), DELTA)
    z = noise / (2 * clip / points)
    assert g.noise_multiplier == pytest.approx(z)
    assert g.releases == 1
    assert g.epsilon == pytest.approx(analytic_gaussian_epsilon(z, DELTA), rel=1e-4)


@pytest.mark.parametrize("releases", [4, 25, 100])
def test_t_gaussian_releases_equal_one_of_multiplier_z_over_sqrt_t(releases):
    z = 3.0
    expected = analytic_gaussian_epsilon(z / math.sqrt(releases), DELTA)
    queries = accounting.guarantee(single(1.0, z * 2 / 4, 4), DELTA, num_queries=releases)
    steps = accounting.guarantee(multi(steps=releases, noise=2 * z), DELTA, unit="user")
    for g in (queries, steps):
        assert g.releases == releases
        assert g.epsilon == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("noise, num_params", [(1.0, 10), (0.5, 100), (4.0, 1000)])
def test_one_laplace_release_is_pure_dp_of_l1_sensitivity_over_b(noise, num_params):
    cfg = single(1.0, noise, 4, "laplacian")
    l1 = math.sqrt(num_params) * 2 * 1.0 / 4  # sqrt(d) times the L2 bound 2C/B
    g = accounting.guarantee(cfg, DELTA, num_params=num_params)
    assert g.sensitivity == pytest.approx(l1)
    # The PLD accountant rounds pessimistically to ~0.1% of epsilon.
    assert laplace_epsilon(l1 / noise, DELTA) <= g.epsilon <= laplace_epsilon(l1 / noise, DELTA) * 1.002
    pure = accounting.guarantee(cfg, 1e-12, num_params=num_params)
    assert pure.epsilon == pytest.approx(l1 / noise, rel=2e-3)


def test_composed_laplace_releases_lie_between_one_release_and_basic_composition():
    cfg = single(1.0, 1.0, 4, "laplacian")
    one = accounting.guarantee(cfg, DELTA, num_params=16).epsilon  # pure epsilon 2
    composed = accounting.guarantee(cfg, DELTA, num_queries=50, num_params=16)
    assert composed.releases == 50
    assert 7 * one < composed.epsilon < 50 * one  # advanced composition: ~sqrt(50), well below 50


@pytest.mark.parametrize(
    "cfg, unit",
    [
        (single(1.0, 1.0, 4), "example"),
        (single(1.0, 0.2, 4), "user"),
        (multi(points=5, steps=4, per_step=2, noise=3.0), "example"),
        (silo(users=16, noise=0.5), "example"),
        (single(1.0, 2.0, 4, "laplacian"), "example"),
    ],
)
def test_rdp_is_never_below_pld(cfg, unit):
    for queries in (1, 10):
        g = accounting.guarantee(cfg, DELTA, num_queries=queries, unit=unit, num_params=8)
        assert g.epsilon_rdp >= g.epsilon > 0


@pytest.mark.parametrize(
    "cfg, target, queries, unit, relation",
    [
        (single(1.0, 1.0, 4), 1.0, 1, "example", "replace_one"),
        (single(1.0, 1.0, 4), 4.0, 10, "user", "add_remove"),
        (multi(points=5, steps=4, per_step=2), 2.0, 3, "example", "replace_one"),
        (silo(users=9), 0.5, 1, "example", "replace_one"),
        (single(1.0, 1.0, 4, "laplacian"), 2.0, 5, "example", "replace_one"),
    ],
)
def test_calibrate_inverts_guarantee(cfg, target, queries, unit, relation):
    found = accounting.calibrate(cfg, target, DELTA, queries, unit, relation, num_params=8)
    assert dataclasses.replace(found.local_diff_privacy, gradient_noise=0.0) == dataclasses.replace(
        cfg.local_diff_privacy, gradient_noise=0.0
    )
    sigma = found.local_diff_privacy.gradient_noise

    def eps(noise):
        return accounting.guarantee(with_dp(cfg, gradient_noise=noise), DELTA, queries, unit, relation,
                                    num_params=8).epsilon

    assert target * 0.99 <= eps(sigma) <= target
    # Minimal to the tolerance: a little less noise misses the target.
    assert eps(sigma * (1 - 2e-3)) > target


def test_calibrated_noise_for_one_release_is_the_analytic_gaussian_one():
    target = 1.5
    z = optimize.brentq(lambda z: analytic_gaussian_epsilon(z, DELTA) - target, 0.1, 100.0)
    found = accounting.calibrate(single(1.0, 1.0, 4), target, DELTA)
    assert found.local_diff_privacy.gradient_noise == pytest.approx(z * 2 / 4, rel=2e-3)


# ----------------------------------------------------------------------------------------------
# Mechanisms, as the users compute them


@pytest.mark.parametrize(
    "unit, relation, sensitivity",
    [("example", "replace_one", 2 * 0.5 / 8), ("example", "add_remove", 0.5 / 8),
     ("user", "replace_one", 2 * 0.5), ("user", "add_remove", 0.5)],
)
def test_local_gradient_sensitivity(unit, relation, sensitivity):
    # The mean of B = 8 gradients clipped to C = 0.5, B fixed: 2C/B, C/B; a whole user 2C, C.
    g = accounting.guarantee(single(0.5, 0.3, 8), DELTA, 7, unit, relation)
    assert g.sensitivity == pytest.approx(sensitivity)
    assert g.noise_multiplier == pytest.approx(0.3 / sensitivity)
    assert (g.releases, g.num_queries, g.defence, g.distribution) == (7, 7, "gradient noise", "gaussian")


@pytest.mark.parametrize("unit", ["example", "user"])
def test_an_aggregate_of_single_step_users_gains_sqrt_u(unit):
    users = 25
    one = accounting.guarantee(single(1.0, 0.5, 4), DELTA, unit=unit)
    mean = accounting.guarantee(silo(users=users, points=4, noise=0.5), DELTA, unit=unit)
    assert mean.sensitivity == pytest.approx(one.sensitivity / users)
    assert mean.noise_scale == pytest.approx(0.5 / math.sqrt(users))
    assert mean.noise_multiplier == pytest.approx(math.sqrt(users) * one.noise_multiplier)
    assert mean.epsilon == pytest.approx(analytic_gaussian_epsilon(mean.noise_multiplier, DELTA), rel=1e-4)
    assert mean.epsilon < one.epsilon


def test_an_aggregate_of_multi_step_users_keeps_the_per_user_guarantee():
    mean = accounting.guarantee(silo(users=25, points=4, steps=2, per_step=2, noise=3.0), DELTA)
    one = accounting.guarantee(multi(points=4, steps=2, per_step=2, noise=3.0), DELTA)
    assert (mean.epsilon, mean.sensitivity, mean.releases) == (one.epsilon, one.sensitivity, one.releases)
    assert any("own guarantee" in n for n in mean.notes)


def test_an_aggregate_with_laplace_noise_keeps_the_per_user_guarantee():
    mean = accounting.guarantee(silo(users=25, noise=2.0, distribution="laplacian"), DELTA, num_params=9)
    one = accounting.guarantee(single(1.0, 2.0, 4, "laplacian"), DELTA, num_params=9)
    assert (mean.epsilon, mean.sensitivity) == (one.epsilon, one.sensitivity)


def test_local_update_counts_the_steps_that_hold_the_example_wrapping_slices_included():
    # 5 points, 2 per step, 4 steps: [0,1], [2,3], [4], [1,2]: examples 1 and 2 are in two steps.
    assert fu.step_slices(5, 2, 4) == [(0, 2), (2, 2), (4, 1), (1, 2)]
    g = accounting.guarantee(multi(points=5, steps=4, per_step=2, clip=0.5, noise=2.0), DELTA, num_queries=3)
    assert (g.releases, g.sensitivity) == (6, 2 * 0.5)
    expected = analytic_gaussian_epsilon(2.0 / (2 * 0.5) / math.sqrt(6), DELTA)
    assert g.epsilon == pytest.approx(expected, rel=1e-4)
    # One example, three steps of one: the same example in every step.
    assert accounting.guarantee(multi(points=1, steps=3, per_step=1), DELTA).releases == 3
    # More points than steps take: each example is in one step at most.
    assert accounting.guarantee(multi(points=10, steps=4, per_step=2), DELTA).releases == 1


def test_local_update_clips_the_batch_so_the_batch_size_buys_nothing():
    for per_step in (1, 2, 8):
        g = accounting.guarantee(multi(points=8, steps=1, per_step=per_step, clip=0.5), DELTA)
        assert g.sensitivity == pytest.approx(2 * 0.5)
    # Removing (zeroing) an example bounds the step by C only when it is the step's whole batch.
    removed_alone = accounting.guarantee(multi(points=4, steps=4, per_step=1, clip=0.5), DELTA, relation="add_remove")
    removed_of_two = accounting.guarantee(multi(points=4, steps=2, per_step=2, clip=0.5), DELTA, relation="add_remove")
    assert (removed_alone.sensitivity, removed_of_two.sensitivity) == (0.5, 1.0)


def test_local_update_for_a_user_composes_every_step():
    g = accounting.guarantee(multi(points=5, steps=4, per_step=2, noise=3.0), DELTA, 2, "user")
    assert (g.releases, g.sensitivity) == (8, 2.0)
    zeroed = accounting.guarantee(multi(points=5, steps=4, per_step=2, noise=3.0), DELTA, 2, "user", "add_remove")
    assert (zeroed.releases, zeroed.sensitivity) == (8, 1.0)
    assert zeroed.epsilon == pytest.approx(analytic_gaussian_epsilon(3.0 / math.sqrt(8), DELTA), rel=1e-4)


def test_local_update_mixed_step_sensitivities_take_the_worst_example():
    # add_remove, 5 points, 2 per step, 4 steps: example 4 alone in a step (C), examples 1 and 2
    # in two steps of two (2C each): the latter is worse.
    g = accounting.guarantee(multi(points=5, steps=4, per_step=2, noise=2.0), DELTA, relation="add_remove")
    assert (g.releases, g.sensitivity) == (2, 2.0)


@pytest.mark.parametrize("cfg", [single(0.0, 1.0), multi(clip=0.0, noise=1.0), silo(clip=0.0)])
def test_no_clipping_means_no_guarantee(cfg):
    g = accounting.guarantee(cfg, DELTA)
    assert (g.epsilon, g.epsilon_rdp, g.sensitivity) == (math.inf, math.inf, math.inf)
    assert not g.finite and "no clipping" in g.reason and "unbounded sensitivity" in g.reason
    assert g.summary().startswith("no DP guarantee: no clipping")


@pytest.mark.parametrize("cfg", [single(1.0, 0.0), multi(noise=0.0)])
def test_clipping_without_noise_means_no_guarantee(cfg):
    g = accounting.guarantee(cfg, DELTA)
    assert not g.finite and "no gradient noise" in g.reason


def test_laplace_gradient_noise_needs_the_parameter_count():
    with pytest.raises(ValueError, match="num_params"):
        accounting.guarantee(single(1.0, 1.0, 4, "laplacian"), DELTA)


def test_input_noise_protects_one_examples_input_values_from_the_bounds():
    lo, hi, entries = -1.0, 2.0, 12
    cfg = fu.UserConfig(user_type="local_gradient", num_data_points=4,
                        local_diff_privacy=dict(input_noise=3.0, distribution="gaussian"))
    g = accounting.guarantee(cfg, DELTA, input_bounds=(lo, hi), input_size=entries)
    assert g.defence == "input noise" and "labels unprotected" in g.covers
    assert g.sensitivity == pytest.approx((hi - lo) * math.sqrt(entries))
    assert g.epsilon == pytest.approx(analytic_gaussian_epsilon(3.0 / ((hi - lo) * math.sqrt(entries)), DELTA), rel=1e-4)
    assert any("post-processing" in n for n in g.notes)
    laplace = accounting.guarantee(with_dp(cfg, distribution="laplacian", input_noise=200.0), 1e-12,
                                   input_bounds=(lo, hi), input_size=entries)
    assert laplace.sensitivity == pytest.approx((hi - lo) * entries)
    assert laplace.epsilon == pytest.approx((hi - lo) * entries / 200.0, rel=2e-3)
    # A multi-step user draws fresh input noise at every step that holds the example.
    steps = multi(points=1, steps=3, noise=0.0).replace(local_diff_privacy=cfg.local_diff_privacy)
    assert accounting.guarantee(steps, DELTA, input_bounds=(lo, hi), input_size=entries).releases == 3
    # A whole user's inputs: B examples' entries.
    user = accounting.guarantee(cfg, DELTA, unit="user", input_bounds=(lo, hi), input_size=entries)
    assert user.sensitivity == pytest.approx((hi - lo) * math.sqrt(4 * entries))


def test_input_noise_without_bounds_or_under_add_remove_gives_no_guarantee():
    cfg = fu.UserConfig(user_type="local_gradient", num_data_points=4, local_diff_privacy=dict(input_noise=3.0))
    assert "input_bounds" in accounting.guarantee(cfg, DELTA).reason
    removed = accounting.guarantee(cfg, DELTA, relation="add_remove", input_bounds=(0, 1), input_size=4)
    assert not removed.finite and "presence" in removed.reason


def test_with_both_defences_the_gradient_guarantee_is_reported():
    cfg = with_dp(single(1.0, 1.0, 4), input_noise=0.1)
    auto = accounting.guarantee(cfg, DELTA, input_bounds=(0.0, 1.0), input_size=4)
    assert auto.defence == "gradient noise" and "labels" in auto.covers
    assert auto.epsilon == accounting.guarantee(cfg, DELTA, mechanism="gradient").epsilon
    assert accounting.guarantee(cfg, DELTA, input_bounds=(0.0, 1.0), input_size=4, mechanism="input").defence == "input noise"


def test_what_the_noise_does_not_cover_is_listed():
    assert accounting.guarantee(single(), DELTA).unprotected == ()
    labels = accounting.guarantee(single(provide_labels=True), DELTA)
    assert "labels" in labels.summary() and labels.unprotected[0].startswith("labels")
    steps = accounting.guarantee(multi(provide_local_hyperparams=True), DELTA)
    assert steps.unprotected[0].startswith("step labels")
    train_mode = accounting.guarantee(single(provide_buffers=True), DELTA, server_sends_buffers=False)
    assert train_mode.unprotected[0].startswith("BatchNorm buffers")
    assert accounting.guarantee(single(provide_buffers=True), DELTA, server_sends_buffers=True).unprotected == ()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: accounting.guarantee(single(), 0.0), "delta"),
        (lambda: accounting.guarantee(single(), 1.0), "delta"),
        (lambda: accounting.guarantee(single(), -1e-5), "delta"),
        (lambda: accounting.guarantee(single(), DELTA, num_queries=0), "num_queries"),
        (lambda: accounting.guarantee(single(), DELTA, num_queries=2.5), "num_queries"),
        (lambda: accounting.guarantee(single(), DELTA, unit="batch"), "unit"),
        (lambda: accounting.guarantee(single(), DELTA, relation="swap"), "relation"),
        (lambda: accounting.guarantee(single(), DELTA, mechanism="both"), "mechanism"),
        (lambda: accounting.guarantee(single(), DELTA, num_params=0), "num_params"),
        (lambda: accounting.guarantee(single(), DELTA, input_bounds=(1.0, 0.0)), "input_bounds"),
        (lambda: accounting.guarantee({"user_type": "local_gradient"}, DELTA), "cfg"),
        (lambda: accounting.calibrate(single(), 0.0, DELTA), "target_epsilon"),
        (lambda: accounting.calibrate(single(), math.inf, DELTA), "target_epsilon"),
        (lambda: accounting.calibrate(single(clip=0.0), 1.0, DELTA), "per_example_clipping"),
        (lambda: accounting.calibrate(single(distribution="laplacian"), 1.0, DELTA), "num_params"),
    ],
)
def test_bad_arguments_raise_one_line_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# Sizes from a case, and the command line


def test_data_input_bounds_hold_the_cases_normalised_inputs():
    cfg_case = load_case(None, ["model=lenet_zhu"])
    case = construct_users(cfg_case, jax.random.key(0))
    (lo, hi), size = accounting.data_input_bounds(cfg_case.data)
    inputs = np.asarray(case.data.inputs)
    assert size == inputs[0].size
    assert lo <= inputs.min() and inputs.max() <= hi
    # The digits' background is 0 before normalising: the lower bound is attained.
    assert inputs.min() == pytest.approx(lo, abs=1e-5)
    assert accounting.data_input_bounds({"modality": "text", "shape": [32]}) == (None, None)
    assert accounting.data_input_bounds({"modality": "vision", "shape": [1, 2, 2]}) == ((0.0, 1.0), 4)


def test_model_num_params_counts_from_shapes_alone():
    model = models.get("lenet_zhu", num_classes=10, num_channels=3)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    assert accounting.model_num_params(model, (1, 32, 32, 3)) == accounting.count_params(variables["params"])
    assert accounting.count_params({"a": np.zeros((3, 4)), "b": [np.zeros(5)]}) == 17


DP = ["user.local_diff_privacy.per_example_clipping=1.0", "user.local_diff_privacy.gradient_noise=2.5",
      "user.local_diff_privacy.distribution=gaussian"]


def test_cli_privacy_prints_the_guarantee_for_each_delta_and_query_count(capsys):
    assert cli.main(["privacy", "model=lenet_zhu", *DP, "--delta", "1e-5", "1e-7", "--queries", "1", "10",
                     "--epsilon", "2"]) == 0
    printed = capsys.readouterr().out
    cfg = multi(points=4, steps=4, per_step=1, noise=2.5, provide_local_hyperparams=True)
    for queries in (1, 10):
        row = next(line for line in printed.splitlines() if line.startswith(f"  {queries} "))
        for delta in (1e-5, 1e-7):
            assert f"{accounting.guarantee(cfg, delta, queries).epsilon:.4g}" in row
    noise = accounting.calibrate(cfg, 2.0, 1e-5).local_diff_privacy.gradient_noise
    noise_row = next(line for line in printed.splitlines() if line.startswith("  noise"))
    assert f"{noise:.4g}" in noise_row
    assert "not covered step labels" in printed


def test_cli_privacy_of_an_undefended_case_says_why(capsys):
    assert cli.main(["privacy", "model=lenet_zhu"]) == 0
    printed = capsys.readouterr().out
    assert "guarantee   no DP guarantee: no clipping" in printed
    assert "noise for   none" in printed


def test_cli_privacy_user_mistakes_are_one_line(capsys):
    assert cli.main(["privacy", "user.local_diff_privacy.distribution=uniform"]) == 2
    assert "unknown distribution" in capsys.readouterr().err


def test_cli_run_prints_the_guarantee_of_the_case_it_ran(tmp_path, capsys):
    out = tmp_path / "update.msgpack"
    assert cli.main(["run", "model=lenet_zhu", *DP, "--out", str(out)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("privacy"))
    cfg = multi(points=4, steps=4, per_step=1, noise=2.5, provide_local_hyperparams=True)
    g = accounting.guarantee(cfg, accounting.DEFAULT_DELTA)
    assert f"epsilon {g.epsilon:.4g} at delta 1e-05" in line and "per example, replace_one" in line

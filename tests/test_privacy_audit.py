"""An empirical privacy audit: the real users, run thousands of times, against the accountant.

Two neighbouring datasets differ in one canary example whose gradient hits the clipping bound
in opposite directions on the two (``+x`` and ``-x`` with the model's parameters at zero, so the
clipped gradients are ``C u`` and about ``-C u``): the worst case for replace-one. The real
``fu.local_gradient`` / ``fu.local_update`` are run under ``vmap`` over fresh keys on each, the
outputs are projected on the difference of their means, and a threshold test turns into a lower
bound on epsilon, ``log((1 - delta - FNR) / FPR)`` with Clopper-Pearson upper bounds on both rates.
The direction and threshold are chosen on one half of the draws, the bound is measured on the
other, so the bound is a valid 95% one (2.5% for each rate).

The lower bound must stay below the accounted epsilon (else the accountant, or the user, is
wrong), and within ``FACTOR`` of it for this worst-case canary (else the accountant overstates
epsilon by more than the audit's slack). Monkeypatched users (noise on the sum instead of the
mean, no clipping) must fail the first check: the audit has the power to see those bugs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import fedjax_users as fu
from fedjax_users import accounting, models, privacy

DELTA = 1e-5
# Draws per dataset for choosing the direction and threshold, and as many again for the bound.
DRAWS = 50_000
# Confidence of each Clopper-Pearson bound (two of them: a 95% joint bound).
ALPHA = 0.025
# Accounted / measured epsilon at most this for the worst-case canary. 50,000 test draws resolve
# false-positive rates of order 1e-3 only, far from the tails that set epsilon at delta 1e-5, so
# even an exact accountant measures below it (1.58x and 1.78x here: `python
# tests/test_privacy_audit.py`); 2.5 leaves room for the bound's sampling spread and still fails
# an accountant that overstates epsilon by half again as much.
FACTOR = 2.5
CLIP = 1.0
CANARY_NORM = 50.0  # the canary's gradient is ~35 C: clipped hard in both datasets


@dataclasses.dataclass(frozen=True)
class Audit:
    """The measured lower bound on epsilon and the test it came from."""

    epsilon_lower: float
    threshold: float
    false_positives: int
    false_negatives: int
    draws: int


def clopper_pearson_upper(count: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) upper confidence bound on a binomial rate."""
    return 1.0 if count >= trials else float(stats.beta.ppf(1 - alpha, count + 1, trials - count))


def epsilon_lower_bound(null: np.ndarray, alternative: np.ndarray, threshold: float, delta: float) -> float:
    """``log((1 - delta - FNR_up) / FPR_up)`` of the test "score > threshold means the alternative"."""
    fpr = clopper_pearson_upper(int(np.sum(null > threshold)), null.size, ALPHA)
    fnr = clopper_pearson_upper(int(np.sum(alternative <= threshold)), alternative.size, ALPHA)
    ratio = (1 - delta - fnr) / fpr
    return math.log(ratio) if ratio > 0 else -math.inf


def audit(outputs_0: np.ndarray, outputs_1: np.ndarray, delta: float = DELTA) -> Audit:
    """Lower bound on epsilon from draws ``[2 * DRAWS, d]`` of the mechanism on two neighbours."""
    half = outputs_0.shape[0] // 2
    select_0, test_0 = outputs_0[:half], outputs_0[half:]
    select_1, test_1 = outputs_1[:half], outputs_1[half:]
    direction = select_1.mean(axis=0) - select_0.mean(axis=0)
    null_sel, alt_sel = select_0 @ direction, select_1 @ direction
    # Thresholds from the null's upper tail, down to ~30 expected false positives.
    candidates = np.quantile(null_sel, 1 - np.geomspace(0.5, 30 / half, 80))
    threshold = max(candidates, key=lambda t: epsilon_lower_bound(null_sel, alt_sel, t, delta))
    null, alternative = test_0 @ direction, test_1 @ direction
    return Audit(
        epsilon_lower=epsilon_lower_bound(null, alternative, threshold, delta),
        threshold=float(threshold),
        false_positives=int(np.sum(null > threshold)),
        false_negatives=int(np.sum(alternative <= threshold)),
        draws=null.size,
    )


def _linear_model():
    # breaching's linear model on 2x2 grey images and 2 classes: 10 parameters.
    model = models.get("linear", num_classes=2, num_channels=1)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
    # Zero parameters: the softmax is uniform for +x and -x alike, so their kernel gradients are
    # exactly opposite (the bias gradient, 1/CANARY_NORM of the norm, is shared).
    return model, jax.tree_util.tree_map(jnp.zeros_like, variables["params"])


def _neighbours(num_examples: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Two datasets that differ in example 0 only: ``+x`` in one, ``-x`` in the other; labels alike."""
    others = 0.1 * jax.random.normal(jax.random.key(1), (num_examples, 2, 2, 1))
    canary = jnp.full((2, 2, 1), CANARY_NORM / 2.0)  # norm CANARY_NORM
    labels = jnp.arange(num_examples) % 2
    return others.at[0].set(canary), others.at[0].set(-canary), labels


# Everything but the user, model and config is an argument: both datasets share one compile, and
# the users' checks of concrete values stay out of the trace.
@functools.partial(jax.jit, static_argnames=("user", "model", "cfg"))
def _shared_updates(user, model, cfg, params, inputs, labels, keys):
    payload = fu.ServerPayload(params=params, batch_stats=None)
    data = fu.UserData(inputs=inputs, labels=labels)

    def one(key):
        shared = user(model, payload, data, cfg, key)[0]
        return jnp.concatenate([leaf.ravel() for leaf in jax.tree_util.tree_leaves(shared.gradients)])

    return jax.vmap(one)(keys)


def _draws(user, model, params, inputs, labels, cfg, seed: int) -> np.ndarray:
    """``2 * DRAWS`` shared updates (flattened) of ``user`` on one dataset, under vmap over keys."""
    keys = jax.random.split(jax.random.key(seed), 2 * DRAWS)
    return np.asarray(_shared_updates(user, model, cfg, params, inputs, labels, keys))


@pytest.fixture
def fresh_traces():
    """Clear JAX's caches around a test that monkeypatches what the users trace."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def _gradient_case():
    # B = 4, C = 1: sensitivity 2C/B = 0.5; noise 1.0 gives noise multiplier 2, epsilon ~2.
    cfg = fu.UserConfig(
        user_type="local_gradient", num_data_points=4,
        local_diff_privacy=dict(per_example_clipping=CLIP, gradient_noise=1.0, distribution="gaussian"),
    )
    return cfg, _neighbours(4)


def _update_case():
    # One example, two steps of one: slices wrap, the canary is in both steps (2 releases of
    # sensitivity 2C). Noise 2C * 2 * sqrt(2) gives a composed multiplier of 2, epsilon ~2. A small
    # learning rate keeps the second step's gradient where the first left it (clipped the same way).
    cfg = fu.UserConfig(
        user_type="local_update", num_data_points=1, num_local_updates=2, num_data_per_local_update_step=1,
        local_learning_rate=1e-4,
        local_diff_privacy=dict(per_example_clipping=CLIP, gradient_noise=4 * math.sqrt(2) * CLIP,
                                distribution="gaussian"),
    )
    return cfg, _neighbours(1)


def _run_audit(user, cfg, neighbours) -> Audit:
    model, params = _linear_model()
    inputs_0, inputs_1, labels = neighbours
    outputs_0 = _draws(user, model, params, inputs_0, labels, cfg, seed=10)
    outputs_1 = _draws(user, model, params, inputs_1, labels, cfg, seed=11)
    return audit(outputs_0, outputs_1)


def test_accounted_epsilons_of_the_audited_configs():
    # What the audits below compare with: one release of multiplier 2, and two of 2 sqrt(2).
    single = accounting.guarantee(_gradient_case()[0], DELTA)
    assert single.sensitivity == pytest.approx(2 * CLIP / 4) and single.noise_multiplier == pytest.approx(2.0)
    update = accounting.guarantee(_update_case()[0], DELTA)
    assert update.releases == 2 and update.noise_multiplier == pytest.approx(2 * math.sqrt(2))
    assert update.epsilon == pytest.approx(single.epsilon, rel=1e-4)
    assert 1.5 < single.epsilon < 2.5


@pytest.mark.parametrize(
    "user, case", [(fu.local_gradient, _gradient_case), (fu.local_update, _update_case)], ids=["local_gradient", "local_update"]
)
def test_audit_lower_bound_is_below_and_near_the_accounted_epsilon(user, case):
    cfg, neighbours = case()
    accounted = accounting.guarantee(cfg, DELTA).epsilon
    result = _run_audit(user, cfg, neighbours)
    assert result.epsilon_lower <= accounted, (result, accounted)
    assert result.epsilon_lower >= accounted / FACTOR, (result, accounted)


def test_noise_on_the_sum_instead_of_the_mean_is_detected(monkeypatch, fresh_traces):
    cfg, neighbours = _gradient_case()
    accounted = accounting.guarantee(cfg, DELTA).epsilon
    add_noise = privacy.add_noise
    # The bug: noise of scale sigma added to the sum of the B clipped gradients, then divided by B.
    monkeypatch.setattr(
        privacy, "add_noise", lambda key, tree, scale, dist: add_noise(key, tree, scale / cfg.num_data_points, dist)
    )
    result = _run_audit(fu.local_gradient, cfg, neighbours)
    assert result.epsilon_lower > accounted, (result, accounted)


def test_a_missing_clip_is_detected(monkeypatch, fresh_traces):
    cfg, neighbours = _gradient_case()
    accounted = accounting.guarantee(cfg, DELTA).epsilon
    monkeypatch.setattr(privacy, "clip_factor", lambda norm, clip_value: jnp.ones_like(norm))
    result = _run_audit(fu.local_gradient, cfg, neighbours)
    assert result.epsilon_lower > accounted, (result, accounted)


def test_the_audit_sees_nothing_between_identical_datasets():
    # Its false-positive side: two draws of the same dataset give no evidence of leakage.
    cfg, (inputs_0, _, labels) = _gradient_case()
    model, params = _linear_model()
    outputs_a = _draws(fu.local_gradient, model, params, inputs_0, labels, cfg, seed=20)
    outputs_b = _draws(fu.local_gradient, model, params, inputs_0, labels, cfg, seed=21)
    assert audit(outputs_a, outputs_b).epsilon_lower < 0.2


def _report() -> None:
    """Print the audits' numbers (``python tests/test_privacy_audit.py``; docs/privacy.md quotes them)."""
    print(f"draws per dataset: {DRAWS} to choose the test, {DRAWS} to measure; delta {DELTA:g}; factor {FACTOR}")
    for name, user, case in (("local_gradient", fu.local_gradient, _gradient_case),
                             ("local_update", fu.local_update, _update_case)):
        cfg, neighbours = case()
        accounted = accounting.guarantee(cfg, DELTA)
        result = _run_audit(user, cfg, neighbours)
        print(f"{name:<15} accounted epsilon {accounted.epsilon:.4f} (RDP {accounted.epsilon_rdp:.4f}), "
              f"audit lower bound {result.epsilon_lower:.4f} (FP {result.false_positives}, FN "
              f"{result.false_negatives} of {result.draws}), accounted / measured "
              f"{accounted.epsilon / result.epsilon_lower:.2f}")
    cfg, neighbours = _gradient_case()
    add_noise = privacy.add_noise
    bugs = {
        "noise on the sum": ("add_noise", lambda key, tree, scale, dist: add_noise(key, tree, scale / cfg.num_data_points, dist)),
        "no clipping": ("clip_factor", lambda norm, clip_value: jnp.ones_like(norm)),
    }
    for name, (attribute, patched) in bugs.items():
        jax.clear_caches()
        original = getattr(privacy, attribute)
        setattr(privacy, attribute, patched)
        try:
            result = _run_audit(fu.local_gradient, cfg, neighbours)
        finally:
            setattr(privacy, attribute, original)
            jax.clear_caches()
        print(f"bug: {name:<16} audit lower bound {result.epsilon_lower:.4f} "
              f"(accounted for the correct user: {accounting.guarantee(cfg, DELTA).epsilon:.4f})")


if __name__ == "__main__":
    _report()

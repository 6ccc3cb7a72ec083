"""What a user config's defences guarantee: differential-privacy accounting with ``dp-accounting``.

breaching calls its defences ``local_diff_privacy`` (per-example clipping, Gaussian or Laplace
gradient noise, input noise) but says nothing of the privacy a config gives. This module derives,
from what each user of :mod:`fedjax_users.users` computes, the mechanism the server observes (the
sensitivity of each noisy release, its noise, and how many releases one example or one user is in)
and hands it to Google's ``dp_accounting``: the privacy-loss-distribution (PLD) accountant for the
tight epsilon, the Renyi (RDP) accountant as a looser second opinion. Nothing here is a
hand-written accountant. The derivations are in ``docs/privacy.md``.

* :func:`guarantee` -> :class:`Guarantee`: epsilon at a delta for a number of queries.
* :func:`calibrate` -> :class:`~fedjax_users.config.UserConfig`: the gradient noise for a target epsilon.

The accountants always see a release as a shift of exactly one sensitivity (noise multiplier =
noise / sensitivity, ``ADD_OR_REMOVE_ONE``); the neighbouring relation enters only through the
sensitivity, computed here. For Gaussian and Laplace noise without subsampling that is exact.

Example::

    >>> from fedjax_users import accounting
    >>> from fedjax_users.config import LocalDiffPrivacy, UserConfig
    >>> dp = LocalDiffPrivacy(gradient_noise=1.0, per_example_clipping=1.0, distribution="gaussian")
    >>> cfg = UserConfig(user_type="local_gradient", num_data_points=4, local_diff_privacy=dp)
    >>> round(accounting.guarantee(cfg, delta=1e-5, num_queries=10).epsilon, 2)
    7.51
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from fedjax_users.config import UserConfig
from fedjax_users.users import step_slices

__all__ = [
    "DEFAULT_DELTA",
    "Guarantee",
    "MECHANISMS",
    "RELATIONS",
    "UNITS",
    "calibrate",
    "count_params",
    "data_input_bounds",
    "guarantee",
    "model_num_params",
]

UNITS = ("example", "user")
RELATIONS = ("replace_one", "add_remove")
MECHANISMS = ("auto", "gradient", "input")
# A common choice (below 1/n for the datasets breaching's cases hold); the CLI's default.
DEFAULT_DELTA = 1e-5

# PLD discretisation. Gaussian: 1e-3 keeps epsilon within ~1e-7 (relative) of the analytic value
# and is ~10x faster than dp_accounting's default 1e-4; it widens with epsilon so that a huge
# epsilon (tiny noise) does not need billions of buckets. Laplace: each of n composed releases
# may round its loss up by one interval, so the interval is 1e-3 * epsilon / n (<= 0.1% in all).
PLD_INTERVAL = 1e-3
PLD_RELATIVE_INTERVAL = 1e-4
PLD_LAPLACE_RELATIVE_ERROR = 1e-3
PLD_MIN_INTERVAL = 1e-6
# Above this (RDP) epsilon the PLD accountant is not run: its buckets would overflow (dp_accounting
# takes expm1 of the interval) or number billions, and no such guarantee means anything. The
# epsilon reported is then RDP's, a valid but looser bound, and a note says so.
PLD_MAX_EPSILON = 1e5

_RELATION_WORDS = {
    "replace_one": "replace-one (one {unit} replaced by any other)",
    "add_remove": "add/remove (one {unit}'s contribution removed, i.e. replaced by zero, divisors fixed)",
}
_GENERATOR_NOTE = (
    "The accounting is for ideal continuous noise; the noise is float32 samples of jax.random, "
    "not a cryptographic generator, and no defence against floating-point attacks is made."
)


@dataclasses.dataclass(frozen=True)
class Guarantee:
    """The (epsilon, delta)-DP guarantee of a user config for the worst-case unit.

    Attributes:
      epsilon: from the PLD accountant (the tight one); ``inf`` when there is no guarantee.
      epsilon_rdp: from the RDP accountant (looser); ``inf`` when there is no guarantee.
      delta: the delta both are at.
      unit: ``"example"`` or ``"user"``: what the neighbouring datasets differ by.
      relation: ``"replace_one"`` or ``"add_remove"``.
      num_queries: the queries composed.
      defence: ``"gradient noise"``, ``"input noise"`` or ``"none"``.
      distribution: ``"gaussian"``, ``"laplacian"``, or ``None`` without a guarantee.
      sensitivity: of one release (L2 for Gaussian, L1 for Laplace noise), the worst one where
        releases differ.
      noise_scale: the std or Laplace ``b`` of that release as the server sees it.
      noise_multiplier: ``noise_scale / sensitivity``.
      releases: how many releases the worst unit is in, over all ``num_queries``.
      covers: what the neighbouring datasets differ in.
      reason: why there is no guarantee, else ``None``.
      notes: the assumptions the guarantee rests on.
      unprotected: what else the server sees of the data without noise.
    """

    epsilon: float
    epsilon_rdp: float
    delta: float
    unit: str
    relation: str
    num_queries: int
    defence: str  # "gradient noise", "input noise" or "none"
    distribution: Optional[str]  # "gaussian", "laplacian" or None
    sensitivity: float
    noise_scale: float
    noise_multiplier: float
    releases: int
    covers: str
    reason: Optional[str] = None
    notes: tuple[str, ...] = ()
    unprotected: tuple[str, ...] = ()

    @property
    def finite(self) -> bool:
        """Whether there is a guarantee at all (finite epsilon)."""
        return math.isfinite(self.epsilon)

    def summary(self) -> str:
        """One line: epsilon at delta, unit, relation (or ``no DP guarantee: <reason>``).

        Returns:
          The line, for a person to read.

        Example::

            >>> from fedjax_users.config import LocalDiffPrivacy, UserConfig
            >>> dp = LocalDiffPrivacy(gradient_noise=1.0, per_example_clipping=1.0, distribution="gaussian")
            >>> print(guarantee(UserConfig(user_type="local_gradient", num_data_points=4, local_diff_privacy=dp),
            ...                 1e-5).summary())
            epsilon 1.993 at delta 1e-05 (PLD; RDP 2.166) per example, replace_one, 1 query: gaussian ...
            >>> print(guarantee(UserConfig(user_type="local_gradient", num_data_points=4), 1e-5).summary())
            no DP guarantee: no clipping (per_example_clipping=0): nothing bounds each example's gradient, ...
        """
        if not self.finite:
            return f"no DP guarantee: {self.reason}"
        source = f"PLD; RDP {self.epsilon_rdp:.4g}" if self.epsilon_rdp <= PLD_MAX_EPSILON else "RDP; PLD not run"
        line = (
            f"epsilon {self.epsilon:.4g} at delta {self.delta:g} ({source}) per "
            f"{self.unit}, {self.relation}, {self.num_queries} quer{'y' if self.num_queries == 1 else 'ies'}: "
            f"{self.distribution} {self.defence}, noise multiplier {self.noise_multiplier:.4g}, "
            f"{self.releases} release{'s' if self.releases != 1 else ''}"
        )
        if self.defence == "input noise":
            line += ", input values only"
        if self.unprotected:
            line += "; not covered: " + ", ".join(item.split(" (")[0] for item in self.unprotected)
        return line


# ----------------------------------------------------------------------------------------------
# Mechanisms: what the server observes, derived from what the users compute


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Noisy releases of one noise scale; each candidate is a worst-case unit's releases.

    ``candidates``: for each unit that may be the worst, its ``((sensitivity, count), ...)``;
    sensitivities are L2 for Gaussian and L1 for Laplace noise, counts are per query.
    """

    defence: str
    distribution: str
    noise_scale: float
    candidates: tuple[tuple[tuple[float, int], ...], ...]
    covers: str
    notes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Unbounded:
    """No finite epsilon, and why."""

    defence: str
    reason: str
    sensitivity: float = math.inf
    noise_scale: float = 0.0
    notes: tuple[str, ...] = ()


_Mechanism = Union[_Plan, _Unbounded]


def _dominant(candidates: Sequence[tuple[tuple[float, int], ...]]) -> tuple[tuple[tuple[float, int], ...], ...]:
    """Distinct candidates, dropping any that another one covers release for release (never worse)."""
    as_counts = [dict(c) for c in dict.fromkeys(tuple(sorted(c)) for c in candidates)]

    def covered(a: dict, b: dict) -> bool:
        return a != b and all(b.get(s, 0) >= n for s, n in a.items())

    kept = [a for a in as_counts if not any(covered(a, b) for b in as_counts)]
    return tuple(tuple(sorted((s, n) for s, n in a.items() if n > 0)) for a in kept)


def _per_example_steps(cfg: UserConfig) -> list[list[int]]:
    """For each example of a multi-step user, the lengths of the steps whose slice holds it.

    ``step_slices`` advances ``seen = (seen + k) % num_data_points``, so an example can be in
    several steps (5 points, k = 2, 4 steps: [0,1], [2,3], [4], [1,2]).
    """
    slices = step_slices(cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates)
    steps: list[list[int]] = [[] for _ in range(cfg.num_data_points)]
    for start, length in slices:
        for index in range(start, start + length):
            steps[index].append(length)
    return steps


def _step_lengths(cfg: UserConfig) -> list[int]:
    return [length for _, length in step_slices(
        cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates
    )]


def _relation_note(unit: str, relation: str) -> str:
    return "Neighbouring datasets: " + _RELATION_WORDS[relation].format(unit=unit) + "."


def _gradient_mechanism(cfg: UserConfig, unit: str, relation: str, num_params: Optional[int]) -> _Mechanism:
    """The release of the gradient-noise defence for ``cfg``'s users."""
    dp = cfg.local_diff_privacy
    unbounded = _unbounded_gradient(cfg, unit)
    if unbounded is not None:
        return unbounded
    laplace = dp.distribution == "laplacian"
    if laplace and num_params is None:
        raise ValueError(
            "num_params is needed for Laplace gradient noise (its L1 sensitivity is sqrt(num_params) "
            "times the L2 bound); count it with fedjax_users.accounting.count_params(params)"
        )
    # Laplace noise on an L2-clipped update: ||v||_1 <= sqrt(d) ||v||_2 bounds its L1 sensitivity.
    to_norm = math.sqrt(num_params) if laplace else 1.0
    notes = [_relation_note(unit, relation)]
    if laplace:
        notes.append(
            f"Laplace noise on an L2-clipped update: L1 sensitivity sqrt(d) times the L2 bound, "
            f"d = num_params = {num_params:,}; one release is (L1 sensitivity / b)-DP (pure DP)."
        )
    sensitivity = _multi_step_sensitivity if cfg.is_multi_step else _single_step_sensitivity
    candidates, scale, explained = sensitivity(cfg, unit, relation == "replace_one", to_norm)
    notes += explained
    notes.append(
        "Each query is a fresh release on the same data; queries compose adaptively (the server may "
        "change the model in between)."
    )
    notes.append(_GENERATOR_NOTE)
    return _Plan(
        defence="gradient noise",
        distribution=dp.distribution,
        noise_scale=scale,
        candidates=candidates,
        covers=f"one {unit}: inputs and labels",
        notes=tuple(notes),
    )


def _unbounded_gradient(cfg: UserConfig, unit: str) -> Optional[_Unbounded]:
    """Why gradient noise gives no finite epsilon here (no clipping, or no noise), or ``None``."""
    dp = cfg.local_diff_privacy
    clip, sigma = dp.per_example_clipping, dp.gradient_noise
    if clip <= 0:
        what = "the batch gradient of each step" if cfg.is_multi_step else "each example's gradient"
        return _Unbounded(
            "gradient noise",
            f"no clipping (per_example_clipping=0): nothing bounds {what}, so one {unit} can move "
            "the shared update arbitrarily far (unbounded sensitivity) and no noise gives a finite epsilon",
            noise_scale=sigma,
        )
    if sigma <= 0:
        return _Unbounded(
            "gradient noise",
            "no gradient noise (gradient_noise=0): the clipped update is released exactly, so "
            "two neighbouring datasets give different outputs with certainty",
            sensitivity=2 * clip,
        )
    return None


def _single_step_sensitivity(cfg: UserConfig, unit: str, replace: bool, to_norm: float) -> tuple:
    """(candidates, noise scale, notes) of single-step users' releases: one a query."""
    dp = cfg.local_diff_privacy
    clip, sigma, batch = dp.per_example_clipping, dp.gradient_noise, cfg.num_data_points
    users = cfg.num_users if cfg.is_aggregate else 1
    # Clipped gradients have norm <= C (clip only above C, to C / (norm + 1e-6) of it); the
    # user shares their mean over the fixed, public B: replacing one moves it by <= 2C/B,
    # zeroing one by <= C/B. A whole user's data moves the mean by <= 2C (or C).
    l2 = (2 if replace else 1) * clip / (batch if unit == "example" else 1)
    scale = sigma
    notes = [
        f"local_gradient: the mean of B = num_data_points = {batch} per-example clipped gradients "
        f"(C = {clip:g}) plus noise, one release per query. B is public and fixed: the gradient "
        "divides by B whatever the data (provide_num_data_points reveals it). Were the divisor to "
        "change with the data (true add/remove), the mean of B vs B+1 moves by <= 2C/(B+1): "
        "use replace_one, which bounds it."
    ]
    if users > 1 and dp.distribution != "laplacian":
        # Only the mean of U users is seen: U independent N(0, sigma^2) average to
        # N(0, sigma^2 / U), and one unit moves the mean by its user's sensitivity / U.
        l2, scale = l2 / users, sigma / math.sqrt(users)
        notes.append(
            f"aggregate of U = {users} single-step users: the server sees only the mean; each user "
            f"adds its own N(0, sigma^2), so the mean carries N(0, sigma^2/U) while one {unit} moves "
            "it by its user's sensitivity / U: noise multiplier sqrt(U) times one user's. This "
            "assumes trusted aggregation (no single user's update is seen, every user adds its noise) "
            "and that each example belongs to one user only (an example held by k users, as "
            "partitions like random-full allow, has k times the sensitivity)."
        )
    elif users > 1:
        notes.append(
            f"aggregate of U = {users} users with Laplace noise: the mean of Laplace vectors is not a "
            "Laplace mechanism; by post-processing (the other users' data are the same on both "
            "datasets) each user's own guarantee holds for the mean, stated here without any gain from U."
        )
    return (((l2 * to_norm, 1),),), scale, notes


def _multi_step_sensitivity(cfg: UserConfig, unit: str, replace: bool, to_norm: float) -> tuple:
    """(candidates, noise scale, notes) of multi-step users' releases: one a local step."""
    clip = cfg.local_diff_privacy.per_example_clipping
    users = cfg.num_users if cfg.is_aggregate else 1

    # Each step clips the *batch* gradient (not each example's): one example, or the whole
    # batch, can move the clipped step gradient by up to 2C, whatever the batch size; zeroing
    # the example bounds it by C only when it is the step's whole batch.
    def step_l2(length: int) -> float:
        return clip if (not replace and (unit == "user" or length == 1)) else 2 * clip

    if unit == "example":
        per_unit = [[step_l2(length) for length in lengths] for lengths in _per_example_steps(cfg)]
    else:
        per_unit = [[step_l2(length) for length in _step_lengths(cfg)]]
    candidates = _dominant(
        [tuple((s * to_norm, unit_steps.count(s)) for s in set(unit_steps)) for unit_steps in per_unit]
    )
    notes = [
        f"local_update: {cfg.num_local_updates} SGD steps of {cfg.num_data_per_local_update_step} "
        f"example(s) (C = {clip:g}); each step's clipped, noised batch gradient is one release "
        "(clipping the batch gradient bounds a step's move by 2C whatever the batch size). "
        "Steps compose adaptively (each gradient is taken at parameters the earlier noisy releases "
        "moved); the shared parameter difference is plain SGD on the releases, post-processing. "
        + ("For one example only the steps whose slice holds it count (slices wrap modulo "
           "num_data_points, so an example may be in several)." if unit == "example" else
           "For one user every step counts.")
    ]
    if users > 1:
        notes.append(
            f"aggregate of U = {users} multi-step users: each user's noise passes nonlinearly "
            "through its later steps, so the mean is not a Gaussian mechanism of noise sigma/sqrt(U); "
            "by post-processing each user's own guarantee holds for the mean, stated here "
            "without any gain from U."
        )
    if unit == "example" and not candidates:
        candidates = ((),)
    return candidates, cfg.local_diff_privacy.gradient_noise, notes


def _input_mechanism(
    cfg: UserConfig,
    unit: str,
    relation: str,
    input_bounds: Optional[tuple[float, float]],
    input_size: Optional[int],
) -> _Mechanism:
    """The release of the input-noise defence: one example's (or user's) input values only."""
    dp = cfg.local_diff_privacy
    if dp.input_noise <= 0:
        return _Unbounded("input noise", "no input noise (input_noise=0)")
    if input_bounds is None or input_size is None:
        return _Unbounded(
            "input noise",
            "input noise needs input_bounds and input_size (the range of each input entry and the "
            "entries per example) to bound one example's inputs",
            noise_scale=dp.input_noise,
        )
    if relation != "replace_one":
        return _Unbounded(
            "input noise",
            "input noise hides the values of an example's inputs, not its presence: removing an "
            "example removes its gradient, which input noise does not hide (use relation replace_one)",
            noise_scale=dp.input_noise,
        )
    lo, hi = input_bounds
    laplace = dp.distribution == "laplacian"

    def sensitivity(examples: int) -> float:
        # Any two inputs in the box differ by <= (hi - lo) per entry: L2 (hi-lo) sqrt(n), L1 (hi-lo) n.
        entries = examples * input_size
        return (hi - lo) * (entries if laplace else math.sqrt(entries))

    if not cfg.is_multi_step:
        # Fresh noise on every input at every query (per example when clipping, one draw over the
        # batch otherwise): one release per query.
        candidates = (((sensitivity(1 if unit == "example" else cfg.num_data_points), 1),),)
    elif unit == "example":
        counts = max(len(lengths) for lengths in _per_example_steps(cfg))
        candidates = (((sensitivity(1), counts),),) if counts else ((),)
    else:
        lengths = _step_lengths(cfg)
        candidates = (tuple((sensitivity(n), lengths.count(n)) for n in sorted(set(lengths))),)
    notes = [
        "Neighbouring datasets: one " + unit + "'s input values replaced by any others within "
        f"input_bounds = ({lo:g}, {hi:g}) (the units the noise is added in, i.e. normalised); labels and "
        "everything else fixed. Inputs outside the bounds void the guarantee.",
        "Input noise protects the input values only: labels are not protected. The gradient or update "
        "is post-processing of the noisy inputs (the rest of the data being the same on both datasets).",
        ("Each query draws fresh noise for every input: one release per query." if not cfg.is_multi_step
         else "Each local step draws fresh noise for its batch: one release per step that holds the input."),
    ]
    if cfg.is_aggregate:
        notes.append("aggregate: each user's own guarantee, by post-processing (no gain from the number of users).")
    notes.append(_GENERATOR_NOTE)
    return _Plan(
        defence="input noise",
        distribution=dp.distribution,
        noise_scale=dp.input_noise,
        candidates=candidates,
        covers=f"one {unit}'s input values only (labels unprotected)",
        notes=tuple(notes),
    )


def _unprotected(cfg: UserConfig, server_sends_buffers: bool) -> tuple[str, ...]:
    """What the server sees of the users' data besides the noised update, without noise."""
    items = []
    if cfg.provide_labels:
        items.append("labels (metadata.labels lists every label exactly)")
    if cfg.is_multi_step and cfg.provide_local_hyperparams:
        items.append("step labels (local_hyperparams.labels lists each local step's labels)")
    if cfg.provide_buffers and not server_sends_buffers:
        items.append("BatchNorm buffers (statistics of the users' own data, shared in train mode)")
    return tuple(items)


# ----------------------------------------------------------------------------------------------
# Accountants


def _event(distribution: str, noise_scale: float, releases: tuple[tuple[float, int], ...], queries: int):
    import dp_accounting

    make = dp_accounting.GaussianDpEvent if distribution == "gaussian" else dp_accounting.LaplaceDpEvent
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(make(noise_scale / s), n * queries) for s, n in releases]
    )


def _pld_interval(eps_rdp: float, laplace_releases: int) -> float:
    if not math.isfinite(eps_rdp):
        return 1.0
    if laplace_releases:
        return max(PLD_MIN_INTERVAL, PLD_LAPLACE_RELATIVE_ERROR * eps_rdp / laplace_releases)
    return max(PLD_INTERVAL, PLD_RELATIVE_INTERVAL * eps_rdp)


def _epsilons(event: Any, delta: float, with_pld: bool = True, laplace_releases: int = 0) -> tuple[float, float]:
    """(PLD epsilon, RDP epsilon) of ``event`` at ``delta``; PLD's is ``nan`` unless ``with_pld``.

    ``laplace_releases``: how many Laplace releases ``event`` composes (0 for Gaussian ones).
    """
    from dp_accounting import NeighboringRelation, pld, rdp

    relation = NeighboringRelation.ADD_OR_REMOVE_ONE
    renyi = rdp.RdpAccountant(neighboring_relation=relation)
    renyi.compose(event)
    eps_rdp = float(renyi.get_epsilon(delta))
    if not with_pld:
        return math.nan, eps_rdp
    if eps_rdp > PLD_MAX_EPSILON:
        return eps_rdp, eps_rdp
    interval = _pld_interval(eps_rdp, laplace_releases)
    loss = pld.PLDAccountant(relation, value_discretization_interval=interval)
    loss.compose(event)
    return float(loss.get_epsilon(delta)), eps_rdp


def _worst(mech: _Plan, delta: float, num_queries: int, with_pld: bool = True):
    """(PLD epsilon, its worst candidate, RDP epsilon) over the plan's candidate units.

    Each accountant takes its own maximum (both are valid bounds); the candidate returned is
    PLD's worst (RDP's where PLD is not computed).
    """
    best, eps_rdp = None, 0.0
    for releases in mech.candidates:
        laplace = sum(n for _, n in releases) * num_queries if mech.distribution == "laplacian" else 0
        eps = (0.0, 0.0) if not releases else _epsilons(
            _event(mech.distribution, mech.noise_scale, releases, num_queries), delta, with_pld, laplace
        )
        key = eps[0] if with_pld else eps[1]
        if best is None or key > best[0]:
            best = (key, releases)
        eps_rdp = max(eps_rdp, eps[1])
    return (best[0] if with_pld else math.nan), best[1], eps_rdp


def _check(delta: float, num_queries: int, unit: str, relation: str, mechanism: str = "auto") -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if isinstance(num_queries, bool) or not isinstance(num_queries, (int, np.integer)) or num_queries < 1:
        raise ValueError(f"num_queries must be an integer >= 1, got {num_queries!r}")
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; expected one of {', '.join(UNITS)}")
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r}; expected one of {', '.join(MECHANISMS)}")


def _check_inputs(num_params, input_bounds, input_size) -> None:
    if num_params is not None and (isinstance(num_params, bool) or not isinstance(num_params, (int, np.integer))
                                   or num_params < 1):
        raise ValueError(f"num_params must be an integer >= 1, got {num_params!r}")
    if input_bounds is not None:
        if len(input_bounds) != 2 or not float(input_bounds[1]) > float(input_bounds[0]):
            raise ValueError(f"input_bounds must be (lo, hi) with hi > lo, got {input_bounds!r}")
    if input_size is not None and (not isinstance(input_size, (int, np.integer)) or input_size < 1):
        raise ValueError(f"input_size must be an integer >= 1, got {input_size!r}")


def _account(
    mech: _Mechanism, cfg: UserConfig, delta: float, num_queries: int, unit: str, relation: str,
    unprotected: tuple[str, ...], extra_notes: tuple[str, ...] = (),
) -> Guarantee:
    if isinstance(mech, _Unbounded):
        return Guarantee(
            epsilon=math.inf, epsilon_rdp=math.inf, delta=delta, unit=unit, relation=relation,
            num_queries=num_queries, defence="none", distribution=None, sensitivity=mech.sensitivity,
            noise_scale=mech.noise_scale, noise_multiplier=0.0, releases=0, covers="nothing",
            reason=mech.reason, notes=mech.notes + extra_notes, unprotected=unprotected,
        )
    epsilon, releases, eps_rdp = _worst(mech, delta, num_queries)
    if eps_rdp > PLD_MAX_EPSILON:
        extra_notes = extra_notes + (
            f"epsilon above {PLD_MAX_EPSILON:g}: the PLD accountant is not run, epsilon is the RDP bound.",
        )
    sensitivity = max((s for s, _ in releases), default=0.0)
    return Guarantee(
        epsilon=epsilon, epsilon_rdp=eps_rdp, delta=delta, unit=unit, relation=relation,
        num_queries=num_queries, defence=mech.defence, distribution=mech.distribution,
        sensitivity=sensitivity, noise_scale=mech.noise_scale,
        noise_multiplier=mech.noise_scale / sensitivity if sensitivity > 0 else math.inf,
        releases=sum(n for _, n in releases) * num_queries, covers=mech.covers,
        notes=mech.notes + extra_notes, unprotected=unprotected,
    )


def guarantee(
    cfg: UserConfig,
    delta: float,
    num_queries: int = 1,
    unit: str = "example",
    relation: str = "replace_one",
    *,
    num_params: Optional[int] = None,
    input_bounds: Optional[tuple[float, float]] = None,
    input_size: Optional[int] = None,
    server_sends_buffers: bool = True,
    mechanism: str = "auto",
) -> Guarantee:
    """The (epsilon, delta)-DP guarantee of ``cfg``'s shared update over ``num_queries`` queries.

    Args:
      cfg: the user config (its ``local_diff_privacy`` and the user's shape: examples, steps, users).
      delta: the delta, in (0, 1).
      num_queries: how many queries the server makes of the same data (composed adaptively).
      unit: ``"example"`` or ``"user"`` (one user's whole data).
      relation: ``"replace_one"`` or ``"add_remove"`` (the unit's contribution replaced by zero,
        with the divisors ``B`` and ``U`` public and fixed).
      num_params: the model's parameter count (``count_params``), needed for Laplace gradient noise.
      input_bounds: ``(lo, hi)``, the range of each input entry in the units noise is added in
        (``data_input_bounds``), needed to account input noise.
      input_size: the input entries per example, needed to account input noise.
      server_sends_buffers: whether users run in eval mode (if not and ``provide_buffers``, their
        BatchNorm statistics are listed as unprotected).
      mechanism: ``"gradient"``, ``"input"``, or ``"auto"`` (the gradient noise's guarantee where it
        has one, as it covers labels too, else the input noise's).

    Returns:
      The :class:`Guarantee`; its ``epsilon`` is ``inf`` (and ``reason`` says why) where the
      defences give none.

    Raises:
      ValueError: an argument out of its range, or Laplace gradient noise without ``num_params``.

    Example::

        >>> from fedjax_users.config import LocalDiffPrivacy, UserConfig
        >>> dp = LocalDiffPrivacy(gradient_noise=1.0, per_example_clipping=1.0, distribution="gaussian")
        >>> found = guarantee(UserConfig(user_type="local_gradient", num_data_points=4, local_diff_privacy=dp), 1e-5)
        >>> round(found.epsilon, 2), found.sensitivity, found.noise_multiplier  # replacing one of 4: 2C/4
        (1.99, 0.5, 2.0)
    """
    _check(delta, num_queries, unit, relation, mechanism)
    _check_inputs(num_params, input_bounds, input_size)
    if not isinstance(cfg, UserConfig):
        raise ValueError(f"cfg must be a fedjax_users.UserConfig, got {type(cfg).__name__}")
    unprotected = _unprotected(cfg, server_sends_buffers)
    grad = _gradient_mechanism(cfg, unit, relation, num_params) if mechanism != "input" else None
    inputs = _input_mechanism(cfg, unit, relation, input_bounds, input_size) if mechanism != "gradient" else None
    if mechanism == "gradient":
        return _account(grad, cfg, delta, num_queries, unit, relation, unprotected)
    if mechanism == "input":
        return _account(inputs, cfg, delta, num_queries, unit, relation, unprotected)
    if isinstance(grad, _Plan):
        extra = ()
        if isinstance(inputs, _Plan):
            extra = ("Input noise also bounds the input values alone: guarantee(..., mechanism='input').",)
        return _account(grad, cfg, delta, num_queries, unit, relation, unprotected, extra)
    if isinstance(inputs, _Plan):
        return _account(inputs, cfg, delta, num_queries, unit, relation, unprotected,
                        (f"Gradient noise gives no guarantee: {grad.reason}.",))
    if cfg.local_diff_privacy.input_noise > 0:
        # Say why neither defence counts.
        grad = dataclasses.replace(grad, reason=f"{grad.reason}; and {inputs.reason}")
    return _account(grad, cfg, delta, num_queries, unit, relation, unprotected)


def calibrate(
    cfg: UserConfig,
    target_epsilon: float,
    delta: float,
    num_queries: int = 1,
    unit: str = "example",
    relation: str = "replace_one",
    *,
    num_params: Optional[int] = None,
    rtol: float = 1e-3,
) -> UserConfig:
    """``cfg`` with the smallest ``gradient_noise`` (to ``rtol``) whose PLD epsilon is <= ``target_epsilon``.

    Keeps the distribution and clipping bound of ``cfg`` (clipping must be on). A bisection over
    the noise in log space through :func:`guarantee`, bracketed by the RDP calibration (RDP's
    epsilon is never below PLD's, so its noise suffices).

    Args:
      cfg: the user config; its ``per_example_clipping`` must be positive.
      target_epsilon: the epsilon to reach, positive and finite.
      delta: as in :func:`guarantee`.
      num_queries: as in :func:`guarantee`.
      unit: as in :func:`guarantee`.
      relation: as in :func:`guarantee`.
      num_params: as in :func:`guarantee` (needed for Laplace noise).
      rtol: the relative precision of the noise found, in (0, 1).

    Returns:
      ``cfg`` with ``local_diff_privacy.gradient_noise`` set to the noise found.

    Raises:
      ValueError: an argument out of its range, or clipping off.

    Example::

        >>> from fedjax_users.config import LocalDiffPrivacy, UserConfig
        >>> dp = LocalDiffPrivacy(per_example_clipping=1.0, distribution="gaussian")
        >>> noisy = calibrate(UserConfig(user_type="local_gradient", num_data_points=4, local_diff_privacy=dp),
        ...                   target_epsilon=2.0, delta=1e-5, rtol=0.01)
        >>> round(noisy.local_diff_privacy.gradient_noise, 2), guarantee(noisy, 1e-5).epsilon <= 2.0
        (1.0, True)
    """
    _check(delta, num_queries, unit, relation)
    _check_inputs(num_params, None, None)
    if not (isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    if cfg.local_diff_privacy.per_example_clipping <= 0:
        raise ValueError(
            "per_example_clipping is 0: without clipping no gradient noise gives a finite epsilon; set it first"
        )
    if cfg.local_diff_privacy.distribution == "laplacian" and num_params is None:
        raise ValueError("num_params is needed to calibrate Laplace gradient noise")

    def with_noise(sigma: float) -> UserConfig:
        dp = dataclasses.replace(cfg.local_diff_privacy, gradient_noise=float(sigma))
        return cfg.replace(local_diff_privacy=dp)

    def epsilon(sigma: float, accountant: str) -> float:
        # guarantee(with_noise(sigma), ..., mechanism="gradient") computes exactly this, and both
        # accountants; the search asks for one.
        mech = _gradient_mechanism(with_noise(sigma), unit, relation, num_params)
        eps_pld, _, eps_rdp = _worst(mech, delta, num_queries, with_pld=accountant == "pld")
        return eps_pld if accountant == "pld" else eps_rdp

    def search(lo: float, hi: float, accountant: str, tol: float) -> float:
        # Invariant: epsilon(lo) > target >= epsilon(hi); epsilon falls as the noise grows.
        while hi / lo > 1 + tol:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if epsilon(mid, accountant) > target_epsilon else (lo, mid)
        return hi

    def bracket(start: float, accountant: str, step: float) -> tuple[float, float]:
        hi = start
        while epsilon(hi, accountant) > target_epsilon:
            hi *= step
        lo = hi / step
        while epsilon(lo, accountant) <= target_epsilon:
            hi, lo = lo, lo / step
        return lo, hi

    clip = cfg.local_diff_privacy.per_example_clipping
    lo, hi = bracket(clip, "rdp", 4.0)
    sigma_rdp = search(lo, hi, "rdp", 1e-3)
    # PLD needs at most RDP's noise, and typically 5-15% less.
    lo, hi = bracket(sigma_rdp, "pld", 1.5)
    return with_noise(search(lo, hi, "pld", rtol))


# ----------------------------------------------------------------------------------------------
# Sizes the accountant needs


def count_params(tree: Any) -> int:
    """Number of scalar parameters in a pytree of arrays.

    Args:
      tree: a pytree of arrays or of ``jax.ShapeDtypeStruct`` (the model's ``params``).

    Returns:
      The total number of entries.

    Example::

        >>> import numpy as np
        >>> count_params({"fc": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}})
        8
    """
    import jax

    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def model_num_params(model: Any, input_shape: Sequence[int], dtype: Any = "float32") -> int:
    """The parameter count of ``model`` for inputs of a shape, without computing.

    Uses ``jax.eval_shape`` of ``model.init``: only shapes are traced, no weights are made.

    Args:
      model: a Flax module.
      input_shape: the inputs' shape, batch axis included.
      dtype: the inputs' dtype.

    Returns:
      The number of entries of the model's ``params``.

    Example::

        >>> import flax.linen as nn
        >>> model_num_params(nn.Dense(3), (1, 4))  # a 4 x 3 kernel and 3 biases
        15
    """
    import jax

    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(tuple(input_shape), np.dtype(dtype))
    )
    return count_params(shapes["params"])


def data_input_bounds(cfg_data: Mapping[str, Any]) -> tuple[Optional[tuple[float, float]], Optional[int]]:
    """``(input_bounds, input_size)`` of a vision data config's model inputs; ``(None, None)`` for text.

    Images are decoded to [0, 1] and, with ``normalize``, become ``(x - mean_c) / std_c``: every
    entry lies in ``[min_c -mean_c/std_c, max_c (1 - mean_c)/std_c]`` (one box for all channels,
    which is conservative when channels differ).

    Args:
      cfg_data: the case's data config (``modality``, ``shape`` [C, H, W], ``normalize``,
        ``mean``, ``std``).

    Returns:
      ``((lo, hi), entries per example)`` for :func:`guarantee`'s ``input_bounds`` and
      ``input_size``, widened by a few float32 ulps when normalised; ``(None, None)`` for text.

    Example::

        >>> data_input_bounds({"modality": "vision", "shape": [3, 32, 32], "normalize": False})
        ((0.0, 1.0), 3072)
    """
    if cfg_data.get("modality") != "vision":
        return None, None
    shape = [int(v) for v in cfg_data["shape"]]
    size = int(np.prod(shape))
    if not cfg_data.get("normalize", False):
        return (0.0, 1.0), size
    # In float32 as fedjax_users.data.sources.normalize computes the inputs, widened by a few ulps
    # so that its rounding cannot place an input outside the bounds.
    mean = np.asarray(list(cfg_data["mean"]), np.float32)
    std = np.asarray(list(cfg_data["std"]), np.float32)
    lo, hi = float(np.min((np.float32(0) - mean) / std)), float(np.max((np.float32(1) - mean) / std))
    slack = 4 * float(np.finfo(np.float32).eps) * max(1.0, abs(lo), abs(hi))
    return (lo - slack, hi + slack), size

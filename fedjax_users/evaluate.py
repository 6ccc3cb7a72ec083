"""How much a defence protects and what it costs: attack success against epsilon, defence by defence.

For each defence of a grid (per-example clipping, gradient noise and its distribution, input
noise, local steps, batch size, and no defence as the baseline) on a case's user, ``Evaluation.run``
gives, side by side:

* **privacy**: epsilon at ``delta`` for the case's number of queries
  (:func:`fedjax_users.accounting.guarantee`);
* **leakage**: gradient-inversion attacks through the exact user (:mod:`fedjax_users.attacks`):
  cosine distance with total variation (Geiping et al., breaching's ``invertinggradients``) and
  the L2 distance with L-BFGS (Zhu et al., breaching's ``deepleakage``); labels read off the
  update by the analytic rule (iDLG); success as PSNR and SSIM per image (dm-pix) and label
  accuracy;
* **utility**: the cosine and relative error of the defended update to the same user's update
  without the defence, and the change of the loss on held-out examples after the server applies
  the update as an SGD step.

The attacker knows the defence's configuration but not the user's noise: its model of the user is
the defended user with the noise (gradient and input) turned off, clipping and local steps kept.
Defences whose attacker's model is the same (the same clipping, steps and batch, different noise)
are attacked side by side under ``jax.vmap``: the noise scale is static in the user functions (it
is part of the ``UserConfig``) but only the *observations* differ for the attacker, and they are
traced. Every defence's user draws its noise from the same key, so the grid's rows equal single
runs of the same defence and noise scales differ only in scale, not in draw.

``fedjax-users evaluate [CASE] [overrides] --defences ...`` (``add_arguments`` and ``main``) runs
it and writes ``evaluation.csv``, ``evaluation.json``, ``evaluation.png`` (leakage against epsilon,
utility beside it) and ``reconstructions.png`` (originals and reconstructions per defence) into
``runs/evaluate-<case>-<timestamp>/``. See ``docs/evaluate.md``.

Example::

    >>> import jax
    >>> from fedjax_users import evaluate
    >>> from fedjax_users.data import load_case
    >>> ev = evaluate.evaluation(["none", "clip=1,noise=0.5"], attacks=["cosine"], steps=5)
    >>> cfg_case = load_case(None, ["user=local_gradient", "user.num_data_points=1", "model=linear"])
    >>> result = ev.run(cfg_case, jax.random.key(0))
    >>> [row.defence for row in result.rows]
    ['none', 'clip=1,noise=0.5']
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import time
from typing import Any, Callable, Optional, Sequence

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

import fedjax_users as fu
from fedjax_users import accounting, attacks, losses, semantics
from fedjax_users.config import DISTRIBUTIONS, ConfigError, LocalDiffPrivacy, UserConfig

__all__ = [
    "ATTACKS",
    "COSINE",
    "DEFAULT_DEFENCES",
    "DEFENCE_KEYS",
    "Defence",
    "DefenceError",
    "DefenceImages",
    "Evaluation",
    "EvaluationResult",
    "GRADIENT_STEP",
    "HELD_OUT",
    "L2",
    "Row",
    "add_arguments",
    "evaluation",
    "infer_labels",
    "label_accuracy",
    "leakage_plot",
    "main",
    "match_images",
    "parse_defences",
    "psnr",
    "reconstruction_grid",
    "relative_error",
    "ssim",
    "update_cosine",
    "write",
]

Array = jax.Array
PyTree = Any

# ----------------------------------------------------------------------------------------------
# The attacks: breaching's defaults as the start, with the departures a CPU budget needs


# Geiping et al.: breaching's invertinggradients is cosine similarity + 0.2 total variation (in
# normalised units), signed Adam at 0.1 with tenfold drops, one trial, 24,000 iterations. At a CPU
# budget of 2,000 steps that reached 12.6 dB on the shipped digit (docs/evaluate.md); plain Adam
# with a cosine decay and total variation 0.01 (pixel units, attacks.py's worked example) 23.3 dB.
COSINE = attacks.AttackConfig(steps=2000, restarts=1, learning_rate=0.1, tv_scale=0.01, objective="cosine")
# Zhu et al.: breaching's deepleakage is the L2 distance, L-BFGS, no regulariser, unboxed, 1,200
# iterations (of up to 20 evaluations each in torch's L-BFGS). Boxed, it reached 16.8 dB in 1,000
# L-BFGS steps against 12.0 unboxed; 500 steps keep it near the cosine attack's time.
L2 = attacks.AttackConfig(steps=500, restarts=1, tv_scale=0.0, objective="euclidean", optimizer="lbfgs")
ATTACKS = {"cosine": COSINE, "l2": L2}

# The server's SGD step for the utility: a gradient is applied with this step size, a parameter
# difference (already scaled by the user's learning rate) as it is, as FedAvg does. 0.01: one
# digit's gradient on lenet_zhu has a norm of about 13, and a step of 0.1 along it alone already
# raises the held-out loss by 14 (every digit called a 0), which would hide what the noise costs.
GRADIENT_STEP = 0.01
# Held-out examples (that the user does not hold) the loss change is measured on.
HELD_OUT = 100
# The attacker's user draws no noise; the key it is called with is never used.
_ATTACKER_KEY = 0


# ----------------------------------------------------------------------------------------------
# Defences and their grid


class DefenceError(ValueError):
    """A defence grid that cannot run: one line naming the entry and what is wrong with it."""


# The grid's words for the user config's keys, in the order a defence's name lists them.
DEFENCE_KEYS = {
    "clip": "per_example_clipping",
    "noise": "gradient_noise",
    "epsilon": "gradient_noise calibrated to this epsilon at the evaluation's delta and the case's queries",
    "dist": "distribution (gaussian or laplacian; default gaussian)",
    "input": "input_noise",
    "steps": "num_local_updates (local_update users)",
    "batch": "num_data_points",
}
_INTS = ("steps", "batch")


@dataclasses.dataclass(frozen=True)
class Defence:
    """One defence of the grid: what the user does on top of the case's user config.

    ``clip``, ``noise``, ``distribution`` and ``input_noise`` replace the case's
    ``local_diff_privacy`` (unset: 0, and gaussian); ``epsilon`` asks for the gradient noise that
    reaches it (``accounting.calibrate``); ``steps`` and ``batch`` replace ``num_local_updates`` and
    ``num_data_points`` (unset: the case's). ``Defence()`` is no defence.

    Attributes:
      clip: the per-example clipping bound (0: none).
      noise: the gradient noise's scale (0: none).
      distribution: the gradient noise's, ``"gaussian"`` or ``"laplacian"``.
      epsilon: the epsilon the gradient noise is calibrated to, or ``None`` (needs ``clip > 0``, no ``noise``).
      input_noise: the input noise's scale (0: none).
      steps: the local steps of a ``local_update`` user, or ``None`` (the case's).
      batch: the user's examples, or ``None`` (the case's).

    Raises:
      DefenceError: a negative or non-finite value, an unknown distribution, ``noise`` and
        ``epsilon`` together, or ``epsilon`` without ``clip``.

    Example::

        >>> Defence.parse("clip=1,noise=0.1").name
        'clip=1,noise=0.1'
        >>> Defence.parse("none") == Defence()
        True
        >>> cfg = fu.UserConfig.from_yaml("local_gradient")
        >>> dp = Defence(clip=1.0, input_noise=0.1).user_config(cfg).local_diff_privacy
        >>> dp.per_example_clipping, dp.input_noise, dp.gradient_noise
        (1.0, 0.1, 0.0)
    """

    clip: float = 0.0
    noise: float = 0.0
    distribution: str = "gaussian"
    epsilon: Optional[float] = None
    input_noise: float = 0.0
    steps: Optional[int] = None
    batch: Optional[int] = None

    def __post_init__(self):
        where = f"defence {self.name!r}"
        for key, value in (("clip", self.clip), ("noise", self.noise), ("input", self.input_noise),
                           ("epsilon", self.epsilon)):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise DefenceError(f"{where}: {key} must be a finite number >= 0, got {value!r}")
        for key, value in (("steps", self.steps), ("batch", self.batch)):
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
                raise DefenceError(f"{where}: {key} must be an int >= 1, got {value!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise DefenceError(f"{where}: unknown distribution {self.distribution!r}; expected one of "
                               f"{', '.join(DISTRIBUTIONS)}")
        if self.epsilon is not None:
            if self.noise > 0:
                raise DefenceError(f"{where}: give noise or epsilon, not both")
            if not self.epsilon > 0:
                raise DefenceError(f"{where}: epsilon must be > 0, got {self.epsilon!r}")
            if self.clip <= 0:
                raise DefenceError(f"{where}: epsilon needs clip > 0 (without clipping no noise bounds epsilon)")

    @property
    def name(self) -> str:
        """The defence in the grid's syntax, keys in a fixed order; ``"none"`` for no defence."""
        parts = []
        for key, value in (("clip", self.clip), ("noise", self.noise), ("epsilon", self.epsilon),
                           ("input", self.input_noise)):
            if value:
                parts.append(f"{key}={value:g}")
        if self.distribution != "gaussian":
            parts.append(f"dist={self.distribution}")
        for key, value in (("steps", self.steps), ("batch", self.batch)):
            if value is not None:
                parts.append(f"{key}={value}")
        return ",".join(parts) or "none"

    @classmethod
    def parse(cls, text: str) -> "Defence":
        """``"none"`` or ``key=value[,key=value...]`` with the keys of ``DEFENCE_KEYS``.

        Args:
          text: the defence as ``--defences`` takes it, e.g. ``"clip=1,noise=0.1"`` or ``"none"``.

        Returns:
          The ``Defence``.

        Raises:
          DefenceError: an unknown key (with the closest known one), a value that is not a number,
            a repeated key, or a value ``Defence`` refuses.
        """
        text = str(text).strip()
        if text == "none":
            return cls()
        fields: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not key or not value:
                raise DefenceError(f"defence {text!r}: {item!r} is not key=value (e.g. clip=1,noise=0.1, or none)")
            if key not in DEFENCE_KEYS:
                close = difflib.get_close_matches(key, list(DEFENCE_KEYS), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise DefenceError(f"defence {text!r}: unknown key {key!r}{hint}; keys: {', '.join(DEFENCE_KEYS)}")
            name = {"dist": "distribution", "input": "input_noise"}.get(key, key)
            if name in fields:
                raise DefenceError(f"defence {text!r}: {key} is given twice")
            if key == "dist":
                fields[name] = value
                continue
            try:
                fields[name] = int(value) if key in _INTS else float(value)
            except ValueError:
                kind = "an int" if key in _INTS else "a number"
                raise DefenceError(f"defence {text!r}: {key} must be {kind}, got {value!r}") from None
        return cls(**fields)

    def user_config(self, cfg: UserConfig, noise: Optional[float] = None) -> UserConfig:
        """The case's user config ``cfg`` under this defence (``noise``: the calibrated gradient noise).

        Args:
          cfg: the case's user config.
          noise: the gradient noise to use instead of ``self.noise`` (the one calibrated to
            ``self.epsilon``), or ``None``.

        Returns:
          ``cfg`` with this defence's ``local_diff_privacy`` (replacing the case's), steps and batch.

        Raises:
          DefenceError: ``steps`` for a user that takes one gradient, or a config the user refuses.
        """
        if self.steps is not None and not cfg.is_multi_step:
            raise DefenceError(f"defence {self.name!r}: steps needs a local_update user, the case's is "
                               f"{cfg.user_type} (e.g. user=local_updates)")
        changes: dict[str, Any] = dict(local_diff_privacy=LocalDiffPrivacy(
            gradient_noise=float(self.noise if noise is None else noise), input_noise=float(self.input_noise),
            distribution=self.distribution, per_example_clipping=float(self.clip)))
        if self.steps is not None:
            changes["num_local_updates"] = int(self.steps)
        if self.batch is not None:
            changes["num_data_points"] = int(self.batch)
        try:
            return cfg.replace(**changes)
        except ConfigError as err:
            raise DefenceError(f"defence {self.name!r}: {err}") from None


# Without --defences: no defence, then clipping at 1 with gaussian noise for three epsilons.
DEFAULT_DEFENCES = (Defence(), Defence(clip=1.0, epsilon=100.0), Defence(clip=1.0, epsilon=10.0),
                    Defence(clip=1.0, epsilon=1.0))


def parse_defences(texts: Sequence[str | Defence]) -> tuple[Defence, ...]:
    """The grid ``--defences`` gives: one ``Defence.parse`` per entry (a ``Defence`` is kept as it is).

    Args:
      texts: the entries, ``--defences`` words or ``Defence`` values.

    Returns:
      The grid's ``Defence`` values, in order.

    Raises:
      DefenceError: an empty grid, a bad entry, or the same defence twice.

    Example::

        >>> [d.name for d in parse_defences(["none", "clip=1,epsilon=10", "clip=1,noise=0.3,dist=laplacian"])]
        ['none', 'clip=1,epsilon=10', 'clip=1,noise=0.3,dist=laplacian']
    """
    if not texts:
        raise DefenceError("--defences needs at least one defence (e.g. none clip=1,noise=0.1)")
    grid = tuple(text if isinstance(text, Defence) else Defence.parse(text) for text in texts)
    names = [d.name for d in grid]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DefenceError(f"defence {repeated[0]!r} is in the grid twice")
    return grid


# ----------------------------------------------------------------------------------------------
# Metrics


def _images(x: Any) -> Array:
    """``x`` as float32 images ``[N, H, W, C]`` (one image ``[H, W, C]`` gains the batch axis)."""
    x = jnp.asarray(x, jnp.float32)
    return x[None] if x.ndim == 3 else x


def psnr(reconstruction: Any, truth: Any) -> np.ndarray:
    """PSNR in dB of each image ``[N, H, W, C]`` (or one ``[H, W, C]``) in [0, 1], by dm-pix.

    The reconstruction is clipped to [0, 1] first: the data range is the images' own.

    Args:
      reconstruction: the reconstructed images (clipped to [0, 1] here).
      truth: the original images, in [0, 1], of the same shape.

    Returns:
      ``[N]`` float64 PSNRs.

    Example::

        >>> round(float(psnr(np.full((2, 2, 1), 0.5), np.zeros((2, 2, 1)))[0]), 4)  # 10 log10(1 / 0.25)
        6.0206
    """
    return np.asarray(dm_pix.psnr(jnp.clip(_images(reconstruction), 0.0, 1.0), _images(truth)), np.float64)


def ssim(reconstruction: Any, truth: Any) -> np.ndarray:
    """SSIM of each image ``[N, H, W, C]`` in [0, 1] (dm-pix: 11x11 Gaussian window, sigma 1.5).

    Args:
      reconstruction: the reconstructed images (clipped to [0, 1] here).
      truth: the original images, in [0, 1], of the same shape (at least 11 pixels a side).

    Returns:
      ``[N]`` float64 SSIMs (1: the same image).

    Example::

        >>> float(ssim(np.ones((16, 16, 1)) * 0.3, np.ones((16, 16, 1)) * 0.3)[0])
        1.0
    """
    return np.asarray(dm_pix.ssim(jnp.clip(_images(reconstruction), 0.0, 1.0), _images(truth)), np.float64)


def label_accuracy(inferred: Sequence[int], true: Sequence[int]) -> float:
    """The share of the true labels the inferred ones recover, as multisets (order does not count).

    Args:
      inferred: the labels the attacker read off the update.
      true: the user's labels (at least one).

    Returns:
      The share in [0, 1].

    Raises:
      ValueError: no true labels.

    Example::

        >>> round(label_accuracy([3, 3, 7], [3, 7, 7]), 4)
        0.6667
    """
    inferred, true = [int(v) for v in np.ravel(inferred)], [int(v) for v in np.ravel(true)]
    if not true:
        raise ValueError("label_accuracy needs at least one true label")
    hits = sum(min(inferred.count(v), true.count(v)) for v in set(true))
    return hits / len(true)


def update_cosine(update: PyTree, reference: PyTree) -> float:
    """The cosine between two updates, over all their leaves at once (1: the same direction).

    Args:
      update, reference: two trees of the same structure (the defended and the undefended update).

    Returns:
      The cosine, in [-1, 1].

    Example::

        >>> round(update_cosine({"w": np.array([1.0, 0.0])}, {"w": np.array([1.0, 1.0])}), 4)
        0.7071
    """
    return float(1.0 - attacks.cosine_distance(update, reference))


def relative_error(update: PyTree, reference: PyTree) -> float:
    """``|update - reference| / |reference|`` over all leaves (L2 norms).

    Args:
      update: the defended update.
      reference: the undefended update, of the same tree structure.

    Returns:
      The relative error (0: the same update).

    Example::

        >>> relative_error({"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 4.0])})
        0.75
    """
    diff = jax.tree_util.tree_map(lambda a, b: jnp.asarray(a) - jnp.asarray(b), update, reference)
    return float(fu.privacy.global_norm(diff) / fu.privacy.global_norm(reference))


def match_images(reconstruction: Any, truth: Any) -> np.ndarray:
    """Which reconstruction stands for which original: ``order[i]`` is the one matched to original ``i``.

    An attack returns its images in no particular order; each original is paired with a
    reconstruction by PSNR, the best pair first (greedy), as one image each.

    Args:
      reconstruction: the attack's images ``[N, H, W, C]``.
      truth: the originals ``[N, H, W, C]``.

    Returns:
      ``[N]`` int indices into ``reconstruction``, one per original.

    Example::

        >>> a, b = np.zeros((4, 4, 1)), np.ones((4, 4, 1))
        >>> match_images(np.stack([b, a]), np.stack([a, b])).tolist()
        [1, 0]
    """
    rec, tru = _images(reconstruction), _images(truth)
    scores = np.stack([psnr(jnp.broadcast_to(r, tru.shape), tru) for r in rec])  # [rec, truth]
    order = np.full(len(tru), -1)
    free_rec, free_truth = set(range(len(rec))), set(range(len(tru)))
    for flat in np.argsort(-scores, axis=None, kind="stable"):
        r, t = divmod(int(flat), len(tru))
        if r in free_rec and t in free_truth:
            order[t] = r
            free_rec.discard(r)
            free_truth.discard(t)
    return order


def _last_bias(update: PyTree, num_classes: int) -> Array:
    """The last layer's bias in ``update``: the one 1-D ``bias`` leaf of ``num_classes`` entries."""
    found = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(update)[0]
             if str(getattr(path[-1], "key", "")) == "bias" and jnp.ndim(leaf) == 1 and leaf.shape[0] == num_classes]
    if len(found) != 1:
        raise ValueError(f"cannot read labels off the update: it has {len(found)} 1-D 'bias' leaves of "
                         f"{num_classes} entries, not one")
    return found[0]


def infer_labels(update: PyTree, count: int, num_classes: int, parameter_difference: bool = False) -> np.ndarray:
    """Labels read off a softmax-cross-entropy update, as an attacker reads them.

    One example: the analytic iDLG rule (``attacks.infer_label``: the last bias's gradient is
    negative at the label only; a parameter difference positive). Several: the ``count`` classes
    whose bias entries are the most negative (positive), one example each (a batch that repeats a
    class loses the repeats).

    Args:
      update: the observed update (a gradient or a parameter difference).
      count: the number of examples behind it.
      num_classes: the classes the last layer scores.
      parameter_difference: whether ``update`` is a parameter difference.

    Returns:
      ``[count]`` int labels.

    Example::

        >>> infer_labels({"fc": {"bias": np.array([0.2, -0.5, 0.3])}}, 1, 3).tolist()
        [1]
    """
    bias = _last_bias(update, num_classes)
    if count == 1:
        # attacks.infer_label walks a fixed path; the bias is found here, so hand it over alone.
        return np.asarray([attacks.infer_label({"b": bias}, parameter_difference, ("b",))])
    order = jnp.argsort(-bias if parameter_difference else bias)
    return np.asarray(order[: min(count, num_classes)].tolist() + [int(order[0])] * max(count - num_classes, 0))


# ----------------------------------------------------------------------------------------------
# The evaluation


@dataclasses.dataclass(frozen=True)
class Row:
    """One defence under one attack: privacy, leakage and utility, and the attack's own settings.

    Attributes:
      defence, attack: the defence's name (``Defence.name``) and the attack's (a key of ``ATTACKS``).
      epsilon, epsilon_rdp, delta, queries, guarantee, noise_multiplier: the defended user's
        :class:`fedjax_users.accounting.Guarantee` (PLD and RDP epsilon at ``delta`` over
        ``queries`` queries, its one-line summary; ``inf`` without a guarantee).
      clip, noise, distribution, input_noise, steps, batch: the defended user's config (``steps``
        ``None`` for a single-step user; ``noise`` the calibrated one for an ``epsilon`` defence).
      psnr, ssim: the means over the images of ``psnr_per_image`` and ``ssim_per_image``, each
        reconstruction scored against the original it is matched to (:func:`match_images`).
      psnr_random: what the attack's random start scores: an attack that learnt nothing.
      label_accuracy, labels_true, labels_inferred: the labels read off the update
        (:func:`infer_labels`) against the user's.
      utility_cosine, utility_relative_error: the defended update against the undefended one.
      held_out_loss_before, held_out_loss_after, held_out_loss_change: the held-out loss before and
        after the server's step with the defended update, and its change.
      held_out_loss_change_undefended: the change with the undefended update.
      attack_objective, attack_optimizer, attack_steps, attack_restarts, attack_learning_rate,
        attack_tv_scale, attack_schedule, attack_signed, attack_boxed, attack_seed: the attack's
        :class:`fedjax_users.attacks.AttackConfig`.
      attack_objective_value: the attack's final objective.
      attack_seconds: the attack's time, per defence of its side-by-side group.
    """

    defence: str
    attack: str
    epsilon: float
    epsilon_rdp: float
    delta: float
    queries: int
    guarantee: str
    clip: float
    noise: float
    distribution: str
    input_noise: float
    steps: Optional[int]
    batch: int
    noise_multiplier: float
    psnr: float
    ssim: float
    psnr_per_image: tuple[float, ...]
    ssim_per_image: tuple[float, ...]
    psnr_random: float
    label_accuracy: float
    labels_true: tuple[int, ...]
    labels_inferred: tuple[int, ...]
    utility_cosine: float
    utility_relative_error: float
    held_out_loss_before: float
    held_out_loss_after: float
    held_out_loss_change: float
    held_out_loss_change_undefended: float
    attack_objective: str
    attack_optimizer: str
    attack_steps: int
    attack_restarts: int
    attack_learning_rate: float
    attack_tv_scale: float
    attack_schedule: str
    attack_signed: bool
    attack_boxed: bool
    attack_seed: int
    attack_objective_value: float
    attack_seconds: float


@dataclasses.dataclass(frozen=True)
class DefenceImages:
    """A defence's originals and each attack's reconstructions, matched to them, in [0, 1].

    Attributes:
      defence: the defence's name.
      originals: the user's images ``[N, H, W, C]``.
      reconstructions: ``{attack name: [N, H, W, C]}``, image ``i`` standing for original ``i``.
    """

    defence: str
    originals: np.ndarray  # [N, H, W, C]
    reconstructions: dict[str, np.ndarray]  # attack -> [N, H, W, C], image i standing for original i


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """What ``Evaluation.run`` found: one row per defence and attack, and the images.

    Attributes:
      case: the case's name.
      rows: the :class:`Row` s, defence by defence in the grid's order, attacks in order within each.
      images: one :class:`DefenceImages` per defence.
      settings: ``Evaluation.settings()``.
      seconds: ``setup``, ``attacks`` and ``total`` wall times.
    """

    case: str
    rows: tuple[Row, ...]
    images: tuple[DefenceImages, ...]
    settings: dict
    seconds: dict


@dataclasses.dataclass(frozen=True)
class _Planned:
    defence: Defence
    cfg: UserConfig
    guarantee: accounting.Guarantee


def _strip(cfg: UserConfig, keep_clipping: bool) -> UserConfig:
    """``cfg`` without noise (the attacker's model of the user), or without any defence."""
    dp = cfg.local_diff_privacy
    return cfg.replace(local_diff_privacy=dataclasses.replace(
        dp, gradient_noise=0.0, input_noise=0.0, per_example_clipping=dp.per_example_clipping if keep_clipping else 0.0))


def _shared_update(model, loss, cfg: UserConfig, mean: Array, std: Array, candidate: Array, context: tuple) -> PyTree:
    """What the user of ``cfg`` shares for candidate images in [0, 1] (normalised as the case's data)."""
    params, batch_stats, user_state, labels = context
    run = fu.local_update if cfg.is_multi_step else fu.local_gradient
    shared, _, _ = run(model, fu.ServerPayload(params=params, batch_stats=batch_stats),
                       fu.UserData(inputs=(candidate - mean) / std, labels=labels), cfg,
                       jax.random.key(_ATTACKER_KEY), user_state=user_state, loss=loss, check_finite=False)
    return shared.gradients


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def _cases_by_batch(cfg_case: Any, key: Array, planned: Sequence[_Planned]) -> dict:
    """The case's users (under ``None``) and, for each other batch size a defence asks for, the same
    case built with that many examples (the same ``key``: the same model and data)."""
    from omegaconf import OmegaConf

    from fedjax_users.data import construct_users

    cases = {None: construct_users(cfg_case, key)}
    for p in planned:
        if p.defence.batch is not None and p.defence.batch not in cases:
            cfg_b = OmegaConf.merge(cfg_case, {"user": {"num_data_points": p.defence.batch}})
            cases[p.defence.batch] = construct_users(cfg_b, key)
    return cases


def _normalisation(data_cfg: Any) -> tuple[Array, Array]:
    """The case's input mean and std (0 and 1 where its data is not normalised): images in [0, 1]
    are ``inputs * std + mean``."""
    mean = jnp.asarray(np.asarray(data_cfg.mean if data_cfg.get("normalize") else [0.0], np.float32))
    std = jnp.asarray(np.asarray(data_cfg.std if data_cfg.get("normalize") else [1.0], np.float32))
    return mean, std


def _attacker_groups(planned: Sequence[_Planned]) -> dict[tuple, list[int]]:
    """The defences (indices into ``planned``) whose attacker's model of the user is the same (the
    same batch, the user without noise), in the grid's order: each group is attacked side by side."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(planned):
        groups.setdefault((p.defence.batch, _strip(p.cfg, keep_clipping=True)), []).append(i)
    return groups


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Everything an evaluation is set to, bound once (``evaluation(...)`` builds one); ``run`` computes.

    Args:
      defences: the grid (``parse_defences``).
      attacks: ``(name, attacks.AttackConfig)`` pairs, each run on every defence.
      delta: the delta epsilon is given at.
      unit: ``"example"`` or ``"user"``, as ``accounting.guarantee``.
      relation: ``"replace_one"`` or ``"add_remove"``.
      held_out: how many examples the user does not hold measure the loss change.
      gradient_step: the server's SGD step size for a gradient (a parameter difference is added as
        it is).
    """

    defences: tuple[Defence, ...] = DEFAULT_DEFENCES
    attacks: tuple[tuple[str, attacks.AttackConfig], ...] = tuple(ATTACKS.items())
    delta: float = accounting.DEFAULT_DELTA
    unit: str = "example"
    relation: str = "replace_one"
    held_out: int = HELD_OUT
    gradient_step: float = GRADIENT_STEP

    def __post_init__(self):
        if not self.defences or not all(isinstance(d, Defence) for d in self.defences):
            raise DefenceError("an evaluation needs a grid of Defence values (parse_defences)")
        if not self.attacks:
            raise ValueError("an evaluation needs at least one attack")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.unit not in accounting.UNITS or self.relation not in accounting.RELATIONS:
            raise ValueError(f"unit must be one of {accounting.UNITS} and relation one of {accounting.RELATIONS}")
        if not (isinstance(self.held_out, int) and self.held_out >= 1) or not self.gradient_step > 0:
            raise ValueError(f"held_out must be an int >= 1 and gradient_step > 0, got {self.held_out!r}, "
                             f"{self.gradient_step!r}")

    def settings(self) -> dict:
        """The settings as plain values (for ``evaluation.json``).

        Returns:
          ``{defences: [names], attacks: {name: AttackConfig fields}, delta, unit, relation, held_out,
          gradient_step}``.

        Example::

            >>> evaluation(["none"], attacks=["l2"]).settings()["attacks"]["l2"]["optimizer"]
            'lbfgs'
        """
        return dict(defences=[d.name for d in self.defences],
                    attacks={name: dataclasses.asdict(config) for name, config in self.attacks},
                    delta=self.delta, unit=self.unit, relation=self.relation, held_out=self.held_out,
                    gradient_step=self.gradient_step)

    def plan(self, cfg_case: Any, num_params: Optional[int] = None) -> tuple[_Planned, ...]:
        """Each defence's user config and guarantee, computed before any attack runs.

        Args:
          cfg_case: the composed case (``fedjax_users.data.load_case``).
          num_params: the model's parameter count (Laplace noise needs it); ``None``: from shapes.

        Returns:
          One plan per defence, in the grid's order: the defended user config (its noise calibrated
          for an ``epsilon`` defence) and its :class:`fedjax_users.accounting.Guarantee`.

        Raises:
          DefenceError: a case this cannot evaluate (not images, an aggregate), or a defence its
            user refuses.
        """
        from omegaconf import OmegaConf

        if (cfg_case.get("data") or {}).get("modality") != "vision":
            raise DefenceError("evaluate attacks images: the case's data.modality must be vision")
        cfg = UserConfig.from_dict(OmegaConf.to_container(cfg_case.user, resolve=True))
        if cfg.user_type not in ("local_gradient", "local_update"):
            raise DefenceError(f"evaluate attacks one user (local_gradient or local_update), the case's is "
                               f"{cfg.user_type}")
        sizes = self._privacy_sizes(cfg_case, num_params)
        planned = []
        for defence in self.defences:
            defended = defence.user_config(cfg)
            if defence.epsilon is not None:
                defended = accounting.calibrate(defended, defence.epsilon, self.delta, sizes["queries"], self.unit,
                                                self.relation, num_params=sizes["num_params"])
            g = accounting.guarantee(defended, self.delta, sizes["queries"], self.unit, self.relation,
                                     num_params=sizes["num_params"], input_bounds=sizes["input_bounds"],
                                     input_size=sizes["input_size"], server_sends_buffers=sizes["buffers"])
            planned.append(_Planned(defence, defended, g))
        return tuple(planned)

    @staticmethod
    def _privacy_sizes(cfg_case: Any, num_params: Optional[int]) -> dict:
        from fedjax_users import models

        data = cfg_case.data
        channels, height, width = (int(v) for v in data.shape)
        if num_params is None:
            model = models.for_data(str(cfg_case.model), str(data.get("like") or data.name), int(data.classes), channels)
            num_params = accounting.model_num_params(model, (1, height, width, channels))
        bounds, size = accounting.data_input_bounds(data)
        server = cfg_case.get("server") or {}
        return dict(num_params=num_params, input_bounds=bounds, input_size=size,
                    buffers=bool(server.get("provide_public_buffers", True)),
                    queries=int(server.get("num_queries", 1)))

    def run(self, cfg_case: Any, key: Array, progress: Optional[Any] = None) -> EvaluationResult:
        """Privacy, leakage and utility of every defence on the case's user (the first query).

        The steps: :meth:`plan` (configs and guarantees), the users built (one case per batch size
        of the grid), each defence's update observed (``_observe``), the attacks run side by side
        on the defences one attacker model covers (``_attack``), and the rows scored
        (``_rows_and_images``).

        Args:
          cfg_case: the composed case (``fedjax_users.data.load_case``).
          key: builds the case (``construct_users``) and, folded with 0, draws the user's noise, as
            ``fedjax-users run`` does for its first query.
          progress: a ``fedjax_users.progress.Progress`` to report stages and attacks on, or ``None``.

        Returns:
          The :class:`EvaluationResult`: rows in the grid's order, attacks in ``self.attacks``'s.
        """
        stage = progress.stage if progress is not None else (lambda _: contextlib.nullcontext())
        started = time.perf_counter()
        with stage("checking the grid, calibrating the noise"):
            planned = self.plan(cfg_case)
        with stage("building the users"):
            cases = _cases_by_batch(cfg_case, key, planned)
        mean, std = _normalisation(cfg_case.data)
        classes = int(cfg_case.data.classes)
        user_key = jax.random.fold_in(key, 0)
        with stage("the users' updates, held-out loss"):
            held = _held_out_data(cfg_case, cases[None], self.held_out)
            observed = [self._observe(cases[p.defence.batch], p, user_key, held, classes, mean, std) for p in planned]
        seconds = dict(setup=time.perf_counter() - started)

        groups = _attacker_groups(planned)
        report = progress.counter("attacks", "attacks") if progress is not None else None
        attack_started = time.perf_counter()
        results = self._attack(groups, observed, cases, mean, std, report)
        seconds["attacks"] = time.perf_counter() - attack_started

        rows, images = self._rows_and_images(planned, observed, results)
        seconds["total"] = time.perf_counter() - started
        name = str(cfg_case.get("name") or "case")
        return EvaluationResult(case=name, rows=tuple(rows), images=tuple(images), settings=self.settings(),
                                seconds=seconds)

    def _attack(self, groups: dict[tuple, list[int]], observed: Sequence[dict], cases: dict, mean: Array,
                std: Array, report: Optional[Callable[[int, int], Any]]) -> dict[tuple[int, str], tuple]:
        """Every attack on every group of defences (:func:`_attacker_groups`), a group under one ``vmap``.

        Returns ``{(defence index, attack name): (reconstructions, objective value, seconds per
        defence)}``, the reconstructions as the attack returned them (unclipped, unmatched).
        """
        results: dict[tuple[int, str], tuple[np.ndarray, float, float]] = {}
        done, total = 0, len(groups) * len(self.attacks)
        for (batch, attacker_cfg), members in groups.items():
            case = cases[batch]
            update = functools.partial(_shared_update, case.model, case.loss, attacker_cfg, mean, std)
            stacked = _stack([observed[i]["update"] for i in members])
            labels = jnp.asarray(np.stack([observed[i]["labels_inferred"] for i in members]))
            context = (case.payload.params, case.payload.batch_stats, case.user_state, labels)
            shape = observed[members[0]]["truth"].shape
            for name, config in self.attacks:
                if report is not None:
                    report(done, total)
                t0 = time.perf_counter()
                recs, values = attacks.invert_each(update, stacked, context, shape, config,
                                                   context_axes=(None, None, None, 0))
                recs = np.asarray(jax.block_until_ready(recs))
                per_defence = (time.perf_counter() - t0) / len(members)
                for k, i in enumerate(members):
                    results[(i, name)] = (recs[k], float(values[k]), per_defence)
                done += 1
        if report is not None:
            report(total, total)
        return results

    def _rows_and_images(self, planned: Sequence[_Planned], observed: Sequence[dict],
                         results: dict[tuple[int, str], tuple]) -> tuple[list[Row], list[DefenceImages]]:
        """The rows (defence by defence, attacks in order) and each defence's images, reconstructions
        clipped to [0, 1] and matched to the originals."""
        rows, images = [], []
        for i, p in enumerate(planned):
            obs = observed[i]
            truth = obs["truth"]
            matched = {}
            for name, config in self.attacks:
                rec, value, spent = results[(i, name)]
                rec = np.clip(rec, 0.0, 1.0)[match_images(rec, truth)]
                matched[name] = rec
                rows.append(self._row(p, name, config, obs, rec, value, spent))
            images.append(DefenceImages(p.defence.name, np.asarray(truth), matched))
        return rows, images

    def _observe(self, case, p: _Planned, key: Array, held: Any, classes: int, mean: Array, std: Array) -> dict:
        """The defended user's update, the undefended one, the labels read off it, and the utility."""
        run = fu.local_update if p.cfg.is_multi_step else fu.local_gradient
        payload = case.payload
        shared = run(case.model, payload, case.data, p.cfg, key, user_state=case.user_state, loss=case.loss)[0]
        plain = run(case.model, payload, case.data, _strip(p.cfg, keep_clipping=False), key,
                    user_state=case.user_state, loss=case.loss)[0]
        truth = np.asarray(case.data.inputs * std + mean)
        count = int(case.data.labels.shape[0])
        before = _held_out_loss(case, payload.params, held)
        after = _held_out_loss(case, self._apply(payload.params, shared.gradients, p.cfg), held)
        after_plain = _held_out_loss(case, self._apply(payload.params, plain.gradients, p.cfg), held)
        return dict(
            update=shared.gradients, truth=truth, labels_true=np.asarray(case.data.labels),
            labels_inferred=infer_labels(shared.gradients, count, classes, p.cfg.is_multi_step),
            utility_cosine=update_cosine(shared.gradients, plain.gradients),
            utility_relative_error=relative_error(shared.gradients, plain.gradients),
            before=before, after=after, change_undefended=after_plain - before,
        )

    def _apply(self, params: PyTree, update: PyTree, cfg: UserConfig) -> PyTree:
        """The server's SGD step: a parameter difference added, a gradient times ``-gradient_step``."""
        scale = 1.0 if cfg.is_multi_step else -self.gradient_step
        return jax.tree_util.tree_map(lambda p, u: p + scale * u, params, update)

    def _row(self, p: _Planned, name: str, config: attacks.AttackConfig, obs: dict, rec: np.ndarray,
             value: float, spent: float) -> Row:
        truth = obs["truth"]
        dp = p.cfg.local_diff_privacy
        scores, structure = psnr(rec, truth), ssim(rec, truth)
        start = jax.random.uniform(jax.random.key(config.seed), (config.restarts,) + truth.shape)[0]
        g = p.guarantee
        return Row(
            defence=p.defence.name, attack=name, epsilon=g.epsilon, epsilon_rdp=g.epsilon_rdp, delta=g.delta,
            queries=g.num_queries, guarantee=g.summary(), clip=dp.per_example_clipping, noise=dp.gradient_noise,
            distribution=dp.distribution, input_noise=dp.input_noise,
            steps=p.cfg.num_local_updates if p.cfg.is_multi_step else None, batch=p.cfg.num_data_points,
            noise_multiplier=g.noise_multiplier if g.finite else math.inf,
            psnr=float(np.mean(scores)), ssim=float(np.mean(structure)),
            psnr_per_image=tuple(float(v) for v in scores), ssim_per_image=tuple(float(v) for v in structure),
            # The attack's own random start, scored: what a reconstruction that learnt nothing scores.
            psnr_random=float(np.mean(psnr(start, truth))),
            label_accuracy=label_accuracy(obs["labels_inferred"], obs["labels_true"]),
            labels_true=tuple(int(v) for v in obs["labels_true"]),
            labels_inferred=tuple(int(v) for v in obs["labels_inferred"]),
            utility_cosine=obs["utility_cosine"], utility_relative_error=obs["utility_relative_error"],
            held_out_loss_before=obs["before"], held_out_loss_after=obs["after"],
            held_out_loss_change=obs["after"] - obs["before"],
            held_out_loss_change_undefended=obs["change_undefended"],
            attack_objective=config.objective, attack_optimizer=config.optimizer, attack_steps=config.steps,
            attack_restarts=config.restarts, attack_learning_rate=config.learning_rate,
            attack_tv_scale=config.tv_scale, attack_schedule=config.schedule, attack_signed=config.signed,
            attack_boxed=config.boxed, attack_seed=config.seed, attack_objective_value=value, attack_seconds=spent,
        )


def _held_out_data(cfg_case: Any, case: Any, count: int) -> fu.UserData:
    """``count`` examples of the case's split that its user does not hold, in the split's order."""
    from fedjax_users.data import load_examples, normalize
    from fedjax_users.data.cases import user_partition

    cfg_data = cfg_case.data
    examples = load_examples(cfg_data)
    held = set(int(i) for u in case.user_indices for i in user_partition(examples, cfg_data, u))
    others = np.asarray([i for i in range(len(examples)) if i not in held][:count], np.int64)
    if len(others) == 0:
        raise DefenceError("no held-out examples: the case's user holds every example of its split")
    inputs, labels = examples.take(others)
    if cfg_data.get("normalize", False):
        inputs = normalize(inputs, cfg_data.mean, cfg_data.std)
    dtype = jax.tree_util.tree_leaves(case.payload.params)[0].dtype
    return fu.UserData(inputs=jnp.asarray(inputs, dtype), labels=jnp.asarray(labels))


@functools.partial(jax.jit, static_argnames=("model", "loss"))
def _loss_jit(model, loss, params, stats, inputs, labels):
    logits, _ = semantics.apply_model(model, params, stats, inputs, train=False)
    return losses.mean_loss(loss(logits, labels))


def _held_out_loss(case: Any, params: PyTree, held: fu.UserData) -> float:
    """The mean loss of the held-out examples, BatchNorm in eval mode (server buffers, else the user's)."""
    stats = case.payload.batch_stats if case.payload.batch_stats is not None else (case.user_state or {})
    return float(_loss_jit(case.model, case.loss, params, stats, held.inputs, held.labels))


def evaluation(defences: Optional[Sequence[str | Defence]] = None, attacks: Sequence[str] = tuple(ATTACKS),
               steps: Optional[int] = None, restarts: Optional[int] = None, seed: Optional[int] = None,
               **options: Any) -> Evaluation:
    """An :class:`Evaluation` from hyperparameters, as ``optax.adam(...)`` builds an optimizer.

    Args:
      defences: the grid as ``--defences`` words (``"none"``, ``"clip=1,noise=0.1"``, ...) or
        ``Defence`` values; ``None``: ``DEFAULT_DEFENCES``.
      attacks: names of ``ATTACKS`` (``"cosine"``, ``"l2"``).
      steps, restarts, seed: replace every attack's own (``None``: each attack's default).
      **options: ``Evaluation``'s other fields (``delta``, ``unit``, ``relation``, ``held_out``,
        ``gradient_step``).

    Returns:
      The ``Evaluation``; ``.run(cfg_case, key)`` computes it.

    Raises:
      DefenceError: a bad grid (before anything is computed). ValueError: an unknown attack.

    Example::

        >>> ev = evaluation(["none", "clip=1,epsilon=10"], attacks=["cosine"], steps=100)
        >>> [d.name for d in ev.defences], ev.attacks[0][1].steps
        (['none', 'clip=1,epsilon=10'], 100)
    """
    grid = DEFAULT_DEFENCES if defences is None else parse_defences(defences)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"unknown attack {unknown[0] if unknown else None!r}; expected one of {', '.join(ATTACKS)}")
    changes = {k: v for k, v in (("steps", steps), ("restarts", restarts), ("seed", seed)) if v is not None}
    chosen = tuple((a, dataclasses.replace(ATTACKS[a], **changes)) for a in dict.fromkeys(attacks))
    return Evaluation(defences=grid, attacks=chosen, **options)


# ----------------------------------------------------------------------------------------------
# Output


CSV_FILE, JSON_FILE, PLOT_FILE, GRID_FILE = "evaluation.csv", "evaluation.json", "evaluation.png", "reconstructions.png"


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf; "inf" reads back with float()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _against_epsilon(ax: Any, rows: Sequence[Row], value: Callable[[Row], float], colour: str, label: str) -> None:
    """``value`` of each row against its epsilon: points for finite epsilons, a dashed level for the others."""
    points = sorted((r.epsilon, value(r)) for r in rows if math.isfinite(r.epsilon))
    if points:
        ax.plot(*zip(*points), marker="o", color=colour, label=label)
    for r in rows:
        if not math.isfinite(r.epsilon):
            ax.axhline(value(r), color=colour, linestyle="--", linewidth=1)
            ax.annotate(f"{r.defence}: {value(r):.3g}", (0.01, value(r)), xycoords=("axes fraction", "data"),
                        fontsize=7, color=colour, va="bottom")


def leakage_plot(result: EvaluationResult, path: str | os.PathLike) -> Any:
    """Leakage (PSNR) against epsilon, one line per attack, and utility against epsilon beside it.

    Defences with a finite epsilon are points on a log axis; those without (no defence, clipping
    alone, steps alone) are dashed levels labelled with their name, and the PSNR of a random image
    a grey dotted line: what an attack that learnt nothing scores. The utility panel draws the
    cosine of the defended update to the undefended one and, on its own axis, the change of the
    held-out loss after the server's step.

    Args:
      result: what ``Evaluation.run`` returned.
      path: the picture (its extension names the format).

    Returns:
      The drawn ``matplotlib.figure.Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    leak, util = figure.subplots(1, 2)
    attack_names = list(dict.fromkeys(r.attack for r in result.rows))
    for c, name in enumerate(attack_names):
        _against_epsilon(leak, [r for r in result.rows if r.attack == name], lambda r: r.psnr, f"C{c}",
                         f"{name} attack")
    random_psnr = float(np.mean([r.psnr_random for r in result.rows]))
    leak.axhline(random_psnr, color="grey", linestyle=":", label=f"random image ({random_psnr:.1f} dB)")
    leak.set_ylabel("reconstruction PSNR (dB; higher leaks more)")
    leak.set_title("leakage against epsilon", fontsize=10)
    # One row per defence for the utility (it does not depend on the attack).
    first = [r for r in result.rows if r.attack == attack_names[0]]
    _against_epsilon(util, first, lambda r: r.utility_cosine, "C2", "cosine to the undefended update")
    util.set_ylabel("cosine to the undefended update (1: unchanged)")
    loss = util.twinx()
    _against_epsilon(loss, first, lambda r: r.held_out_loss_change, "C3", "held-out loss change after one step")
    loss.set_ylabel("held-out loss change after one server step (lower is better)")
    util.set_title("utility against epsilon", fontsize=10)
    for ax in (leak, util):
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (log scale; smaller is more private)")
        ax.grid(True, which="both", alpha=0.3)
    leak.legend(fontsize=7, loc="center right")
    handles = util.get_legend_handles_labels()[0] + loss.get_legend_handles_labels()[0]
    util.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")
    row = result.rows[0]
    figure.suptitle(f"{result.case}: {row.batch} example{'s' if row.batch != 1 else ''}, epsilon at delta "
                    f"{row.delta:g} for {row.queries} quer{'y' if row.queries == 1 else 'ies'}", fontsize=10)
    figure.savefig(os.fspath(path), dpi=100, facecolor="white")
    return figure


def reconstruction_grid(result: EvaluationResult, path: str | os.PathLike) -> Any:
    """Originals and reconstructions, one row per defence (``plots.image_grid``), into ``path``.

    Each row holds, for each image the user holds, the original and then each attack's
    reconstruction of it, titled with its PSNR, SSIM and the label the attacker read off the update
    (for several images: the labels in the order read, not matched to the images).

    Args:
      result: what ``Evaluation.run`` returned.
      path: the picture (its extension names the format).

    Returns:
      The drawn ``matplotlib.figure.Figure``.
    """
    from fedjax_users import plots

    by_key = {(r.defence, r.attack): r for r in result.rows}
    attack_names = list(dict.fromkeys(r.attack for r in result.rows))
    rows, titles, labels, longest = [], [], [], []
    for entry in result.images:
        row, title = [], []
        columns = []
        for i, original in enumerate(entry.originals):
            first = by_key[(entry.defence, attack_names[0])]
            row.append(original)
            title.append(f"label {first.labels_true[i]}")
            columns.append(f"original {i}" if len(entry.originals) > 1 else "original")
            for name in attack_names:
                r = by_key[(entry.defence, name)]
                row.append(entry.reconstructions[name][i])
                title.append(f"{r.psnr_per_image[i]:.1f} dB, SSIM {r.ssim_per_image[i]:.2f}\n"
                             f"label read: {r.labels_inferred[i] if len(r.labels_inferred) > i else '-'}")
                columns.append(f"{name} attack")
        eps = by_key[(entry.defence, attack_names[0])].epsilon
        labels.append(f"{entry.defence}\neps {eps:.3g}")
        rows.append(row)
        titles.append(title)
        longest = columns if len(columns) > len(longest) else longest
    # Defences of different batch sizes hold different numbers of images: shorter rows end empty.
    for row, title in zip(rows, titles):
        title.extend([""] * (len(longest) - len(row)))
        row.extend([None] * (len(longest) - len(row)))
    return plots.image_grid(rows, path, titles=titles, row_labels=labels, column_labels=longest)


def write(result: EvaluationResult, folder: str, config: Optional[dict] = None) -> list[str]:
    """Write ``evaluation.csv``, ``evaluation.json`` and the two pictures (and ``config.yaml``) into ``folder``.

    Args:
      result: what ``Evaluation.run`` returned.
      folder: an existing folder.
      config: the composed case as plain values, written as ``config.yaml`` (``None``: not written).

    Returns:
      The paths written.
    """
    from fedjax_users import runs

    paths = []
    if config is not None:
        from omegaconf import OmegaConf

        paths.append(os.path.join(folder, "config.yaml"))
        with open(paths[-1], "w") as handle:
            handle.write(OmegaConf.to_yaml(OmegaConf.create(config)))
    rows = [dataclasses.asdict(r) for r in result.rows]
    paths.append(os.path.join(folder, CSV_FILE))
    with open(paths[-1], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
                             if isinstance(v, tuple) else v for k, v in row.items()})
    paths.append(os.path.join(folder, JSON_FILE))
    with open(paths[-1], "w") as handle:
        json.dump(dict(case=result.case, settings=result.settings, seconds=result.seconds, versions=runs.versions(),
                       rows=[{k: _plain(v) for k, v in row.items()} for row in rows]), handle, indent=1)
        handle.write("\n")
    paths.append(os.path.join(folder, PLOT_FILE))
    leakage_plot(result, paths[-1])
    paths.append(os.path.join(folder, GRID_FILE))
    reconstruction_grid(result, paths[-1])
    return paths


# ----------------------------------------------------------------------------------------------
# fedjax-users evaluate


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``fedjax-users evaluate`` on ``parser`` (a subparser of the ``fedjax-users`` command).

    Args:
      parser: the parser to add them to (changed in place).

    Returns:
      ``parser``.

    Example::

        >>> args = add_arguments(argparse.ArgumentParser()).parse_args(["--defences", "none", "clip=1,noise=0.1"])
        >>> args.case, args.defences, args.attacks
        (None, ['none', 'clip=1,noise=0.1'], ['cosine', 'l2'])
    """
    parser.add_argument("case", nargs="?", help="a case by name or a case YAML file (default: the bundled digits case)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. user=local_gradient model=lenet_zhu")
    parser.add_argument("--defences", nargs="+", default=None, metavar="DEFENCE",
                        help="the grid: none, or key=value[,key=value...] with keys " + ", ".join(DEFENCE_KEYS)
                             + " (e.g. --defences none clip=1,noise=0.1 clip=1,epsilon=10,dist=laplacian steps=4); "
                             "default: none clip=1,epsilon=100 clip=1,epsilon=10 clip=1,epsilon=1")
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS),
                        help="cosine: Geiping et al. (cosine distance, total variation, Adam); "
                             "l2: Zhu et al. (L2 distance, L-BFGS)")
    parser.add_argument("--attack-steps", type=int, default=None,
                        help=f"steps of every attack (default: cosine {COSINE.steps}, l2 {L2.steps})")
    parser.add_argument("--restarts", type=int, default=None, help="random restarts of every attack (default 1)")
    parser.add_argument("--delta", type=float, default=accounting.DEFAULT_DELTA, help="delta of epsilon")
    parser.add_argument("--unit", choices=accounting.UNITS, default="example", help="what epsilon protects")
    parser.add_argument("--relation", choices=accounting.RELATIONS, default="replace_one", help="neighbouring relation")
    parser.add_argument("--held-out", type=int, default=HELD_OUT, help="held-out examples for the loss change")
    parser.add_argument("--step", type=float, default=GRADIENT_STEP,
                        help="the server's SGD step size for a gradient, for the loss change (a parameter difference "
                             "is added as it is)")
    parser.add_argument("--out", default=None, help="the run folder (default: runs/evaluate-<case>-<timestamp>/)")
    parser.add_argument("--force", action="store_true", help="write into an --out that already exists")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the case (model, data) and the user's noise")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _fmt(value: float, spec: str = ".3g") -> str:
    return "inf" if value == math.inf else format(value, spec)


def main(args: argparse.Namespace, case_path: Optional[str], overrides: Sequence[str]) -> int:
    """``fedjax-users evaluate``: the grid checked, the case run, the table printed, the run folder written.

    Mistakes (a bad grid, case or folder) raise ``ValueError`` before anything is computed; the
    ``fedjax-users`` command prints them as one line and exits 2.

    Args:
      args: ``add_arguments``'s arguments, parsed.
      case_path: the case file (``None``: the bundled digits case), resolved from ``args.case`` by
        the ``fedjax-users`` command as for ``run`` (which is why it is not resolved here: this
        module does not import the command's).
      overrides: the ``key=value`` overrides.

    Returns:
      The exit status, 0.
    """
    from omegaconf import OmegaConf

    from fedjax_users import runs
    from fedjax_users.data import load_case
    from fedjax_users.progress import Progress

    ev = evaluation(args.defences, args.attacks, steps=args.attack_steps, restarts=args.restarts, delta=args.delta,
                    unit=args.unit, relation=args.relation, held_out=args.held_out,
                    gradient_step=args.step)
    cfg_case = load_case(case_path, list(overrides))
    name = str(cfg_case.get("name") or os.path.splitext(os.path.basename(case_path or "default"))[0])
    if args.out is not None and args.out.endswith(".msgpack"):
        raise ValueError(f"--out {args.out}: evaluate writes a folder (tables and pictures), not a .msgpack file")
    output = runs.prepare(args.out, f"evaluate-{name}", force=args.force)
    with Progress(quiet=args.quiet) as progress:
        result = ev.run(cfg_case, jax.random.key(args.seed), progress)
    print(f"case        {name}{' with ' + ' '.join(overrides) if overrides else ''}")
    first = result.rows[0]
    print(f"user        {cfg_case.user.user_type}, {first.batch} example(s); labels {list(first.labels_true)}; "
          f"epsilon at delta {ev.delta:g}, {first.queries} quer{'y' if first.queries == 1 else 'ies'}, per {ev.unit}, "
          f"{ev.relation}")
    for name, config in ev.attacks:
        print(f"attack      {name}: {config.objective}, {config.optimizer}, {config.steps} steps, "
              f"{config.restarts} restart(s), step {config.learning_rate:g} ({config.schedule}), "
              f"tv {config.tv_scale:g}")
    width = max(len("defence"), *(len(r.defence) for r in result.rows)) + 2
    header = (f"{'defence':<{width}}{'attack':<8}{'epsilon':>9}{'noise':>9}{'PSNR':>7}{'SSIM':>6}{'labels':>7}"
              f"{'cosine':>8}{'rel.err':>9}{'loss chg':>10}{'s/def':>7}")
    print(header)
    for r in result.rows:
        print(f"{r.defence:<{width}}{r.attack:<8}{_fmt(r.epsilon):>9}{r.noise:>9.3g}{r.psnr:>7.2f}{r.ssim:>6.2f}"
              f"{r.label_accuracy:>7.2f}{r.utility_cosine:>8.3f}{r.utility_relative_error:>9.3g}"
              f"{r.held_out_loss_change:>10.3g}{r.attack_seconds:>7.1f}")
    print(f"random      an image the attack learnt nothing from (its random start) scores {first.psnr_random:.2f} dB")
    output.create()
    paths = write(result, output.folder, OmegaConf.to_container(cfg_case, resolve=True))
    print(f"saved       {', '.join(paths)}")
    print(f"time        {result.seconds['total']:.1f} s ({result.seconds['attacks']:.1f} s attacking)")
    return 0

"""The parity check: breaching's own user class against the drop-in user, on one model, weights and data.

:func:`check_parity` runs breaching's user class (given by the caller) and the drop-in user of
:mod:`fedjax_users.interop.breaching` on the same torch model, weights and data, and compares
everything the server and an attacker see: gradients or parameter differences and buffers (the
worst error relative to the reference's largest entry), metadata and true data (exactly). A
float32 miss is adjudicated against the reference's float64 result and its own float32 spread
(``docs/parity.md``). It returns a :class:`ParityReport` and raises :class:`ParityError` naming the
worst entry when the bound is missed. ``python -m parity`` is a grid over :func:`compare`, the
same check on a prepared :class:`Setting`.

The pieces the grid (``parity/``) builds on are public: :class:`Errors` (the bookkeeping of
errors and mismatches), :func:`jitter` (the perturbation behind the reference-spread yardstick),
:func:`run_reference` and :func:`run_drop_in` (one side's outputs, for digests of our side alone).

breaching's code is never imported here: the reference classes come from the caller.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
import torch

from fedjax_users.config import UserConfig
from fedjax_users.interop.breaching import (
    MultiUserAggregate,
    UserMultiStep,
    UserSingleStep,
    data_key_of,
    has_noise,
    user_config,
)
from fedjax_users.validation import InputError

__all__ = [
    "DIVERGED",
    "FLOAT32_BOUND",
    "FLOAT64_BOUND",
    "KS_SAMPLES",
    "NOISE_P_VALUE",
    "NOISE_RETRY_DRAWS",
    "NOISE_SEED_OFFSET",
    "SPREAD_DRAWS",
    "SPREAD_PERTURBATION",
    "SPREAD_PERTURBATION_FLOAT64",
    "Errors",
    "ParityError",
    "ParityReport",
    "Setting",
    "check_parity",
    "compare",
    "compare_noise",
    "jitter",
    "ks_sample",
    "noise_residual",
    "reference_user",
    "run_drop_in",
    "run_reference",
    "server_payload",
    "spread_perturbation",
]

TorchData = Mapping[str, torch.Tensor]
# One user's outputs, as breaching's ``compute_local_updates`` returns them.
Outputs = tuple[dict, dict]

FLOAT32_BOUND = 1e-5
FLOAT64_BOUND = 1e-10
# A gradient or parameter difference beyond this magnitude means the local training diverged.
DIVERGED = 1e6
# How far rounding alone can move the reference's result (see ``_reference_spread``): its run is
# repeated on weights, buffers and inputs perturbed by this relative amount (about the forward error
# of either framework a few layers deep, ~8 ulp of the run's precision), ``SPREAD_DRAWS`` times.
SPREAD_PERTURBATION = 5e-7
SPREAD_PERTURBATION_FLOAT64 = 1e-15
SPREAD_DRAWS = 4
KS_SAMPLES = 20_000
# A noise comparison fails below this KS p-value (on its first draw, then on fresh draws pooled).
NOISE_P_VALUE = 1e-3
# Fresh draws a side that judge a first draw's miss (``compare_noise``).
NOISE_RETRY_DRAWS = 4
# The noisy runs draw from a seed apart from the clean runs' (which draw nothing).
NOISE_SEED_OFFSET = 7


# ----------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """Outcome of one comparison: worst errors over everything compared, and the bound they must meet.

    Attributes:
      name: the comparison's name (the grid's case name).
      max_abs: the largest absolute error of any tensor.
      max_rel: the largest error relative to its list's largest reference entry.
      bound: the relative error allowed.
      passed: whether the comparison passed (within the bound, or on a yardstick of a miss).
      detail: the first mismatches and the yardsticks' and noise checks' lines.
      ours_vs_float64: our distance to the reference's float64 result; set when a float32 run
        missed the bound and the float64 reference was the yardstick.
      reference_vs_float64: the reference's own float32 distance to it, set with it.
      reference_spread: set when that was missed too (or a float64 run missed the bound): the
        reference's worst distance over its runs on inputs perturbed by a few ulp.
      worst: the entry of ``max_rel`` (``"gradients[3] conv1.weight"``).

    Example:
      >>> report = ParityReport("lenet/local_gradient", 1e-7, 2e-6, 1e-5, True)
      >>> report.as_dict()["max_rel"], report.passed
      (2e-06, True)
    """

    name: str
    max_abs: float
    max_rel: float
    bound: float
    passed: bool
    detail: str = ""
    ours_vs_float64: Optional[float] = None
    reference_vs_float64: Optional[float] = None
    reference_spread: Optional[float] = None
    worst: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form.

        Returns:
          The report's fields by name.
        """
        return dataclasses.asdict(self)


class ParityError(AssertionError):
    """The drop-in user missed the bound against the reference; the message names the worst entry.

    Args:
      report: the failed comparison, kept as ``.report``.

    Example:
      >>> str(ParityError(ParityReport("case", 1e-3, 2e-3, 1e-5, False, "", worst="gradients[0] fc.weight")))
      'case: max relative error 2.000e-03 (bound 1e-05) at gradients[0] fc.weight; '
    """

    def __init__(self, report: ParityReport):
        self.report = report
        super().__init__(
            f"{report.name}: max relative error {report.max_rel:.3e} (bound {report.bound:.0e}) at "
            f"{report.worst or 'no tensor'}; {report.detail}")


# ----------------------------------------------------------------------------------------------
# Error bookkeeping


def _numpy64(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


class Errors:
    """Accumulates the max abs / relative error of tensors and the exact checks of metadata.

    Attributes:
      max_abs: the largest absolute error of any tensor compared so far.
      max_rel: the largest error relative to its list's largest reference entry.
      worst: the entry of ``max_rel`` (``"gradients[3] conv1.weight"``).
      mismatches: one line per exact check that failed (shape, count, metadata, divergence).

    Example:
      >>> errors = Errors()
      >>> errors.tensor_lists("gradients", [np.array([1.0, 2.0])], [np.array([1.0, 2.5])], names=["fc.bias"])
      >>> errors.max_abs, errors.max_rel, errors.worst
      (0.5, 0.2, 'gradients[0] fc.bias')
      >>> errors.equal("metadata.num_users", 2, 3)
      >>> errors.mismatches
      ['metadata.num_users: 2 vs 3']
    """

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.worst = ""
        self.mismatches: list[str] = []

    def tensors(self, what: str, ours: Any, theirs: Any) -> None:
        """One tensor pair, as a list of one (see :meth:`tensor_lists`).

        Args:
          what: the name the entry is reported under.
          ours: our tensor or array.
          theirs: the reference's.
        """
        self.tensor_lists(what, [ours], [theirs])

    def tensor_lists(self, what: str, ours: Optional[Sequence], theirs: Optional[Sequence],
                     names: Optional[Sequence[str]] = None) -> None:
        """Max abs error, and that error relative to the largest reference entry of the whole list.

        The scale is the whole gradient's (all tensors), not each tensor's: a tensor whose exact
        value is zero (a conv bias before train-mode BatchNorm) holds only rounding noise, and its
        own maximum would turn 1e-7 of noise into a huge ratio.

        Args:
          what: the list's name (``"gradients"``).
          ours: our tensors or arrays, or ``None`` when we send none.
          theirs: the reference's, in the same order, or ``None``.
          names: a name per entry, to say which one is worst (``model.named_parameters()``).
        """
        pairs = self._pairs(what, ours, theirs)
        if not pairs:
            return
        errors = [float(np.max(np.abs(a - b))) for _, a, b in pairs]
        scale = max(float(np.max(np.abs(b))) for _, _, b in pairs)
        if not np.isfinite(scale) or scale > DIVERGED:
            # Overflowing numbers agree or disagree by chance: such a case must change, not pass.
            self.mismatches.append(f"{what}: the reference diverged (max |entry| {scale:.3g})")
        at = int(np.argmax(errors))
        err = errors[at]
        self.max_abs = max(self.max_abs, err)
        rel = err / scale if scale > 0 else err
        if rel > self.max_rel or not self.worst:
            index = pairs[at][0]
            self.worst = f"{what}[{index}]" + (f" {names[index]}" if names else "")
        self.max_rel = max(self.max_rel, rel)

    def _pairs(self, what: str, ours: Optional[Sequence], theirs: Optional[Sequence]) -> list:
        """The non-empty ``(index, ours, theirs)`` float64 pairs; a missing list, another count or
        another shape is a mismatch instead."""
        if theirs is None or ours is None:
            if (theirs is None) != (ours is None):
                self.mismatches.append(f"{what}: {'missing' if ours is None else 'unexpected'}")
            return []
        if len(ours) != len(theirs):
            self.mismatches.append(f"{what}: {len(ours)} vs {len(theirs)} entries")
            return []
        pairs = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            a, b = _numpy64(a), _numpy64(b)
            if a.shape != b.shape:
                self.mismatches.append(f"{what}[{i}]: shape {a.shape} vs {b.shape}")
            elif a.size:
                pairs.append((i, a, b))
        return pairs

    def equal(self, what: str, ours: Any, theirs: Any) -> None:
        """An exact check: arrays element by element, anything else with ``==``.

        Args:
          what: the name the mismatch is reported under.
          ours: our value (a tensor, array, number, string or ``None``).
          theirs: the reference's.
        """
        if torch.is_tensor(theirs) or torch.is_tensor(ours) or isinstance(ours, (jax.Array, np.ndarray)):
            if ours is None or theirs is None or not np.array_equal(np.asarray(ours), np.asarray(theirs)):
                self.mismatches.append(f"{what}: {ours} vs {theirs}")
        elif ours != theirs:
            self.mismatches.append(f"{what}: {ours!r} vs {theirs!r}")


# ----------------------------------------------------------------------------------------------
# Running both sides


@dataclasses.dataclass(frozen=True, eq=False)
class Setting:
    """What a comparison runs: the reference class, the loss, the user config and payload, the Flax side.

    Attributes:
      reference: breaching's ``UserSingleStep`` / ``UserMultiStep`` class (for an aggregate, a
        class of the module whose single users are averaged).
      loss: the torch loss both sides use.
      cfg: the user config (with its noise, if any: one kind at a time).
      buffers_sent: whether the server sends the model's buffers.
      queries: how many times each user is queried.
      flax_model: the Flax counterpart of the torch model (``None``: by ``model.name``).
      cfg_data: breaching's data config, which names the Flax model when ``flax_model`` is ``None``.

    Raises:
      InputError: ``cfg`` has gradient and input noise both.

    Example:
      >>> setting = Setting(object, torch.nn.CrossEntropyLoss(), UserConfig.from_dict(
      ...     {"user_type": "local_gradient", "num_data_points": 4, "local_diff_privacy": {"gradient_noise": 0.1}}))
      >>> setting.noisy, setting.clean_cfg.local_diff_privacy.gradient_noise, setting.aggregate
      (True, 0.0, False)
    """

    reference: type
    loss: Any
    cfg: UserConfig
    buffers_sent: bool = False
    queries: int = 1
    flax_model: Any = None
    cfg_data: Any = None

    def __post_init__(self) -> None:
        ldp = self.cfg.local_diff_privacy
        if ldp.gradient_noise > 0 and ldp.input_noise > 0:
            raise InputError("check_parity compares one kind of noise at a time: gradient_noise or input_noise")

    @property
    def aggregate(self) -> bool:
        """Whether the users are aggregated (compared with the mean of the reference's single users)."""
        return self.cfg.is_aggregate

    @property
    def noisy(self) -> bool:
        """Whether ``cfg`` adds noise (compared by its distribution after the noise-free run)."""
        return has_noise(self.cfg)

    @property
    def clean_cfg(self) -> UserConfig:
        """``cfg`` with its noise off: what the exact comparison runs."""
        ldp = dataclasses.replace(self.cfg.local_diff_privacy, gradient_noise=0.0, input_noise=0.0)
        return self.cfg.replace(local_diff_privacy=ldp)


def _reference_class(reference: Any, cfg: UserConfig) -> type:
    """The reference class one user runs: the one given, or for an aggregate its module's single users.

    breaching's own ``MultiUserAggregate`` averages exponentially (``docs/semantics.md``): an
    aggregate is compared with the mean of the single users it is built from.
    """
    cls = reference if isinstance(reference, type) else type(reference)
    if not cfg.is_aggregate:
        return cls
    module = sys.modules[cls.__module__]
    return getattr(module, "UserMultiStep" if cfg.is_multi_step else "UserSingleStep")


def _setup_of(model: torch.nn.Module) -> dict:
    dtype = next(iter(model.parameters())).dtype
    return dict(device=torch.device("cpu"), dtype=dtype)


def _cfg_user(cfg: UserConfig):
    from omegaconf import OmegaConf

    return OmegaConf.create(cfg.to_dict())


def _dataloader(data: TorchData) -> list:
    return [dict(data)]


def reference_user(reference: type, model: torch.nn.Module, loss: Any, data: TorchData, cfg: UserConfig) -> Any:
    """A fresh reference user (one dataloader holding ``data``), built as breaching builds its users.

    Args:
      reference: breaching's user class (``UserSingleStep`` / ``UserMultiStep``).
      model: the torch model; its dtype is the user's (CPU).
      loss: the torch loss.
      data: the user's data dict (``inputs`` NCHW or ``input_ids``, ``labels``).
      cfg: the user config, handed over as breaching's OmegaConf ``cfg_user``.

    Returns:
      ``reference(model, loss, [data], setup, idx=0, cfg_user=...)``.
    """
    return reference(model, loss, _dataloader(data), _setup_of(model), idx=0, cfg_user=_cfg_user(cfg))


def server_payload(model: torch.nn.Module, buffers_sent: bool) -> dict:
    """breaching's payload: parameter and buffer lists (buffers only if the server sends them).

    Args:
      model: the torch model whose state the server sends.
      buffers_sent: whether the payload holds the buffers.

    Returns:
      ``{"parameters": [...], "buffers": [...] or None}``, copies detached from ``model``.

    Example:
      >>> payload = server_payload(torch.nn.Linear(2, 1), buffers_sent=False)
      >>> [tuple(p.shape) for p in payload["parameters"]], payload["buffers"]
      ([(1, 2), (1,)], None)
    """
    parameters = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()] if buffers_sent else None
    return dict(parameters=parameters, buffers=buffers)


def run_reference(setting: Setting, model: torch.nn.Module, users_data: Sequence[TorchData],
                  cfg: UserConfig) -> list[Outputs]:
    """Shared and true data of each reference user: fresh user objects, each queried ``setting.queries`` times.

    Args:
      setting: the comparison's reference class, loss and payload.
      model: the torch model the users copy and the server sends.
      users_data: one data dict per user.
      cfg: the user config to run (``setting.cfg`` or its ``clean_cfg``).

    Returns:
      One ``(shared_data, true_user_data)`` per user, from its last query.

    Example::

      outputs = run_reference(setting, torch_model, [data], setting.clean_cfg)
    """
    outputs = []
    cls = _reference_class(setting.reference, cfg)
    for data in users_data:
        user = reference_user(cls, model, setting.loss, data, cfg)
        for _ in range(setting.queries):
            shared, true_data = user.compute_local_updates(server_payload(model, setting.buffers_sent))
        outputs.append((shared, true_data))
    return outputs


def run_drop_in(setting: Setting, model: torch.nn.Module, users_data: Sequence[TorchData], cfg: UserConfig,
                key: jax.Array) -> Outputs:
    """The drop-in user's shared and true data (for an aggregate all users', ``return_true_user_data``).

    Args:
      setting: the comparison's loss, payload and Flax side.
      model: the torch model the users copy and the server sends.
      users_data: one data dict per user (one, unless ``setting.aggregate``).
      cfg: the user config to run (``setting.cfg`` or its ``clean_cfg``).
      key: the noise key (one ``fold_in`` per query).

    Returns:
      ``(shared_data, true_user_data)`` of the last query, as breaching's torch dicts.

    Example::

      shared, true_data = run_drop_in(setting, torch_model, [data], setting.clean_cfg, jax.random.key(0))
    """
    setup, cfg_user = _setup_of(model), _cfg_user(cfg)
    options = dict(flax_model=setting.flax_model, cfg_data=setting.cfg_data, key=key)
    if setting.aggregate:
        user = MultiUserAggregate(model, setting.loss, [_dataloader(d) for d in users_data], setup, cfg_user,
                                  user_indices=list(range(len(users_data))), **options)
        run = lambda payload: user.compute_local_updates(payload, return_true_user_data=True)  # noqa: E731
    else:
        cls = UserMultiStep if cfg.is_multi_step else UserSingleStep
        user = cls(model, setting.loss, _dataloader(users_data[0]), setup, 0, cfg_user, **options)
        run = user.compute_local_updates
    for _ in range(setting.queries):
        result = run(server_payload(model, setting.buffers_sent))
    return result


# ----------------------------------------------------------------------------------------------
# What is compared


def _mean_reference(outputs: list, provide_buffers: bool) -> dict:
    """The intended aggregate of the reference users' shared data: the mean, metadata combined."""
    grads = [torch.stack(list(g)).mean(0) for g in zip(*(shared["gradients"] for shared, _ in outputs))]
    buffers = None
    if provide_buffers and outputs[0][0]["buffers"] is not None:
        buffers = []
        for group in zip(*(shared["buffers"] for shared, _ in outputs)):
            stacked = torch.stack(list(group))
            mean = stacked.double().mean(0)
            buffers.append(mean.round().to(stacked.dtype) if not stacked.is_floating_point() else mean)
    return dict(gradients=grads, buffers=buffers)


def _aggregate_metadata(outputs: list, cfg: UserConfig) -> dict:
    metas = [shared["metadata"] for shared, _ in outputs]
    labels = None
    if cfg.provide_labels:
        labels = torch.cat([m["labels"] for m in metas]).sort()[0]
    hyper = None
    if cfg.provide_local_hyperparams:
        step_labels = [lab for m in metas if m["local_hyperparams"] is not None
                       for lab in m["local_hyperparams"]["labels"]]
        hyper = dict(lr=cfg.local_learning_rate, steps=cfg.num_local_updates,
                     data_per_step=cfg.num_data_per_local_update_step, labels=step_labels)
    return dict(
        num_data_points=cfg.num_data_points * len(outputs) if cfg.provide_num_data_points else None,
        labels=labels, local_hyperparams=hyper, num_users=len(outputs),
    )


def _reference_shared(setting: Setting, outputs: list, cfg: UserConfig) -> dict:
    """What the comparison is made against: the user's shared data, or the users' mean."""
    return _mean_reference(outputs, cfg.provide_buffers) if setting.aggregate else outputs[0][0]


def _compare_metadata(errors: Errors, ours: Mapping, theirs: Mapping) -> None:
    for key in ("num_data_points", "labels", "data_key", "num_users"):
        errors.equal(f"metadata.{key}", ours.get(key), theirs.get(key))
    hp_ours, hp_theirs = ours.get("local_hyperparams"), theirs.get("local_hyperparams")
    if (hp_ours is None) != (hp_theirs is None):
        errors.mismatches.append(f"metadata.local_hyperparams: {hp_ours} vs {hp_theirs}")
    elif hp_ours is not None:
        for key in ("lr", "steps", "data_per_step"):
            errors.equal(f"metadata.local_hyperparams.{key}", hp_ours[key], hp_theirs[key])
        if len(hp_ours["labels"]) != len(hp_theirs["labels"]):
            errors.mismatches.append("metadata.local_hyperparams.labels: different step counts")
        for i, (a, b) in enumerate(zip(hp_ours["labels"], hp_theirs["labels"])):
            errors.equal(f"metadata.local_hyperparams.labels[{i}]", a, b)


def _compare_outputs(setting: Setting, errors: Errors, model: torch.nn.Module, cfg: UserConfig, ours: Outputs,
                     ref: list[Outputs]) -> None:
    """Gradients/deltas, buffers, metadata and the true data."""
    shared, true = ours
    theirs = _reference_shared(setting, ref, cfg)
    errors.tensor_lists("gradients", shared["gradients"], theirs["gradients"],
                        [name for name, _ in model.named_parameters()])
    errors.tensor_lists("buffers", shared["buffers"], theirs["buffers"], [name for name, _ in model.named_buffers()])
    if setting.aggregate:
        _compare_metadata(errors, shared["metadata"], _aggregate_metadata(ref, cfg))
        errors.tensors("true_data.data", true["data"], torch.cat([t["data"] for _, t in ref]))
        errors.equal("true_data.labels", true["labels"], torch.cat([t["labels"] for _, t in ref]))
    else:
        ref_shared, ref_true = ref[0]
        _compare_metadata(errors, shared["metadata"], ref_shared["metadata"])
        errors.tensors("true_data.data", true["data"], ref_true["data"])
        errors.equal("true_data.labels", true["labels"], ref_true["labels"])


# ----------------------------------------------------------------------------------------------
# The yardsticks of a miss: the reference's float64 result and its own spread


def _float64(data: TorchData) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in data.items()}


def _exact_reference(setting: Setting, model: torch.nn.Module, users_data: Sequence[TorchData],
                     cfg: UserConfig) -> dict:
    """The reference's shared data computed in float64 from the same (float32) weights and data."""
    model64 = copy.deepcopy(model).double()
    return _reference_shared(setting, run_reference(setting, model64, [_float64(d) for d in users_data], cfg), cfg)


def _distance(gradients: list, exact: dict) -> float:
    errors = Errors()
    errors.tensor_lists("gradients", gradients, exact["gradients"])
    return errors.max_rel


def spread_perturbation(dtype: torch.dtype) -> float:
    """The relative perturbation of the reference-spread yardstick for tensors of ``dtype``: ~8 of its ulp.

    Args:
      dtype: the tensor's torch dtype.

    Returns:
      ``SPREAD_PERTURBATION_FLOAT64`` for float64, else ``SPREAD_PERTURBATION``.

    Example:
      >>> spread_perturbation(torch.float32), spread_perturbation(torch.float64)
      (5e-07, 1e-15)
    """
    return SPREAD_PERTURBATION_FLOAT64 if dtype == torch.float64 else SPREAD_PERTURBATION


def jitter(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` times ``1 + u``, ``u`` uniform in +-``spread_perturbation(tensor.dtype)``, in its own dtype.

    Args:
      tensor: a floating-point tensor (not changed).
      generator: the torch generator ``u`` is drawn from (float64, one draw per entry).

    Returns:
      The perturbed copy, in ``tensor``'s dtype.

    Example:
      >>> moved = jitter(torch.ones(3, dtype=torch.float64), torch.Generator().manual_seed(0))
      >>> bool((moved != 1.0).any()), bool(((moved - 1.0).abs() <= 2e-15).all()), moved.dtype
      (True, True, torch.float64)
    """
    u = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    return (tensor.double() * (1.0 + spread_perturbation(tensor.dtype) * u)).to(tensor.dtype)


def _jittered(model: torch.nn.Module, users_data: Sequence[TorchData],
              generator: torch.Generator) -> tuple[torch.nn.Module, list[dict]]:
    """A copy of ``model`` (parameters and float buffers) and of the data, each entry jittered."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in itertools.chain(moved.parameters(), moved.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(jitter(tensor, generator))
    data = [{k: jitter(v, generator) if v.is_floating_point() else v for k, v in d.items()} for d in users_data]
    return moved, data


def _reference_spread(setting: Setting, model: torch.nn.Module, users_data: Sequence[TorchData], cfg: UserConfig,
                      exact: dict, seed: int) -> float:
    """Worst distance to ``exact`` of the reference's result over runs on slightly perturbed inputs.

    In float32, ``exact`` is the reference's float64 result. With ReLU after BatchNorm (ConvNet), a
    few of the millions of pre-activations of every forward pass lie within float32 rounding (~1e-6)
    of zero; which side of the kink each lands on is chance, and every flip changes the gradient by
    up to ~1e-2 of its scale. Any float32 implementation, the
    reference included, is then only determined up to those flips: its own result moves by ~1e-2
    when its inputs move by a few ulp, so a single float32 run of it (which may happen to flip
    nothing that matters) is no yardstick. The perturbation's smooth effect stays below the float32
    bound; the spread it measures is the discontinuity.

    In float64, ``exact`` is the reference's own unperturbed float64 result: there is no wider
    precision to judge by. Train-mode BatchNorm over a few examples in a deep net can amplify
    rounding ~100x per SGD step, so after a few steps the reference itself moves by more than the
    float64 bound when its inputs move by a few ulp; that movement is the yardstick.
    """
    generator = torch.Generator().manual_seed(seed + 31)
    worst = 0.0
    for _ in range(SPREAD_DRAWS):
        moved, data = _jittered(model, users_data, generator)
        shared = _reference_shared(setting, run_reference(setting, moved, data, cfg), cfg)
        worst = max(worst, _distance(shared["gradients"], exact))
    return worst


@dataclasses.dataclass(frozen=True)
class _Verdict:
    """Whether a miss of the bound passes on a yardstick, with the distances that decided it."""

    passed: bool
    ours_vs_float64: Optional[float] = None
    reference_vs_float64: Optional[float] = None
    reference_spread: Optional[float] = None
    details: tuple[str, ...] = ()


def _adjudicate_float64(setting: Setting, model: torch.nn.Module, users_data: Sequence[TorchData],
                        ref: list[Outputs], max_rel: float, seed: int) -> _Verdict:
    """A float64 miss passes within twice the reference's own movement on perturbed inputs."""
    cfg = setting.clean_cfg
    spread = _reference_spread(setting, model, users_data, cfg, _reference_shared(setting, ref, cfg), seed)
    return _Verdict(max_rel <= 2.0 * spread, reference_spread=spread, details=(
        f"reference float64 on {SPREAD_DRAWS} inputs perturbed by "
        f"{SPREAD_PERTURBATION_FLOAT64:.0e}: up to {spread:.2e} from its own result",))


def _adjudicate_float32(setting: Setting, model: torch.nn.Module, users_data: Sequence[TorchData],
                        ref: list[Outputs], ours: Outputs, bound: float, seed: int) -> _Verdict:
    """A float32 miss passes within twice the reference's own float32 error, or twice its spread.

    Several SGD steps amplify float32 rounding (and a parameter difference loses digits to
    cancellation), so two correct float32 implementations can differ by more than the bound.
    The reference's own float32 error against its float64 run is the yardstick then.
    """
    cfg = setting.clean_cfg
    exact = _exact_reference(setting, model, users_data, cfg)
    ours_exact = _distance(ours[0]["gradients"], exact)
    reference_exact = _distance(_reference_shared(setting, ref, cfg)["gradients"], exact)
    details = (f"vs float64 reference: ours {ours_exact:.2e}, reference float32 {reference_exact:.2e}",)
    if ours_exact <= max(2.0 * reference_exact, bound):
        return _Verdict(True, ours_exact, reference_exact, details=details)
    spread = _reference_spread(setting, model, users_data, cfg, exact, seed)
    details += (f"reference float32 on {SPREAD_DRAWS} inputs perturbed by "
                f"{SPREAD_PERTURBATION:.0e}: up to {spread:.2e}",)
    return _Verdict(ours_exact <= 2.0 * spread, ours_exact, reference_exact, spread, details)


# ----------------------------------------------------------------------------------------------
# Noise: compared by its distribution


def ks_sample(values: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """``KS_SAMPLES`` entries of ``values`` picked at random without replacement (all if fewer).

    Args:
      values: the samples (any shape; flattened).
      generator: where the pick comes from.

    Returns:
      The picked entries, flat.

    Example::

        >>> ks_sample(np.arange(5.0), np.random.default_rng(0)).size  # fewer than KS_SAMPLES: all
        5
    """
    values = np.ravel(values)
    if values.size <= KS_SAMPLES:
        return values
    return values[generator.choice(values.size, KS_SAMPLES, replace=False)]


def noise_residual(noisy: Sequence[Any], clean: Sequence[Any]) -> np.ndarray:
    """The noisy run's tensors minus the noise-free run's, in float64, flattened and concatenated.

    Args:
      noisy: a list of tensors (torch or array-like) from the run with noise.
      clean: the same list from the run without.

    Returns:
      One flat float64 array.

    Example::

        >>> noise_residual([np.ones(2), np.full((1, 1), 3.0)], [np.zeros(2), np.ones((1, 1))])
        array([1., 1., 2.])
    """
    return np.concatenate([(_numpy64(n) - _numpy64(c)).ravel() for n, c in zip(noisy, clean)])


def _noise_verdict(ours: np.ndarray, theirs: np.ndarray) -> tuple[bool, float, float]:
    from scipy import stats

    p_value = float(stats.ks_2samp(ours, theirs).pvalue)
    ratio = float(np.std(ours) / np.std(theirs))
    return p_value >= NOISE_P_VALUE and 0.9 < ratio < 1.1, p_value, ratio


def compare_noise(errors: Errors, what: str, draw: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> str:
    """Two-sample KS between our and the reference's noise, plus their spread ratio; a miss is redrawn.

    Draw 0 (a fixed seed on each side) is compared first: ``KS_SAMPLES`` entries a side are
    enough to tell a wrong scale or a Gaussian/Laplace swap apart. Its KS test takes the entries
    as independent and fails below ``NOISE_P_VALUE``, so about one fixed draw in a thousand misses
    by chance (and a multi-step user's noise moves its later gradients, so its entries are not
    quite independent: ``python -m parity.noise_null``). A miss is therefore judged again on
    ``NOISE_RETRY_DRAWS`` fresh draws a side, pooled: four times the samples, so a real difference
    fails it with more power than draw 0 had, while a chance miss does not repeat. The row passes
    only if that pooled comparison passes.

    Args:
      errors: where a miss is recorded.
      what: the name of the compared samples, for the report.
      draw: ``draw(i) -> (ours, theirs)``, the samples of draw ``i`` on each side (independent
        noise seeds for each ``i``).

    Returns:
      The report's line: the p-value and spread ratio of draw 0, and of the pooled draws if redrawn.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> errors = Errors()
        >>> same = lambda i: (rng.normal(size=5000), rng.normal(size=5000))
        >>> line = compare_noise(errors, "noise", same)
        >>> errors.mismatches
        []
        >>> swapped = lambda i: (rng.normal(size=5000), rng.laplace(scale=2 ** -0.5, size=5000))
        >>> line = compare_noise(errors, "noise", swapped)
        >>> len(errors.mismatches)
        1
    """
    pick = np.random.default_rng(0)
    ours, theirs = draw(0)
    ours, theirs = ks_sample(ours, pick), ks_sample(theirs, pick)
    passed, p_value, ratio = _noise_verdict(ours, theirs)
    line = f"{what}: KS p={p_value:.2g} (n={ours.size}/{theirs.size}), std ratio {ratio:.3f}"
    if passed:
        return line
    pooled = [tuple(ks_sample(side, pick) for side in draw(i)) for i in range(1, NOISE_RETRY_DRAWS + 1)]
    ours, theirs = (np.concatenate(side) for side in zip(*pooled))
    passed, pooled_p, pooled_ratio = _noise_verdict(ours, theirs)
    line += (f"; redrawn {NOISE_RETRY_DRAWS}x, pooled: KS p={pooled_p:.2g} (n={ours.size}/{theirs.size}), "
             f"std ratio {pooled_ratio:.3f}")
    if not passed:
        errors.mismatches.append(f"{what}: KS p={p_value:.2g}, std ratio {ratio:.3f}; pooled over "
                                 f"{NOISE_RETRY_DRAWS} fresh draws KS p={pooled_p:.2g}, std ratio {pooled_ratio:.3f}")
    return line


def _noise_comparison(setting: Setting, errors: Errors, model: torch.nn.Module, users_data: Sequence[TorchData],
                      ref_clean: list[Outputs], ours_clean: Outputs, seed: int) -> list[str]:
    """Noise cannot match draw for draw: the noise-off runs were compared exactly; here the
    distributions of the noise (or of the update's response to it) are compared."""
    cfg, ldp = setting.cfg, setting.cfg.local_diff_privacy

    def noisy_runs(i: int) -> tuple[list[Outputs], Outputs]:
        torch.manual_seed(seed + NOISE_SEED_OFFSET + i)
        return (run_reference(setting, model, users_data, cfg),
                run_drop_in(setting, model, users_data, cfg, jax.random.key(seed + NOISE_SEED_OFFSET + i)))

    if ldp.gradient_noise == 0 and not cfg.is_multi_step and not setting.aggregate and ldp.per_example_clipping == 0:
        # Without clipping the reference records the noised inputs: their residual is the noise itself.
        clean = _numpy64(users_data[0][data_key_of(users_data[0])])

        def input_noise(i: int) -> tuple[np.ndarray, np.ndarray]:
            ref_noisy, ours_noisy = noisy_runs(i)
            return _numpy64(ours_noisy[1]["data"]) - clean, _numpy64(ref_noisy[0][1]["data"]) - clean

        return [compare_noise(errors, "input noise samples", input_noise)]
    # Residual of the shared update against the noise-free one: the summed noise for gradient
    # noise; for input noise the induced change of the update.
    theirs_clean = _reference_shared(setting, ref_clean, setting.clean_cfg)["gradients"]

    def update_noise(i: int) -> tuple[np.ndarray, np.ndarray]:
        ref_noisy, ours_noisy = noisy_runs(i)
        return (noise_residual(ours_noisy[0]["gradients"], ours_clean[0]["gradients"]),
                noise_residual(_reference_shared(setting, ref_noisy, cfg)["gradients"], theirs_clean))

    if ldp.gradient_noise > 0:
        return [compare_noise(errors, "gradient noise residual of the update", update_noise)]
    # The update's response to input noise is one correlated draw, not i.i.d. samples: only its
    # size is compared (the noise samples themselves are checked for a single-step user).
    ours, theirs = update_noise(0)
    ratio = float(np.std(ours) / np.std(theirs))
    if not 0.5 < ratio < 2.0:
        errors.mismatches.append(f"input-noise response: std ratio {ratio:.3f}")
    return [f"input-noise response of the update: std ratio {ratio:.3f}"]


# ----------------------------------------------------------------------------------------------
# The check


def compare(setting: Setting, model: torch.nn.Module, users_data: Sequence[TorchData], *,
            bound: Optional[float] = None, seed: int = 0, name: str = "parity", adjudicate: bool = True,
            check: bool = True) -> ParityReport:
    """:func:`check_parity` on a prepared :class:`Setting`: the comparison itself.

    Args:
      setting: the reference class, loss, user config, payload and Flax side.
      model: the torch model (its dtype sets the precision); the server sends its state.
      users_data: one breaching data dict per user.
      bound: the relative error allowed (default ``FLOAT32_BOUND`` or ``FLOAT64_BOUND``).
      seed: the noise key's seed and the perturbations' (the noisy runs add ``NOISE_SEED_OFFSET``, a
        noise miss's redraws ``NOISE_SEED_OFFSET + 1`` to ``NOISE_SEED_OFFSET + NOISE_RETRY_DRAWS``).
      name: the report's name.
      adjudicate: whether a miss is judged on the yardsticks (``False``: the bound alone).
      check: raise :class:`ParityError` unless passed.

    Returns:
      The :class:`ParityReport`.

    Raises:
      ParityError: ``check`` and the comparison did not pass.

    Example::

      report = compare(Setting(users.UserSingleStep, torch.nn.CrossEntropyLoss(), cfg), torch_model, [data])
    """
    users_data = list(users_data)
    precision64 = next(iter(model.parameters())).dtype == torch.float64
    bound = bound if bound is not None else (FLOAT64_BOUND if precision64 else FLOAT32_BOUND)
    errors, details = Errors(), []
    ref = run_reference(setting, model, users_data, setting.clean_cfg)
    ours = run_drop_in(setting, model, users_data, setting.clean_cfg, jax.random.key(seed))
    _compare_outputs(setting, errors, model, setting.clean_cfg, ours, ref)
    if setting.noisy:
        details += _noise_comparison(setting, errors, model, users_data, ref, ours, seed)
    verdict = _Verdict(not errors.mismatches and errors.max_rel <= bound)
    if adjudicate and not errors.mismatches and not verdict.passed:
        verdict = (_adjudicate_float64(setting, model, users_data, ref, errors.max_rel, seed) if precision64
                   else _adjudicate_float32(setting, model, users_data, ref, ours, bound, seed))
    report = ParityReport(name, errors.max_abs, errors.max_rel, bound, verdict.passed,
                          "; ".join(errors.mismatches[:3] + details + list(verdict.details)),
                          verdict.ours_vs_float64, verdict.reference_vs_float64, verdict.reference_spread,
                          errors.worst)
    if check and not report.passed:
        raise ParityError(report)
    return report


def check_parity(reference: Any, model: torch.nn.Module, loss: Any, data: Union[TorchData, Sequence[TorchData]],
                 cfg_user: Any, *, flax_model: Any = None, cfg_data: Optional[Mapping] = None,
                 buffers_sent: bool = False, queries: int = 1, bound: Optional[float] = None, seed: int = 0,
                 name: str = "parity", adjudicate: bool = True, check: bool = True) -> ParityReport:
    """Compare breaching's user ``reference`` with the drop-in user on one model, weights and data.

    Compared: gradients or parameter differences and buffers (max abs error over the whole list,
    relative to its largest reference entry), metadata and true data (exactly). With noise in
    ``cfg_user``, the update is compared with the noise off, then the noise's distribution
    (two-sample KS) with it on. A float32 miss of ``bound`` passes when our distance to the
    reference's float64 result is within twice the reference's own, or within twice the
    reference's float32 spread on inputs perturbed by ``SPREAD_PERTURBATION``; a float64 miss
    passes when it is within twice the reference's own movement on inputs perturbed by
    ``SPREAD_PERTURBATION_FLOAT64``.

    Args:
      reference: breaching's ``UserSingleStep`` / ``UserMultiStep`` class or an instance (its class
        is used; every run builds fresh users); for a ``multiuser_aggregate`` config, the single
        users of that class's module, averaged (breaching's own aggregate is defective).
      model: the torch model (whose dtype sets the precision).
      loss: the torch loss.
      data: one breaching data dict per user (``inputs`` NCHW or ``input_ids``, ``labels``), or
        one dict for one user.
      cfg_user: breaching's user config (OmegaConf, a mapping or a :class:`UserConfig`).
      flax_model: the Flax counterpart of ``model`` (default by ``model.name`` and ``cfg_data``).
      cfg_data: breaching's data config.
      buffers_sent: whether the server sends the model's buffers besides its parameters.
      queries: how many times each user is queried.
      bound: the relative error allowed (default ``FLOAT32_BOUND`` or ``FLOAT64_BOUND``).
      seed: the noise key's seed and the perturbations'.
      name: the report's name.
      adjudicate: whether a miss is judged on the yardsticks (``False``: the bound alone).
      check: raise :class:`ParityError` unless passed.

    Returns:
      The :class:`ParityReport`.

    Raises:
      InputError: ``cfg_user`` has gradient and input noise both.
      ParityError: ``check`` and the comparison did not pass (the message names the worst entry).

    Example::

      from parity import reference
      report = check_parity(reference.users_module().UserSingleStep, torch_model,
                            torch.nn.CrossEntropyLoss(), [data], cfg_user)
      print(report.max_rel, report.worst)
    """
    users_data = [data] if isinstance(data, Mapping) else list(data)
    reference_cls = reference if isinstance(reference, type) else type(reference)
    setting = Setting(reference_cls, loss, user_config(cfg_user), buffers_sent, queries, flax_model, cfg_data)
    return compare(setting, model, users_data, bound=bound, seed=seed, name=name, adjudicate=adjudicate, check=check)

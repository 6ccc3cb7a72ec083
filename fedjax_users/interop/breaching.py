"""A drop-in user for breaching's pipeline, and the parity check of a user against breaching's.

**Drop-in user.** ``UserSingleStep``, ``UserMultiStep``, ``MultiUserAggregate`` and
``construct_user`` take the arguments of breaching 0.1.2's classes in ``breaching/cases/users.py``
(a torch model, a torch loss, breaching-style dataloaders, ``setup``, ``cfg_user``) and give what
they give: ``compute_local_updates(server_payload)`` returns breaching's ``shared_data`` and
``true_user_data`` dicts of torch tensors (gradients in ``model.parameters()`` order, buffers in
``model.buffers()`` order, breaching's metadata), with ``counted_queries``, ``user_idx``,
``num_data_points`` and ``__repr__`` as breaching's. The computation is
:func:`fedjax_users.local_gradient` / :func:`~fedjax_users.local_update` /
:func:`~fedjax_users.aggregate` on the Flax counterpart of the torch model: the one
:mod:`fedjax_users.models` registers under ``model.name`` (which breaching's ``construct_model``
sets), or the ``flax_model=`` given. As in breaching, the user's own BatchNorm state lives in its
copy of the model (``user.model``'s buffers): read before and written after every query, so it
persists across queries; a server that sends buffers overwrites it.

Two departures, both from breaching's defects (``docs/semantics.md``): ``MultiUserAggregate``
shares the *mean* of its users' updates (breaching's computes an exponential average, and crashes
without server buffers), and its users are paired with the dataloaders by position. Noise is drawn
from ``jax.random``: from ``key=`` (one ``fold_in`` per query) or, without one, from a seed drawn
from torch's global generator (so ``torch.manual_seed`` fixes it, as it fixes breaching's draws).

**Parity.** :func:`check_parity` runs breaching's own user class (given by the caller) and the
drop-in user on the same torch model, weights and data, and compares everything the server and an
attacker see, adjudicating float32 misses against the reference's float64 result and its own
float32 spread (``docs/parity.md``). It returns a :class:`ParityReport` and raises
:class:`ParityError` naming the worst entry when the bound is missed. ``python -m parity`` is a
grid over it.

breaching's code is never imported here: the losses are recognised by class name, and the
reference classes come from the caller.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import torch

from fedjax_users import losses as jax_losses
from fedjax_users.config import UserConfig, UserKind
from fedjax_users.interop.shared_data import shared_data_to_torch
from fedjax_users.interop.tensors import nchw_to_nhwc, nhwc_to_nchw, to_jax, to_torch
from fedjax_users.interop.torch_flax import (
    buffers_from_torch_list,
    buffers_to_torch_list,
    payload_from_torch,
    variables_to_torch,
)
from fedjax_users.types import ServerPayload, UserData
from fedjax_users.users import aggregate, compute
from fedjax_users.validation import InputError, InputTypeError

PyTree = Any
TorchData = Mapping[str, torch.Tensor]

# ----------------------------------------------------------------------------------------------
# The torch loss and model, as JAX


# breaching's losses (``torch.jit.script``-ed by its ``construct_model`` or not) by class name, and
# the per-example JAX loss each one's mean is.
SUPPORTED_LOSSES: dict[str, Callable] = {
    "CrossEntropyLoss": jax_losses.softmax_cross_entropy,
    "CausalLoss": jax_losses.causal_lm_loss,
    "MLMLoss": jax_losses.masked_lm_loss,
}
# torch's CrossEntropyLoss defaults: the only settings the JAX losses compute.
_CROSS_ENTROPY_DEFAULTS = dict(reduction="mean", ignore_index=-100, label_smoothing=0.0)


def _class_name(module: Any) -> str:
    """A module's class name; a scripted module keeps its original one."""
    return getattr(module, "original_name", None) or type(module).__name__


def _check_cross_entropy(loss: Any, where: str) -> None:
    settings = {name: getattr(loss, name, default) for name, default in _CROSS_ENTROPY_DEFAULTS.items()}
    changed = {k: v for k, v in settings.items() if v != _CROSS_ENTROPY_DEFAULTS[k]}
    if changed or getattr(loss, "weight", None) is not None:
        raise InputError(
            f"{where} has settings the JAX losses do not compute ({changed or 'class weights'}); "
            f"supported: torch.nn.CrossEntropyLoss with {_CROSS_ENTROPY_DEFAULTS} and no weight"
        )


def jax_loss(loss: Any) -> Callable:
    """The per-example JAX loss whose batch mean is the torch ``loss``; other losses are an error."""
    name = _class_name(loss)
    if name not in SUPPORTED_LOSSES:
        raise InputTypeError(
            f"loss {name} has no JAX counterpart; supported: torch.nn.CrossEntropyLoss and breaching's "
            f"CausalLoss and MLMLoss (torch.jit.script-ed or not), with torch's default CrossEntropyLoss settings"
        )
    inner = loss if name == "CrossEntropyLoss" else getattr(loss, "loss_fct", None)
    _check_cross_entropy(inner, f"loss {name}" if inner is loss else f"loss {name}'s CrossEntropyLoss")
    return SUPPORTED_LOSSES[name]


def _torch_dtype(setup: Mapping[str, Any]) -> torch.dtype:
    return setup.get("dtype", torch.float32)


def _jax_float(setup: Mapping[str, Any]):
    """The JAX float type of ``setup['dtype']``; float64 needs ``jax_enable_x64``."""
    if _torch_dtype(setup) == torch.float64:
        if not jax.config.jax_enable_x64:
            raise InputError("setup dtype is torch.float64, but JAX runs float32: set jax_enable_x64 first "
                             "(jax.config.update('jax_enable_x64', True))")
        return jnp.float64
    return jnp.float32


def flax_model_for(torch_model: torch.nn.Module, cfg_data: Optional[Mapping] = None,
                   example: Optional[UserData] = None, setup: Optional[Mapping] = None):
    """The Flax model :mod:`fedjax_users.models` registers under ``torch_model.name``.

    The data config (breaching's ``cfg_case.data``) gives the dataset, modality, classes (or
    vocabulary) and channels; without one, the classes are the last parameter's length (as
    breaching's label recovery reads them), the channels those of ``example``, the table CIFAR's.
    """
    from fedjax_users import models

    name = getattr(torch_model, "name", None)
    if not isinstance(name, str):
        raise InputError(
            "the torch model has no .name (breaching's construct_model sets it): pass flax_model= "
            "with the Flax counterpart of your model"
        )
    param_dtype = jnp.float64 if setup is not None and _torch_dtype(setup) == torch.float64 else None
    if cfg_data is not None:
        text = cfg_data.get("modality") == "text"
        size = cfg_data.get("vocab_size") if text else cfg_data.get("classes")
        channels = None if text else list(cfg_data.get("shape"))[0]
        return models.for_data(name, str(cfg_data.get("name", "")), size, channels,
                               "text" if text else "vision", param_dtype=param_dtype)
    size = list(torch_model.parameters())[-1].shape[0]
    text = example is not None and example.data_key == "input_ids"
    channels = None if text or example is None else example.inputs.shape[-1]
    return models.get(name, size, channels or 3, "text" if text else "vision", param_dtype=param_dtype)


# ----------------------------------------------------------------------------------------------
# Data in breaching's layouts


def load_user_data(dataloader, num_data_points: int, device) -> dict:
    """The user's first ``num_data_points`` examples, read as breaching's ``UserSingleStep._load_data``.

    Blocks are read until more than ``num_data_points`` examples are in (or the loader ends),
    concatenated per key and truncated; fewer examples is a ``ValueError`` with breaching's message.
    """
    blocks, count = [], 0
    for block in dataloader:
        blocks.append(block)
        count += block["labels"].shape[0]
        if count > num_data_points:
            break
    if count < num_data_points:
        raise ValueError(f"This user does not have the requested {num_data_points} samples,"
                         f"they only own {count} samples.")
    return {key: torch.cat([b[key] for b in blocks], dim=0)[:num_data_points].to(device=device)
            for key in blocks[0]}


def _data_key(data: TorchData) -> str:
    return "input_ids" if "input_ids" in data else "inputs"


def user_data_from_torch(data: TorchData) -> UserData:
    """A breaching data dict (``inputs`` NCHW or ``input_ids``, ``labels``) as :class:`UserData`."""
    key = _data_key(data)
    extra = sorted(set(data) - {key, "labels"})
    if extra:
        raise InputError(f"user data hold {extra} besides {key!r} and 'labels'; the JAX users take only those")
    inputs = to_jax(data[key]) if key == "input_ids" or data[key].ndim != 4 else nchw_to_nhwc(data[key])
    return UserData(inputs=inputs, labels=to_jax(data["labels"]))


def _inputs_to_torch(recorded, like: torch.Tensor) -> torch.Tensor:
    """Recorded (JAX) inputs in the layout and dtype of the torch inputs ``like``."""
    if like.ndim == 4 and like.is_floating_point():
        return nhwc_to_nchw(recorded, like)
    return to_torch(recorded, like)


# ----------------------------------------------------------------------------------------------
# The drop-in users


def _user_config(cfg_user: Any) -> UserConfig:
    """breaching's ``cfg_user`` (OmegaConf, a mapping or a UserConfig) as a UserConfig."""
    if isinstance(cfg_user, UserConfig):
        return cfg_user
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg_user, DictConfig):
            cfg_user = OmegaConf.to_container(cfg_user, resolve=True)
    except ImportError:  # without omegaconf a cfg_user is a plain mapping
        pass
    return UserConfig.from_dict(dict(cfg_user))


_MULTI_STEP_KEYS = ("num_local_updates", "num_data_per_local_update_step", "local_learning_rate",
                    "provide_local_hyperparams")


def _as_user_type(cfg: UserConfig, user_type: str) -> UserConfig:
    """``cfg`` for one user of ``user_type`` (breaching's classes ignore the keys they do not read)."""
    if user_type == "local_gradient":
        return cfg.replace(user_type=user_type, user_range=None, **{k: None for k in _MULTI_STEP_KEYS})
    return cfg.replace(user_type=user_type, user_range=None)


def _defense_lines(ldp, setup: Mapping[str, Any]) -> list[str]:
    """breaching's ``defense_repr`` lines (strengths printed as the setup-dtype tensor's ``item()``)."""
    def strength(value):
        return torch.as_tensor(value, **setup).item()

    lines = []
    if ldp.gradient_noise > 0:
        lines.append(f"Defense: Local {ldp.distribution} gradient noise with strength {strength(ldp.gradient_noise)}.")
    if ldp.input_noise > 0:
        lines.append(f"Defense: Local {ldp.distribution} input noise with strength {strength(ldp.input_noise)}.")
    if ldp.per_example_clipping > 0:
        lines.append(f"Defense: Gradient clipping to maximum of {ldp.per_example_clipping}.")
    return lines


def _has_noise(cfg: UserConfig) -> bool:
    return cfg.local_diff_privacy.gradient_noise > 0 or cfg.local_diff_privacy.input_noise > 0


class _JaxUser(torch.nn.Module):
    """What breaching's user classes share: construction, data, payload and output conversion."""

    _user_type = "local_gradient"

    def __init__(self, model, loss, dataloader, setup, idx, cfg_user, *, flax_model=None, cfg_data=None,
                 key=None, strategy=None):
        super().__init__()
        self.cfg = _as_user_type(_user_config(cfg_user), self._user_type)
        self.num_data_points = self.cfg.num_data_points
        self.provide_labels = self.cfg.provide_labels
        self.provide_num_data_points = self.cfg.provide_num_data_points
        self.provide_buffers = self.cfg.provide_buffers
        self.user_idx = idx
        self.setup = setup
        self.model = copy.deepcopy(model)
        self.model.to(**setup)
        self.defense_repr = _defense_lines(self.cfg.local_diff_privacy, setup)
        self.clip_value = self.cfg.local_diff_privacy.per_example_clipping
        self.dataloader = dataloader
        self.loss = copy.deepcopy(loss)
        self.jax_loss = jax_loss(loss)
        self.flax_model = flax_model
        self._cfg_data = cfg_data
        self._key = key
        self.strategy = strategy
        self.counted_queries = 0

    def __repr__(self):
        n = "\n"
        return f"""User (of type {self.__class__.__name__}) with settings:
    Number of data points: {self.num_data_points}

    Threat model:
    User provides labels: {self.provide_labels}
    User provides buffers: {self.provide_buffers}
    User provides number of data points: {self.provide_num_data_points}

    Data:
    Dataset: {self.dataloader.name}
    user: {self.user_idx}
    {n.join(self.defense_repr)}
        """

    # -- pieces of a query

    def _load_data(self, setup=None) -> dict:
        data = load_user_data(self.dataloader, self.num_data_points, (setup or self.setup)["device"])
        self.data_key = _data_key(data)
        return data

    def _flax(self, example: UserData):
        if self.flax_model is None:
            self.flax_model = flax_model_for(self.model, self._cfg_data, example, self.setup)
        return self.flax_model

    def _template(self, example: UserData) -> dict:
        """The Flax variables' structure (shapes only, nothing computed)."""
        model, dtype = self._flax(example), _jax_float(self.setup)
        first = jnp.zeros((1,) + example.inputs.shape[1:], example.inputs.dtype if
                          jnp.issubdtype(example.inputs.dtype, jnp.integer) else dtype)
        return jax.eval_shape(model.init, jax.random.key(0), first)

    def _payload(self, server_payload: Mapping, template) -> ServerPayload:
        parameters = [p.to(**self.setup) for p in server_payload["parameters"]]
        buffers = server_payload.get("buffers")
        if buffers is not None:
            buffers = [b.to(device=self.setup["device"]) for b in buffers]
        return payload_from_torch(parameters, buffers, self.model, template)

    def _own_state(self, template) -> PyTree:
        """The user's own BatchNorm statistics: its model's buffers, as breaching keeps them."""
        return buffers_from_torch_list(list(self.model.buffers()), self.model, template)

    def _store_state(self, params: PyTree, batch_stats: PyTree) -> None:
        """Leave the model as breaching's user leaves its own: these parameters and statistics."""
        variables_to_torch({"params": params, "batch_stats": batch_stats or {}}, self.model)

    def _next_key(self) -> jax.Array:
        if self._key is not None:
            return jax.random.fold_in(self._key, self.counted_queries)
        if not _has_noise(self.cfg):
            return jax.random.key(0)  # nothing is drawn: the key is never used
        return jax.random.key(int(torch.randint(0, 2**31 - 1, (1,)).item()))

    def _true_data(self, data: dict, true, buffers) -> dict:
        return dict(data=_inputs_to_torch(true.data, data[self.data_key]), labels=data["labels"], buffers=buffers)

    # -- the query

    def compute_local_updates(self, server_payload, custom_data=None):
        """breaching's ``compute_local_updates``: ``(shared_data, true_user_data)`` as torch dicts."""
        self.counted_queries += 1
        data = self._load_data() if custom_data is None else custom_data
        self.data_key = _data_key(data)
        user_data = user_data_from_torch(data)
        template = self._template(user_data)
        payload = self._payload(server_payload, template)
        train = payload.batch_stats is None
        shared, true, state = compute(self._flax(user_data), payload, user_data, self.cfg, self._next_key(),
                                      self._own_state(template) if train else None, self.jax_loss,
                                      strategy=self.strategy)
        params = payload.params
        if self.cfg.is_multi_step:
            params = jax.tree_util.tree_map(jnp.add, payload.params, shared.gradients)
        self._store_state(params, state if train else payload.batch_stats)
        shared_data = shared_data_to_torch(shared, self.model)
        buffers = None if true.batch_stats is None else buffers_to_torch_list(true.batch_stats, self.model)
        return shared_data, self._true_data(data, true, buffers)


class UserSingleStep(_JaxUser):
    """breaching's ``UserSingleStep`` computed by :func:`fedjax_users.local_gradient`.

    ``flax_model``: the Flax counterpart of ``model`` (default: by ``model.name``, see
    :func:`flax_model_for`; ``cfg_data`` is breaching's data config). ``key``: the noise key.
    """


class UserMultiStep(_JaxUser):
    """breaching's ``UserMultiStep`` computed by :func:`fedjax_users.local_update`."""

    _user_type = "local_update"

    def __init__(self, model, loss, dataloader, setup, idx, cfg_user, **options):
        super().__init__(model, loss, dataloader, setup, idx, cfg_user, **options)
        self.num_local_updates = self.cfg.num_local_updates
        self.num_data_per_local_update_step = self.cfg.num_data_per_local_update_step
        self.local_learning_rate = self.cfg.local_learning_rate
        self.provide_local_hyperparams = self.cfg.provide_local_hyperparams

    def __repr__(self):
        n = "\n"
        return (
            super().__repr__()
            + n
            + f"""    Local FL Setup:
        Number of local update steps: {self.num_local_updates}
        Data per local update step: {self.num_data_per_local_update_step}
        Local learning rate: {self.local_learning_rate}

        Threat model:
        Share these hyperparams to server: {self.provide_local_hyperparams}

        """
        )

    def compute_local_updates(self, server_payload):
        """breaching's ``UserMultiStep.compute_local_updates`` (no ``custom_data``, as breaching's)."""
        return super().compute_local_updates(server_payload)


class ChainedDataloader:
    """The users' dataloaders one after the other (breaching's ``ChainedDataloader``)."""

    def __init__(self, dataloaders):
        self.dataloaders = dataloaders

    def __iter__(self):
        return itertools.chain(*self.dataloaders)

    def __len__(self):
        return sum(len(loader) for loader in self.dataloaders)

    def __getattr__(self, name):
        return getattr(self.dataloaders[0], name)


class MultiUserAggregate(UserMultiStep):
    """breaching's ``MultiUserAggregate`` as intended (the mean), computed by :func:`fedjax_users.aggregate`.

    Each user is a drop-in ``UserMultiStep`` (``num_local_updates > 1``) or ``UserSingleStep``,
    holding its own data and BatchNorm state; ``dataloaders`` and ``user_indices`` pair by position.
    """

    _user_type = "multiuser_aggregate"

    def __init__(self, model, loss, dataloaders, setup, cfg_user, user_indices, **options):
        cfg = _user_config(cfg_user)
        super().__init__(model, loss, dataloaders, setup, None, cfg, **options)
        self.num_users = len(dataloaders)
        self.user_setup = dict(dtype=setup["dtype"], device=torch.device("cpu"))
        kind = UserMultiStep if (self.num_local_updates or 1) > 1 else UserSingleStep
        self.users = [kind(model, loss, loader, self.user_setup, idx, cfg, **options)
                      for idx, loader in zip(user_indices, dataloaders)]
        self.dataloader = ChainedDataloader(dataloaders)
        self.user_idx = f"{user_indices[0]}_{user_indices[-1]}"

    def __repr__(self):
        return self.users[0].__repr__() + "\n" + f"""    Number of aggregated users: {self.num_users}"""

    def compute_local_updates(self, server_payload, return_true_user_data=False):
        """The mean of the users' updates as breaching's ``shared_data``; with
        ``return_true_user_data`` all users' data, else (as breaching's loop leaves it) the last user's."""
        self.counted_queries += 1
        users_data = [user._load_data(self.setup) for user in self.users]
        self.data_key = self.users[0].data_key
        stacked = [user_data_from_torch(d) for d in users_data]
        users = UserData(inputs=jnp.stack([u.inputs for u in stacked]), labels=jnp.stack([u.labels for u in stacked]))
        template = self._template(stacked[0])
        payload = self._payload(server_payload, template)
        train = payload.batch_stats is None
        states = None
        if train:
            own = [user._own_state(template) for user in self.users]
            states = jax.tree_util.tree_map(lambda *s: jnp.stack(s), *own)
        cfg = self.cfg.replace(user_type="multiuser_aggregate")
        shared, true = aggregate(self._flax(stacked[0]), payload, users, cfg, self._next_key(), users_state=states,
                                 loss=self.jax_loss, strategy=self.strategy)
        for i, user in enumerate(self.users):
            own = jax.tree_util.tree_map(lambda s: s[i], true.user_state) if train else payload.batch_stats
            user._store_state(payload.params, own)
            user.counted_queries += 1
        shared_data = shared_data_to_torch(shared, self.model)
        if return_true_user_data:
            buffers = None if true.batch_stats is None else buffers_to_torch_list(true.batch_stats, self.model)
            data = torch.cat([d[self.data_key] for d in users_data])
            return shared_data, dict(data=_inputs_to_torch(true.data, data),
                                     labels=torch.cat([d["labels"] for d in users_data]), buffers=buffers)
        last = self.users[-1]
        shares = train or isinstance(last, UserMultiStep)
        buffers = [b.clone().detach() for b in last.model.buffers()] if shares else None
        n = self.num_data_points
        recorded = jax.tree_util.tree_map(lambda a: a[-n:], true.data)
        return shared_data, dict(data=_inputs_to_torch(recorded, users_data[-1][self.data_key]),
                                 labels=users_data[-1]["labels"], buffers=buffers)


def construct_user(model, loss_fn, cfg_case, setup, *, dataloaders=None, **options):
    """breaching's ``construct_user``: the drop-in user ``cfg_case.user`` describes.

    breaching builds each user's dataloader from ``cfg_case.data`` (its ``construct_dataloader``);
    here they are given: ``dataloaders`` maps a user index to its dataloader (a list or a dict).
    ``options`` go to the user (``flax_model``, ``key``, ``strategy``); ``cfg_case.data`` names the
    Flax model unless ``flax_model`` is given.
    """
    if dataloaders is None:
        raise InputError("construct_user needs dataloaders= (one per user index): breaching's "
                         "construct_dataloader reads datasets from disk and is not part of the JAX users")
    cfg_user = cfg_case.user
    options.setdefault("cfg_data", cfg_case.get("data") if hasattr(cfg_case, "get") else None)
    kind = _user_config(cfg_user).kind
    if kind is UserKind.AGGREGATE:
        indices = list(range(*cfg_user.user_range))
        return MultiUserAggregate(model, loss_fn, [dataloaders[i] for i in indices], setup, cfg_user,
                                  user_indices=indices, **options)
    cls = {UserKind.LOCAL_GRADIENT: UserSingleStep, UserKind.LOCAL_UPDATE: UserMultiStep}[kind]
    idx = cfg_user.user_idx
    return cls(model, loss_fn, dataloaders[idx], setup, idx=idx, cfg_user=cfg_user, **options)


# ----------------------------------------------------------------------------------------------
# Parity: a reference user (breaching's class) against the drop-in user

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
# The noisy runs draw from a seed apart from the clean runs' (which draw nothing).
NOISE_SEED_OFFSET = 7


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """Outcome of one comparison: worst errors over everything compared, and the bound they must meet."""

    name: str
    max_abs: float
    max_rel: float
    bound: float
    passed: bool
    detail: str = ""
    # Set when the float32 bound was missed and the float64 reference was the yardstick.
    ours_vs_float64: Optional[float] = None
    reference_vs_float64: Optional[float] = None
    # Set when that was missed too: the worst distance to float64 of the reference's float32 runs
    # on inputs perturbed far below float32 resolution of the result (``_reference_spread``).
    reference_spread: Optional[float] = None
    # The entry with the largest relative error (``gradients[3] conv1.weight``).
    worst: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


class ParityError(AssertionError):
    """The drop-in user missed the bound against the reference; the message names the worst entry."""

    def __init__(self, report: ParityReport):
        self.report = report
        super().__init__(
            f"{report.name}: max relative error {report.max_rel:.3e} (bound {report.bound:.0e}) at "
            f"{report.worst or 'no tensor'}; {report.detail}")


def _numpy64(value) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


class _Errors:
    """Accumulates max abs / relative error of tensors and exact checks of metadata."""

    def __init__(self):
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.worst = ""
        self.mismatches: list[str] = []

    def tensors(self, what: str, ours, theirs) -> None:
        self.tensor_lists(what, [ours], [theirs])

    def tensor_lists(self, what: str, ours: Optional[list], theirs: Optional[list],
                     names: Optional[Sequence[str]] = None) -> None:
        """Max abs error, and that error relative to the largest reference entry of the whole list.

        The scale is the whole gradient's (all tensors), not each tensor's: a tensor whose exact
        value is zero (a conv bias before train-mode BatchNorm) holds only rounding noise, and its
        own maximum would turn 1e-7 of noise into a huge ratio.
        """
        if theirs is None or ours is None:
            if (theirs is None) != (ours is None):
                self.mismatches.append(f"{what}: {'missing' if ours is None else 'unexpected'}")
            return
        if len(ours) != len(theirs):
            self.mismatches.append(f"{what}: {len(ours)} vs {len(theirs)} entries")
            return
        pairs = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            a, b = _numpy64(a), _numpy64(b)
            if a.shape != b.shape:
                self.mismatches.append(f"{what}[{i}]: shape {a.shape} vs {b.shape}")
            elif a.size:
                pairs.append((i, a, b))
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

    def equal(self, what: str, ours, theirs) -> None:
        if torch.is_tensor(theirs) or torch.is_tensor(ours) or isinstance(ours, (jax.Array, np.ndarray)):
            if ours is None or theirs is None or not np.array_equal(np.asarray(ours), np.asarray(theirs)):
                self.mismatches.append(f"{what}: {ours} vs {theirs}")
        elif ours != theirs:
            self.mismatches.append(f"{what}: {ours!r} vs {theirs!r}")


@dataclasses.dataclass(frozen=True)
class _Setting:
    """What a comparison runs: the user, its loss, config and payload kind, and the Flax side."""

    reference: type
    loss: Any
    cfg: UserConfig
    buffers_sent: bool
    queries: int
    flax_model: Any = None
    cfg_data: Any = None

    @property
    def aggregate(self) -> bool:
        return self.cfg.is_aggregate


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


def reference_user(reference: type, model: torch.nn.Module, loss, data: TorchData, cfg: UserConfig):
    """A fresh reference user (one dataloader holding ``data``), as breaching's classes are built."""
    return reference(model, loss, _dataloader(data), _setup_of(model), idx=0, cfg_user=_cfg_user(cfg))


def server_payload(model: torch.nn.Module, buffers_sent: bool) -> dict:
    """breaching's payload: parameter and buffer lists (buffers only if the server sends them)."""
    parameters = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()] if buffers_sent else None
    return dict(parameters=parameters, buffers=buffers)


def _run_reference(setting: _Setting, model, users_data: Sequence[TorchData], cfg: UserConfig) -> list:
    """Shared and true data of each reference user (fresh user objects; ``queries`` per user)."""
    outputs = []
    cls = _reference_class(setting.reference, cfg)
    for data in users_data:
        user = reference_user(cls, model, setting.loss, data, cfg)
        for _ in range(setting.queries):
            shared, true_data = user.compute_local_updates(server_payload(model, setting.buffers_sent))
        outputs.append((shared, true_data))
    return outputs


def _run_ours(setting: _Setting, model, users_data: Sequence[TorchData], cfg: UserConfig, key) -> tuple:
    """The drop-in user's shared and true data (``return_true_user_data`` for an aggregate)."""
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


def _reference_shared(setting: _Setting, outputs: list, cfg: UserConfig) -> dict:
    """What the comparison is made against: the user's shared data, or the users' mean."""
    return _mean_reference(outputs, cfg.provide_buffers) if setting.aggregate else outputs[0][0]


def _compare_metadata(errors: _Errors, ours: Mapping, theirs: Mapping) -> None:
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


def _compare_outputs(setting: _Setting, errors: _Errors, model, cfg: UserConfig, ours: tuple, ref: list) -> None:
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


def _float64(data: TorchData) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in data.items()}


def _exact_reference(setting: _Setting, model, users_data, cfg) -> dict:
    """The reference's shared data computed in float64 from the same (float32) weights and data."""
    model64 = copy.deepcopy(model).double()
    return _reference_shared(setting, _run_reference(setting, model64, [_float64(d) for d in users_data], cfg), cfg)


def _distance(gradients: list, exact: dict) -> float:
    errors = _Errors()
    errors.tensor_lists("gradients", gradients, exact["gradients"])
    return errors.max_rel


def spread_perturbation(dtype: torch.dtype) -> float:
    """The relative perturbation of ``_reference_spread`` for tensors of ``dtype``: ~8 of its ulp."""
    return SPREAD_PERTURBATION_FLOAT64 if dtype == torch.float64 else SPREAD_PERTURBATION


def _jitter(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` times ``1 + u``, ``u`` uniform in +-``spread_perturbation(tensor.dtype)``, in its own dtype."""
    u = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    return (tensor.double() * (1.0 + spread_perturbation(tensor.dtype) * u)).to(tensor.dtype)


def _reference_spread(setting: _Setting, model, users_data, cfg, exact: dict, seed: int) -> float:
    """Worst distance to ``exact`` of the reference's result over runs on slightly perturbed inputs.

    In float32, ``exact`` is the reference's float64 result. With ReLU after BatchNorm (ConvNet), a few of the millions of pre-activations of every forward
    pass lie within float32 rounding (~1e-6) of zero; which side of the kink each lands on is chance,
    and every flip changes the gradient by up to ~1e-2 of its scale. Any float32 implementation, the
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
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for tensor in itertools.chain(moved.parameters(), moved.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(_jitter(tensor, generator))
        data = [{k: _jitter(v, generator) if v.is_floating_point() else v for k, v in d.items()} for d in users_data]
        shared = _reference_shared(setting, _run_reference(setting, moved, data, cfg), cfg)
        worst = max(worst, _distance(shared["gradients"], exact))
    return worst


def _ks_noise(errors: _Errors, what: str, ours: np.ndarray, theirs: np.ndarray) -> str:
    """Two-sample KS between our and the reference's noise samples, plus their spread ratio.

    A fixed random subset of ``KS_SAMPLES`` entries per side is enough to tell a wrong scale or a
    Gaussian/Laplace swap apart, without flagging the tiny second-order effects of the noise on the
    later steps of a multi-step user.
    """
    from scipy import stats

    ours, theirs = np.ravel(ours), np.ravel(theirs)
    pick = np.random.default_rng(0)
    if ours.size > KS_SAMPLES:
        ours = ours[pick.choice(ours.size, KS_SAMPLES, replace=False)]
    if theirs.size > KS_SAMPLES:
        theirs = theirs[pick.choice(theirs.size, KS_SAMPLES, replace=False)]
    statistic, p_value = stats.ks_2samp(ours, theirs)
    ratio = float(np.std(ours) / np.std(theirs))
    if p_value < 1e-3 or not 0.9 < ratio < 1.1:
        errors.mismatches.append(f"{what}: KS p={p_value:.2g}, std ratio {ratio:.3f}")
    return f"{what}: KS p={p_value:.2g} (n={ours.size}/{theirs.size}), std ratio {ratio:.3f}"


def _residual(noisy: Sequence[torch.Tensor], clean: Sequence[torch.Tensor]) -> np.ndarray:
    return np.concatenate([(_numpy64(n) - _numpy64(c)).ravel() for n, c in zip(noisy, clean)])


def _noise_comparison(setting, errors, model, users_data, cfg, clean_cfg, ref_clean, ours_clean, seed) -> list[str]:
    """Noise cannot match draw for draw: the noise-off runs were compared exactly; here the
    distributions of the noise (or of the update's response to it) are compared."""
    ldp = cfg.local_diff_privacy
    torch.manual_seed(seed + NOISE_SEED_OFFSET)
    ref_noisy = _run_reference(setting, model, users_data, cfg)
    ours_noisy = _run_ours(setting, model, users_data, cfg, jax.random.key(seed + NOISE_SEED_OFFSET))
    if ldp.gradient_noise == 0 and not cfg.is_multi_step and not setting.aggregate and ldp.per_example_clipping == 0:
        # Without clipping the reference records the noised inputs: their residual is the noise itself.
        clean = _numpy64(users_data[0][_data_key(users_data[0])])
        return [_ks_noise(errors, "input noise samples", _numpy64(ours_noisy[1]["data"]) - clean,
                          _numpy64(ref_noisy[0][1]["data"]) - clean)]
    # Residual of the shared update against the noise-free one: the summed noise for gradient
    # noise; for input noise the induced change of the update.
    theirs = _residual(_reference_shared(setting, ref_noisy, cfg)["gradients"],
                       _reference_shared(setting, ref_clean, clean_cfg)["gradients"])
    ours = _residual(ours_noisy[0]["gradients"], ours_clean[0]["gradients"])
    if ldp.gradient_noise > 0:
        return [_ks_noise(errors, "gradient noise residual of the update", ours, theirs)]
    # The update's response to input noise is one correlated draw, not i.i.d. samples: only its
    # size is compared (the noise samples themselves are checked for a single-step user).
    ratio = float(np.std(ours) / np.std(theirs))
    if not 0.5 < ratio < 2.0:
        errors.mismatches.append(f"input-noise response: std ratio {ratio:.3f}")
    return [f"input-noise response of the update: std ratio {ratio:.3f}"]


def check_parity(
    reference: Any,
    model: torch.nn.Module,
    loss: Any,
    data: Union[TorchData, Sequence[TorchData]],
    cfg_user: Any,
    *,
    flax_model=None,
    cfg_data: Optional[Mapping] = None,
    buffers_sent: bool = False,
    queries: int = 1,
    bound: Optional[float] = None,
    seed: int = 0,
    name: str = "parity",
    adjudicate: bool = True,
    check: bool = True,
) -> ParityReport:
    """Compare breaching's user ``reference`` with the drop-in user on one model, weights and data.

    ``reference``: breaching's ``UserSingleStep`` / ``UserMultiStep`` class or an instance (its
    class is used; every run builds fresh users); for a ``multiuser_aggregate`` config, the single
    users of that class's module, averaged (breaching's own aggregate is defective). ``model`` and
    ``loss``: the torch model (whose dtype sets the precision) and loss; ``flax_model`` its Flax
    counterpart (default by ``model.name`` and ``cfg_data``). ``data``: one breaching data dict per
    user (``inputs`` NCHW or ``input_ids``, ``labels``). ``cfg_user``: breaching's user config.
    The server sends the model's parameters, and its buffers if ``buffers_sent``; each user is
    queried ``queries`` times.

    Compared: gradients or parameter differences and buffers (max abs error over the whole list,
    relative to its largest reference entry), metadata and true data (exactly). With noise in
    ``cfg_user``, the update is compared with the noise off, then the noise's distribution
    (two-sample KS) with it on. A float32 miss of ``bound`` (default ``FLOAT32_BOUND`` or
    ``FLOAT64_BOUND``) passes when our distance to the reference's float64 result is within twice
    the reference's own, or within twice the reference's float32 spread on inputs perturbed by
    ``SPREAD_PERTURBATION``; a float64 miss passes when it is within twice the reference's own
    movement on inputs perturbed by ``SPREAD_PERTURBATION_FLOAT64`` (``adjudicate=False``: the
    bound alone). ``check``: raise
    :class:`ParityError` unless passed.
    """
    users_data = [data] if isinstance(data, Mapping) else list(data)
    cfg = _user_config(cfg_user)
    if cfg.local_diff_privacy.gradient_noise > 0 and cfg.local_diff_privacy.input_noise > 0:
        raise InputError("check_parity compares one kind of noise at a time: gradient_noise or input_noise")
    reference_cls = reference if isinstance(reference, type) else type(reference)
    setting = _Setting(reference_cls, loss, cfg, buffers_sent, queries, flax_model, cfg_data)
    precision64 = next(iter(model.parameters())).dtype == torch.float64
    bound = bound if bound is not None else (FLOAT64_BOUND if precision64 else FLOAT32_BOUND)
    noisy = _has_noise(cfg)
    clean_cfg = cfg.replace(local_diff_privacy=dataclasses.replace(cfg.local_diff_privacy, gradient_noise=0.0,
                                                                   input_noise=0.0))
    errors, details = _Errors(), []
    ref = _run_reference(setting, model, users_data, clean_cfg)
    ours = _run_ours(setting, model, users_data, clean_cfg, jax.random.key(seed))
    _compare_outputs(setting, errors, model, clean_cfg, ours, ref)
    if noisy:
        details += _noise_comparison(setting, errors, model, users_data, cfg, clean_cfg, ref, ours, seed)
    passed = not errors.mismatches and errors.max_rel <= bound
    ours_exact = reference_exact = spread = None
    if adjudicate and not errors.mismatches and not passed and precision64:
        spread = _reference_spread(setting, model, users_data, clean_cfg,
                                   _reference_shared(setting, ref, clean_cfg), seed)
        passed = errors.max_rel <= 2.0 * spread
        details.append(f"reference float64 on {SPREAD_DRAWS} inputs perturbed by "
                       f"{SPREAD_PERTURBATION_FLOAT64:.0e}: up to {spread:.2e} from its own result")
    elif adjudicate and not errors.mismatches and not passed:
        # Several SGD steps amplify float32 rounding (and a parameter difference loses digits to
        # cancellation), so two correct float32 implementations can differ by more than the bound.
        # The reference's own float32 error against its float64 run is the yardstick then.
        exact = _exact_reference(setting, model, users_data, clean_cfg)
        ours_exact = _distance(ours[0]["gradients"], exact)
        reference_exact = _distance(_reference_shared(setting, ref, clean_cfg)["gradients"], exact)
        passed = ours_exact <= max(2.0 * reference_exact, bound)
        details.append(f"vs float64 reference: ours {ours_exact:.2e}, reference float32 {reference_exact:.2e}")
        if not passed:
            spread = _reference_spread(setting, model, users_data, clean_cfg, exact, seed)
            passed = ours_exact <= 2.0 * spread
            details.append(f"reference float32 on {SPREAD_DRAWS} inputs perturbed by "
                           f"{SPREAD_PERTURBATION:.0e}: up to {spread:.2e}")
    report = ParityReport(name, errors.max_abs, errors.max_rel, bound, passed,
                          "; ".join(errors.mismatches[:3] + details), ours_exact, reference_exact, spread, errors.worst)
    if check and not report.passed:
        raise ParityError(report)
    return report

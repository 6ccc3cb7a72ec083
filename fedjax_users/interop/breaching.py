"""A drop-in user for breaching's pipeline: breaching's user classes, computed by fedjax_users.

``UserSingleStep``, ``UserMultiStep``, ``MultiUserAggregate`` and
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

The comparison of these users with breaching's own is :mod:`fedjax_users.interop.parity_check`.
breaching's code is never imported here: the losses are recognised by class name.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
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

__all__ = [
    "SUPPORTED_LOSSES",
    "ChainedDataloader",
    "MultiUserAggregate",
    "UserMultiStep",
    "UserSingleStep",
    "construct_user",
    "data_key_of",
    "flax_model_for",
    "has_noise",
    "jax_loss",
    "load_user_data",
    "user_config",
    "user_data_from_torch",
]

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
    """The per-example JAX loss whose batch mean is the torch ``loss``; other losses are an error.

    Args:
      loss: torch's ``CrossEntropyLoss`` (default settings) or breaching's ``CausalLoss`` /
        ``MLMLoss``, ``torch.jit.script``-ed or not (recognised by class name).

    Returns:
      The loss of :mod:`fedjax_users.losses` it stands for (``SUPPORTED_LOSSES``).

    Raises:
      InputTypeError: a loss with no JAX counterpart.
      InputError: a cross-entropy with settings the JAX losses do not compute.

    Example:
      >>> jax_loss(torch.nn.CrossEntropyLoss()) is SUPPORTED_LOSSES["CrossEntropyLoss"]
      True
    """
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

    Args:
      torch_model: the torch model, named by breaching's ``construct_model`` (``.name``).
      cfg_data: breaching's data config, or ``None``.
      example: a user's data, for the modality and channels when there is no data config.
      setup: breaching's ``setup``; a float64 ``dtype`` gives float64 parameters.

    Returns:
      The Flax module (not initialised).

    Raises:
      InputError: the torch model has no ``.name``.

    Example::

      flax_model = flax_model_for(construct_model(cfg_case.model, cfg_case.data)[0], cfg_case.data)
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

    Args:
      dataloader: an iterable of breaching data dicts (blocks of examples).
      num_data_points: how many examples the user holds.
      device: the torch device the tensors are moved to.

    Returns:
      One data dict of ``num_data_points`` examples.

    Example:
      >>> blocks = [{"inputs": torch.zeros(2, 3, 4, 4), "labels": torch.arange(2)}] * 2
      >>> load_user_data(blocks, 3, "cpu")["labels"].tolist()
      [0, 1, 0]
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


def data_key_of(data: TorchData) -> str:
    """The key of a breaching data dict's inputs, as breaching's users set ``data_key``.

    Args:
      data: a breaching data dict (``inputs`` or ``input_ids``, and ``labels``).

    Returns:
      ``"input_ids"`` for text, else ``"inputs"``.

    Example:
      >>> data_key_of({"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4)})
      'input_ids'
    """
    return "input_ids" if "input_ids" in data else "inputs"


def user_data_from_torch(data: TorchData) -> UserData:
    """A breaching data dict (``inputs`` NCHW or ``input_ids``, ``labels``) as :class:`UserData`.

    Args:
      data: the dict; any key besides the inputs and ``labels`` is an ``InputError``.

    Returns:
      The :class:`~fedjax_users.types.UserData`: images NHWC, token ids as they are.

    Example:
      >>> user_data_from_torch({"inputs": torch.zeros(2, 3, 4, 4), "labels": torch.arange(2)}).inputs.shape
      (2, 4, 4, 3)
    """
    key = data_key_of(data)
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


def user_config(cfg_user: Any) -> UserConfig:
    """breaching's ``cfg_user`` (OmegaConf, a mapping or a UserConfig) as a UserConfig.

    Args:
      cfg_user: breaching's user config: an OmegaConf ``DictConfig``, a plain mapping of its keys,
        or a :class:`~fedjax_users.config.UserConfig` (returned as it is).

    Returns:
      The :class:`~fedjax_users.config.UserConfig`.

    Example:
      >>> user_config({"user_type": "local_gradient", "num_data_points": 4}).num_data_points
      4
    """
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


def has_noise(cfg: UserConfig) -> bool:
    """Whether the user adds local noise (to its gradient or its inputs): only then is a key drawn.

    Args:
      cfg: the user config.

    Returns:
      ``True`` when ``gradient_noise`` or ``input_noise`` is positive.

    Example:
      >>> has_noise(user_config({"user_type": "local_gradient", "num_data_points": 4}))
      False
    """
    return cfg.local_diff_privacy.gradient_noise > 0 or cfg.local_diff_privacy.input_noise > 0


class _JaxUser(torch.nn.Module):
    """What breaching's user classes share: construction, data, payload and output conversion."""

    _user_type = "local_gradient"

    def __init__(self, model, loss, dataloader, setup, idx, cfg_user, *, flax_model=None, cfg_data=None,
                 key=None, strategy=None):
        super().__init__()
        self.cfg = _as_user_type(user_config(cfg_user), self._user_type)
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
        self.data_key = data_key_of(data)
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
        if not has_noise(self.cfg):
            return jax.random.key(0)  # nothing is drawn: the key is never used
        return jax.random.key(int(torch.randint(0, 2**31 - 1, (1,)).item()))

    def _true_data(self, data: dict, true, buffers) -> dict:
        return dict(data=_inputs_to_torch(true.data, data[self.data_key]), labels=data["labels"], buffers=buffers)

    # -- the query

    def compute_local_updates(self, server_payload, custom_data=None):
        """breaching's ``compute_local_updates``: ``(shared_data, true_user_data)`` as torch dicts.

        Args:
          server_payload: breaching's payload (``parameters``, ``buffers`` or ``None``, ``metadata``).
          custom_data: a data dict to use instead of the dataloader's (breaching's argument).

        Returns:
          ``(shared_data, true_user_data)``: gradients (or parameter differences), buffers and
          metadata as breaching's user shares them; the data the user computed on.
        """
        self.counted_queries += 1
        data = self._load_data() if custom_data is None else custom_data
        self.data_key = data_key_of(data)
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

    Args:
      model: the torch model (copied; the copy holds the user's own BatchNorm state).
      loss: the torch loss (see :func:`jax_loss`).
      dataloader: the user's dataloader (breaching data dicts).
      setup: breaching's ``setup`` (``device``, ``dtype``).
      idx: the user's index.
      cfg_user: breaching's user config (see :func:`user_config`).
      flax_model: the Flax counterpart of ``model`` (default: by ``model.name``, see :func:`flax_model_for`).
      cfg_data: breaching's data config, which names the Flax model.
      key: the noise key (one ``fold_in`` per query); default a seed from torch's generator.
      strategy: how the computation runs (:mod:`fedjax_users.strategy`); default chosen per call.
    """


class UserMultiStep(_JaxUser):
    """breaching's ``UserMultiStep`` computed by :func:`fedjax_users.local_update`.

    Args:
      model, loss, dataloader, setup, idx, cfg_user: as :class:`UserSingleStep`'s.
      **options: :class:`UserSingleStep`'s keyword arguments (``flax_model``, ``cfg_data``, ``key``, ``strategy``).
    """

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
        """breaching's ``UserMultiStep.compute_local_updates`` (no ``custom_data``, as breaching's).

        Args:
          server_payload: breaching's payload.

        Returns:
          ``(shared_data, true_user_data)``; the shared "gradients" are the parameter differences.
        """
        return super().compute_local_updates(server_payload)


class ChainedDataloader:
    """The users' dataloaders one after the other (breaching's ``ChainedDataloader``).

    Args:
      dataloaders: the users' dataloaders; other attributes (``name``) are the first one's.
    """

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

    Args:
      model, loss, setup, cfg_user: as :class:`UserSingleStep`'s.
      dataloaders: one dataloader per user.
      user_indices: the users' indices, in the order of ``dataloaders``.
      **options: :class:`UserSingleStep`'s keyword arguments, given to every user.
    """

    _user_type = "multiuser_aggregate"

    def __init__(self, model, loss, dataloaders, setup, cfg_user, user_indices, **options):
        cfg = user_config(cfg_user)
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
        """The mean of the users' updates as breaching's ``shared_data``, and the users' true data.

        Args:
          server_payload: breaching's payload.
          return_true_user_data: all users' data; else (as breaching's loop leaves it) the last user's.

        Returns:
          ``(shared_data, true_user_data)``.
        """
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
    here they are given.

    Args:
      model: the torch model.
      loss_fn: the torch loss.
      cfg_case: breaching's case config (``user``, and ``data``, which names the Flax model unless
        ``flax_model`` is given).
      setup: breaching's ``setup``.
      dataloaders: a user index's dataloader by index (a list or a dict).
      **options: the user's keyword arguments (``flax_model``, ``key``, ``strategy``).

    Returns:
      A :class:`UserSingleStep`, :class:`UserMultiStep` or :class:`MultiUserAggregate`.

    Raises:
      InputError: no ``dataloaders``.

    Example::

      user = construct_user(model, loss_fn, cfg_case, setup, dataloaders=loaders)
      shared_data, true_user_data = user.compute_local_updates(server_payload)
    """
    if dataloaders is None:
        raise InputError("construct_user needs dataloaders= (one per user index): breaching's "
                         "construct_dataloader reads datasets from disk and is not part of the JAX users")
    cfg_user = cfg_case.user
    options.setdefault("cfg_data", cfg_case.get("data") if hasattr(cfg_case, "get") else None)
    kind = user_config(cfg_user).kind
    if kind is UserKind.AGGREGATE:
        indices = list(range(*cfg_user.user_range))
        return MultiUserAggregate(model, loss_fn, [dataloaders[i] for i in indices], setup, cfg_user,
                                  user_indices=indices, **options)
    cls = {UserKind.LOCAL_GRADIENT: UserSingleStep, UserKind.LOCAL_UPDATE: UserMultiStep}[kind]
    idx = cfg_user.user_idx
    return cls(model, loss_fn, dataloaders[idx], setup, idx=idx, cfg_user=cfg_user, **options)

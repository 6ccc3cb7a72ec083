"""Cases (data + user + model + server, composed like breaching's ``config/case/*.yaml``) and the
users they describe.

A case file is a YAML mapping with a Hydra-style ``defaults`` list naming a data config
(``configs/data/<name>.yaml``) and a user config (``configs/user/<name>.yaml``), then its own keys,
which are merged last (``_self_`` may be placed explicitly):

    defaults:
      - data: digits
      - user: local_updates
      - _self_
    model: ConvNet
    server:
      provide_public_buffers: True
    user:
      num_data_points: 8

``server.provide_public_buffers`` (default True, as breaching's honest-but-curious server) decides
whether the payload carries the model's BatchNorm statistics (users then run in eval mode) or
``None`` (users train their own statistics).

Overrides are ``key=value`` (the key must exist), ``+key=value`` (adds a key) or ``group=name``
to pick another config of a group, e.g. ``data=CIFAR10``, ``user.num_local_updates=8``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedjax_users import losses, models
from fedjax_users.config import UserConfig, load_yaml_mapping
from fedjax_users.data.errors import CaseConfigError, DataError
from fedjax_users.data.partition import partition_indices
from fedjax_users.data.sources import Examples, load_examples, normalize
from fedjax_users.models.text import get_text_model
from fedjax_users.types import ServerPayload, UserData


# The bundled configs ship inside the package (the checkout's top-level configs/ links to them).
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CASE = os.path.join(CONFIG_ROOT, "case", "default.yaml")
GROUPS = ("data", "user")
SELF = "_self_"
LOSSES: dict[str, Callable] = {
    "classification": losses.softmax_cross_entropy,
    "causal-lm": losses.causal_lm_loss,
}

# ---------------------------------------------------------------------------------------------
# Loading a case


def _read_yaml(path: str) -> DictConfig:
    return load_yaml_mapping(path, "config file", CaseConfigError)


def _defaults_list(case: DictConfig, path: str) -> list:
    """``[(group, name) | SELF, ...]`` from the case's ``defaults``; ``_self_`` last unless placed."""
    defaults = case.get("defaults") or []
    if not isinstance(defaults, (list, ListConfig)):
        raise CaseConfigError(f"{path}: defaults must be a list of 'group: name' entries, got {defaults!r}")
    entries = []
    for entry in defaults:
        if entry == SELF:
            entries.append(SELF)
        elif isinstance(entry, DictConfig) and len(entry) == 1:
            (group, name), = entry.items()
            if group not in GROUPS:
                raise CaseConfigError(f"{path}: unknown defaults group {group!r}; known groups: {', '.join(GROUPS)}")
            entries.append((group, str(name)))
        else:
            raise CaseConfigError(f"{path}: defaults entries must be '{SELF}' or 'group: name', got {entry!r}")
    return entries if SELF in entries else entries + [SELF]


def _group_file(group: str, name: str, case_path: str) -> str:
    """``<configs>/<group>/<name>.yaml``, beside the case file first, then the bundled configs."""
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(case_path))), group)
    for folder in dict.fromkeys([beside, os.path.join(CONFIG_ROOT, group)]):
        candidate = os.path.join(folder, f"{name}.yaml")
        if os.path.isfile(candidate):
            return candidate
    raise CaseConfigError(f"no {group} config named {name!r} (looked for {name}.yaml in {beside} and {CONFIG_ROOT}/{group})")


def _split_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[tuple[str, str, bool]]]:
    """Group choices ``{group: name}`` and key overrides ``[(key, value, may_add)]``."""
    choices, keys = {}, []
    for item in overrides:
        if "=" not in item:
            raise CaseConfigError(f"override {item!r} is not of the form key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        may_add = key.startswith("+")
        key = key.lstrip("+")
        if not key:
            raise CaseConfigError(f"override {item!r} has no key")
        if key in GROUPS and not may_add:
            choices[key] = value
        else:
            keys.append((key, value, may_add))
    return choices, keys


_ABSENT = object()


def _apply_override(cfg: DictConfig, key: str, value: str, may_add: bool) -> DictConfig:
    if not may_add and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
        raise CaseConfigError(f"override key {key!r} is not in the case (use +{key}=... to add a new key)")
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # OmegaConf raises all three
        raise CaseConfigError(f"cannot apply override {key}={value}: {err}".replace("\n", " ")) from None


def load_case(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a case file (``None``: the bundled default case) and apply command-line overrides."""
    path = DEFAULT_CASE if path is None else os.fspath(path)
    case = _read_yaml(path)
    choices, key_overrides = _split_overrides(overrides)
    entries = _defaults_list(case, path)
    unknown = sorted(set(choices) - {entry[0] for entry in entries if entry != SELF})
    if unknown:
        raise CaseConfigError(f"the case has no {unknown[0]!r} entry in its defaults to replace")
    body = OmegaConf.masked_copy(case, [k for k in case if k != "defaults"])
    cfg = OmegaConf.create()
    for entry in entries:
        if entry == SELF:
            cfg = _merge(cfg, body, path)
        else:
            group, name = entry
            group_path = _group_file(group, choices.get(group, name), path)
            cfg = _merge(cfg, {group: _read_yaml(group_path)}, group_path)
    for key, value, may_add in key_overrides:
        cfg = _apply_override(cfg, key, value, may_add)
    for group in GROUPS:
        _require_mapping(cfg, group, path)
    return cfg


def _merge(cfg: DictConfig, other: Any, where: str) -> DictConfig:
    """``OmegaConf.merge``, a conflict (a list where the case has a mapping) named by its file."""
    try:
        return OmegaConf.merge(cfg, other)
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # OmegaConf raises all three
        raise CaseConfigError(f"{where}: cannot merge: {err}".replace("\n", " ")) from None


def _require_mapping(cfg: DictConfig, group: str, where: str) -> None:
    """A case's ``data`` / ``user`` block, when present, is a mapping of keys (``user: 5`` is not)."""
    value = cfg.get(group)
    if value is not None and not isinstance(value, DictConfig):
        raise CaseConfigError(f"{where}: {group} must be a mapping of {group} keys, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Users of a case


@dataclasses.dataclass(frozen=True)
class UsersCase:
    """Everything the core user functions need: model, server payload, the users' data and config.

    ``data`` holds one user's examples for ``local_gradient`` / ``local_update`` users and the
    users of ``range(*user_range)`` stacked on a leading axis for ``multiuser_aggregate``.
    """

    model: nn.Module
    payload: ServerPayload
    data: UserData
    user_cfg: UserConfig
    loss: Callable
    data_cfg: DictConfig
    user_indices: tuple[int, ...]


def _require(cfg: DictConfig, key: str, where: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise DataError(f"{where} needs a {key!r} entry")
    return value


def user_example_indices(
    examples: Examples, cfg_data: DictConfig, user_idx: int, num_data_points: int, seed: Optional[int] = None
) -> np.ndarray:
    """The first ``num_data_points`` examples of user ``user_idx`` under the data config's partition."""
    partition = _require(cfg_data, "partition", "the data config")
    clients = _require(cfg_data, "default_clients", "the data config")
    indices = partition_indices(
        examples.labels,
        examples.num_classes,
        partition,
        user_idx,
        clients,
        mixup_freq=cfg_data.get("mixup_freq", 2),
        num_data_points=cfg_data.get("num_data_points", 1),
        target_label=cfg_data.get("target_label", 0),
        seed=seed,
    )
    if len(indices) == 0:
        raise DataError(
            f"user {user_idx} has no data under partition {partition!r} "
            f"({len(examples)} examples, {clients} clients)"
        )
    if len(indices) < num_data_points:
        raise DataError(
            f"user {user_idx} has {len(indices)} examples under partition {partition!r}, "
            f"fewer than the {num_data_points} of user.num_data_points"
        )
    return indices[:num_data_points]


def _model_inputs(examples: Examples, indices: np.ndarray, cfg_data: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = examples.take(indices)
    if cfg_data.get("modality") == "vision":
        channels, height, width = _require(cfg_data, "shape", "the data config")
        if inputs.shape[1:] != (height, width, channels):
            raise DataError(
                f"dataset {cfg_data.name!r} has images of shape (H, W, C) {inputs.shape[1:]}, "
                f"data.shape asks for {[channels, height, width]} (C, H, W)"
            )
        if cfg_data.get("normalize", False):
            inputs = normalize(inputs, cfg_data.mean, cfg_data.std)
    return inputs, labels


def _user_indices(user_cfg: UserConfig, cfg_data: DictConfig, key: jax.Array) -> tuple[int, ...]:
    if user_cfg.user_type == "multiuser_aggregate":
        if user_cfg.user_range is None:
            raise DataError("a multiuser_aggregate user needs user.user_range")
        return tuple(range(*user_cfg.user_range))
    if user_cfg.user_idx is None:
        # As the reference, no index means a random client; here drawn from the case's key.
        clients = _require(cfg_data, "default_clients", "the data config")
        return (int(jax.random.randint(key, (), 0, clients)),)
    return (int(user_cfg.user_idx),)


def _user_seed(key: jax.Array, user_idx: int) -> int:
    """Per-user seed for ``random-full``: each user draws its own subset, repeatably."""
    return int(jax.random.bits(jax.random.fold_in(key, user_idx), dtype=jnp.uint32))


def _build_model(cfg_case: DictConfig, cfg_data: DictConfig, examples: Examples) -> nn.Module:
    name = str(_require(cfg_case, "model", "the case"))
    modality = cfg_data.get("modality")
    try:
        if modality == "vision":
            channels = _require(cfg_data, "shape", "the data config")[0]
            return models.get(name, num_classes=examples.num_classes, num_channels=channels)
        if modality == "text":
            return get_text_model(name, vocab_size=examples.num_classes)
    except ValueError as err:
        raise DataError(str(err)) from None
    raise DataError(f"unknown data.modality {modality!r}; expected vision or text")


def _loss(cfg_data: DictConfig) -> Callable:
    task = cfg_data.get("task")
    if task not in LOSSES:
        raise DataError(f"unknown data.task {task!r}; known tasks: {', '.join(LOSSES)}")
    return LOSSES[task]


def _check_classes(cfg_data: DictConfig, examples: Examples) -> None:
    declared = cfg_data.get("vocab_size" if cfg_data.get("modality") == "text" else "classes")
    if declared is not None and declared != examples.num_classes:
        raise DataError(
            f"dataset {cfg_data.name!r} has {examples.num_classes} classes, the data config declares {declared}"
        )


def construct_users(cfg_case: DictConfig, key: Optional[jax.Array] = None) -> UsersCase:
    """Build the case's model, server payload and users' data (``key`` seeds the model and any draws)."""
    key = jax.random.key(0) if key is None else key
    init_key, choice_key, partition_key = jax.random.split(key, 3)
    cfg_data = _require(cfg_case, "data", "the case")
    user_block = _require(cfg_case, "user", "the case")
    for group in GROUPS:
        _require_mapping(cfg_case, group, "the case")
    user_cfg = UserConfig.from_dict(OmegaConf.to_container(user_block, resolve=True))
    loss = _loss(cfg_data)

    examples = load_examples(cfg_data)
    _check_classes(cfg_data, examples)
    model = _build_model(cfg_case, cfg_data, examples)
    user_ids = _user_indices(user_cfg, cfg_data, choice_key)
    seeded = cfg_data.get("partition") == "random-full"
    per_user = [
        _model_inputs(
            examples,
            user_example_indices(
                examples, cfg_data, u, user_cfg.num_data_points, _user_seed(partition_key, u) if seeded else None
            ),
            cfg_data,
        )
        for u in user_ids
    ]
    inputs = np.stack([x for x, _ in per_user])
    labels = np.stack([y for _, y in per_user])
    if user_cfg.user_type != "multiuser_aggregate":
        inputs, labels = inputs[0], labels[0]
    data = UserData(inputs=jnp.asarray(inputs), labels=jnp.asarray(labels))

    variables = model.init(init_key, jnp.asarray(per_user[0][0][:1]))
    server = cfg_case.get("server") or {}
    # A model without buffers still sends an (empty) set, as breaching's server sends an empty list.
    batch_stats = variables.get("batch_stats", {}) if server.get("provide_public_buffers", True) else None
    payload = ServerPayload(params=variables["params"], batch_stats=batch_stats)
    return UsersCase(
        model=model,
        payload=payload,
        data=data,
        user_cfg=user_cfg,
        loss=loss,
        data_cfg=cfg_data,
        user_indices=user_ids,
    )

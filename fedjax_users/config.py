"""``UserConfig``: breaching's user YAML (``cfg_case.user``) as a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

USER_TYPES = ("local_gradient", "local_update", "multiuser_aggregate")
DISTRIBUTIONS = ("gaussian", "laplacian")


class ConfigError(ValueError):
    """A user configuration that breaching would reject or silently misread."""


def _check_keys(given: Mapping[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(known))}")


def _check_type(name: str, value: Any, kind: type) -> None:
    """Reject a value of the wrong type (YAML reads ``2.5``, ``abc`` and ``maybe`` happily)."""
    if value is None:
        return
    is_bool = isinstance(value, (bool, np.bool_))
    if kind is bool:
        ok = is_bool
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not is_bool
    else:
        ok = isinstance(value, numbers.Real) and not is_bool
    if not ok:
        raise ConfigError(f"{name} must be {'a number' if kind is float else 'an ' + kind.__name__ if kind is int else 'a ' + kind.__name__}, got {value!r}")


def _check_types(obj: Any) -> None:
    for field in dataclasses.fields(obj):
        kind = {"int": int, "float": float, "bool": bool}.get(str(field.type).replace("Optional[", "").rstrip("]"))
        if kind is not None:
            _check_type(field.name, getattr(obj, field.name), kind)


def _non_negative(name: str, value: Optional[float]) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class LocalDiffPrivacy:
    """Local defences: gradient/input noise scale (std or Laplace b) and per-example clipping bound."""

    gradient_noise: float = 0.0
    input_noise: float = 0.0
    distribution: str = "laplacian"
    per_example_clipping: float = 0.0

    def __post_init__(self):
        _check_types(self)
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"unknown distribution {self.distribution!r}; expected one of {', '.join(DISTRIBUTIONS)}"
            )
        for name in ("gradient_noise", "input_noise", "per_example_clipping"):
            _non_negative(f"local_diff_privacy.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class UserConfig:
    """The keys of breaching's ``local_gradient``/``local_updates``/``multiuser_aggregate`` YAML files.

    Keys a file does not have stay ``None``; the multi-step keys are required where they are used.
    """

    user_type: str
    num_data_points: int
    user_idx: Optional[int] = None
    user_range: Optional[tuple[int, int]] = None
    provide_buffers: bool = False
    provide_labels: bool = False
    provide_num_data_points: bool = True
    local_diff_privacy: LocalDiffPrivacy = LocalDiffPrivacy()
    num_local_updates: Optional[int] = None
    num_data_per_local_update_step: Optional[int] = None
    local_learning_rate: Optional[float] = None
    provide_local_hyperparams: Optional[bool] = None

    def __post_init__(self):
        if self.user_type not in USER_TYPES:
            raise ConfigError(f"unknown user_type {self.user_type!r}; expected one of {', '.join(USER_TYPES)}")
        if isinstance(self.local_diff_privacy, Mapping):
            _check_keys(self.local_diff_privacy, LocalDiffPrivacy, "local_diff_privacy")
            object.__setattr__(self, "local_diff_privacy", LocalDiffPrivacy(**self.local_diff_privacy))
        if not isinstance(self.local_diff_privacy, LocalDiffPrivacy):
            raise ConfigError(f"local_diff_privacy must be a mapping, got {self.local_diff_privacy!r}")
        _check_types(self)
        if self.user_range is not None:
            object.__setattr__(self, "user_range", tuple(int(v) for v in self.user_range))
            if len(self.user_range) != 2 or self.user_range[1] <= self.user_range[0]:
                raise ConfigError(f"user_range must be [start, stop) with stop > start, got {list(self.user_range)}")
        if self.num_data_points < 1:
            raise ConfigError(f"num_data_points must be >= 1, got {self.num_data_points}")
        for name in ("user_idx", "local_learning_rate"):
            _non_negative(name, getattr(self, name))
        if self.user_range is not None:
            _non_negative("user_range start", self.user_range[0])
        if self.num_local_updates is not None and self.num_local_updates < 1:
            raise ConfigError(f"num_local_updates must be >= 1, got {self.num_local_updates}")
        if self.num_data_per_local_update_step is not None and self.num_data_per_local_update_step < 1:
            raise ConfigError(
                f"num_data_per_local_update_step must be >= 1, got {self.num_data_per_local_update_step}"
            )
        if self.user_type == "local_update" or (self.num_local_updates or 1) > 1:
            self.require_multi_step()

    def require_multi_step(self) -> None:
        """Raise unless the keys of a multi-step (FedAvg) user are all set."""
        missing = [
            name
            for name in ("num_local_updates", "num_data_per_local_update_step", "local_learning_rate")
            if getattr(self, name) is None
        ]
        if missing:
            raise ConfigError(f"a local_update user needs {', '.join(missing)}")

    @property
    def num_users(self) -> int:
        """Users in the silo: ``len(range(*user_range))`` for aggregates, else one."""
        return 1 if self.user_range is None else self.user_range[1] - self.user_range[0]

    @property
    def is_multi_step(self) -> bool:
        """Whether each user trains several local steps (breaching's ``UserMultiStep``)."""
        if self.user_type == "local_update":
            return True
        return self.user_type == "multiuser_aggregate" and (self.num_local_updates or 1) > 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "UserConfig":
        """Build from a mapping of breaching's user keys; unknown keys are errors."""
        _check_keys(values, cls, "user config")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> "UserConfig":
        """Read a breaching user YAML file as it is, then apply ``key=value`` overrides."""
        from omegaconf import OmegaConf

        try:
            loaded = OmegaConf.load(path)
        except FileNotFoundError as err:
            raise ConfigError(f"user config file not found: {path}") from err
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key = item.split("=", 1)[0].strip()
            head = key.split(".")[0]
            if head not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"unknown key {key!r} in overrides")
        merged = OmegaConf.merge(loaded, OmegaConf.from_dotlist(list(overrides)))
        values = OmegaConf.to_container(merged, resolve=True)
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping with breaching's keys (YAML-ready)."""
        values = dataclasses.asdict(self)
        if self.user_range is not None:
            values["user_range"] = list(self.user_range)
        return {k: v for k, v in values.items() if v is not None}

    def replace(self, **changes: Any) -> "UserConfig":
        """A copy with some keys changed (validated again)."""
        return dataclasses.replace(self, **changes)

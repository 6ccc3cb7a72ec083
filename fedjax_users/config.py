"""``UserConfig``: breaching's user YAML (``cfg_case.user``) as a frozen, validated dataclass.

A config is checked when it is built, before anything is computed: unknown keys, values of the
wrong type (by OmegaConf's structured configs), negative scales and the keys a multi-step user
needs are each refused with a one-line ``ConfigError``. breaching's three user files ship in the
package and are found by name (``user_config_names``).

Example::

    >>> from fedjax_users.config import UserConfig
    >>> cfg = UserConfig.from_yaml("local_updates", ["num_data_points=4", "local_diff_privacy.gradient_noise=0.1"])
    >>> cfg.kind.value, cfg.is_multi_step, cfg.local_diff_privacy.gradient_noise
    ('local_update', True, 0.1)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from omegaconf import BooleanNode, DictConfig, FloatNode, IntegerNode, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["DISTRIBUTIONS", "USER_CONFIGS", "USER_TYPES", "ConfigError", "LocalDiffPrivacy", "UserConfig", "UserKind",
           "load_yaml_mapping", "user_config_names"]

# breaching's values of ``user_type`` and of ``local_diff_privacy.distribution``.
USER_TYPES = ("local_gradient", "local_update", "multiuser_aggregate")
DISTRIBUTIONS = ("gaussian", "laplacian")


class UserKind(str, enum.Enum):
    """The three users of breaching, by their ``user_type``: what ``UserConfig.kind`` decides once.

    A ``str`` enum: each member equals its ``user_type`` string.

    Attributes:
      LOCAL_GRADIENT: ``"local_gradient"``, breaching's ``UserSingleStep`` (one gradient).
      LOCAL_UPDATE: ``"local_update"``, ``UserMultiStep`` (local SGD; shares the parameter difference).
      AGGREGATE: ``"multiuser_aggregate"``, ``MultiUserAggregate`` (the mean over a cohort of users).

    Example::

        >>> UserKind("local_update") is UserKind.LOCAL_UPDATE, UserKind.AGGREGATE == "multiuser_aggregate"
        (True, True)
    """

    LOCAL_GRADIENT = "local_gradient"  # UserSingleStep: one gradient
    LOCAL_UPDATE = "local_update"  # UserMultiStep: local SGD, shares the parameter difference
    AGGREGATE = "multiuser_aggregate"  # MultiUserAggregate: the mean over a cohort of users


class ConfigError(ValueError):
    """A user configuration that breaching would reject or silently misread."""


def _yaml_problem(err: Exception) -> str:
    """``problem (line L, column C)`` of a YAML error, on one line."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return problem if mark is None else f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def load_yaml_mapping(path: str | os.PathLike, what: str = "user config file", error: type = ConfigError):
    """The YAML mapping in ``path`` as an OmegaConf ``DictConfig``; anything else is ``error`` naming ``path``.

    A folder, an unreadable or binary file, broken YAML, an empty file and a file holding a list or
    a bare string are each refused with their own one-line message.

    Args:
      path: the YAML file.
      what: how messages name the file (``"config file"`` for a case).
      error: the exception type raised (``ConfigError``; ``data.errors.CaseConfigError`` for a case).

    Returns:
      The file's mapping, as OmegaConf reads it (interpolations unresolved).

    Raises:
      error: the file is missing, a folder, unreadable, not text, not YAML, empty or not a mapping.

    Example::

        >>> import os
        >>> load_yaml_mapping(os.path.join(USER_CONFIGS, "local_gradient.yaml")).user_type
        'local_gradient'
        >>> load_yaml_mapping("no/such/file.yaml")
        Traceback (most recent call last):
        ...
        fedjax_users.config.ConfigError: user config file not found: no/such/file.yaml
    """
    import yaml
    from omegaconf import OmegaConf

    path = os.fspath(path)
    if os.path.isdir(path):
        raise error(f"{what} {path} is a folder, not a YAML file")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not a text file") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        # The node kind, before OmegaConf reads it: OmegaConf makes a bare string a mapping key.
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {_yaml_problem(err)}") from None
    if node is None:
        raise error(f"{what} {path} is empty: it must hold a mapping of keys")
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the value {text.strip()[:40]!r}"
        raise error(f"{what} {path} must hold a mapping of keys, got {kind}")
    try:
        return OmegaConf.create(text)
    except Exception as err:  # noqa: BLE001  (OmegaConf's loader refuses, e.g., duplicate keys)
        raise error(f"{what} {path} cannot be read: {_yaml_problem(err)}") from None


def _check_keys(given: Mapping[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(known))}")


# How a message names the type OmegaConf checked a field against (its node in the structured config).
KIND_NAMES = {BooleanNode: "a bool", IntegerNode: "an int", FloatNode: "a number"}


@functools.cache
def _schema(cls: type) -> tuple[DictConfig, dict[str, type]]:
    """OmegaConf's structured config of the dataclass ``cls`` and the node type of each field, built once.

    A frozen dataclass gives a read-only config; it is opened because values are merged into it
    (to be checked: the merged copy is thrown away, never stored).
    """
    schema = OmegaConf.structured(cls, flags={"readonly": False})
    return schema, {name: type(schema._get_node(name)) for name in schema}


def _check_types(obj: Any, prefix: str = "") -> None:
    """Check the fields of the dataclass ``obj`` against their annotations, by OmegaConf's structured config.

    Args:
      obj: a ``UserConfig`` or ``LocalDiffPrivacy``; a field that is itself a dataclass is left to
        that dataclass's own check.
      prefix: how messages name the YAML block (``"local_diff_privacy."``).

    Raises:
      ConfigError: a value OmegaConf refuses or would convert (``"5"`` or ``5`` for a bool: YAML
        reads ``2.5``, ``abc`` and ``maybe`` happily), or a non-finite number (YAML's ``.nan`` and
        ``.inf`` pass every ``>= 0`` test and would turn a defence off, ``nan > 0`` being false, or
        every update into NaN). An int is a number.
    """
    items = tuple((f.name, type(value), value) for f in dataclasses.fields(obj)
                  if not dataclasses.is_dataclass(value := getattr(obj, f.name)))
    try:
        hash(items)
    except TypeError:  # a list where a number belongs, say: checked, not remembered
        return _check_values.__wrapped__(type(obj), prefix, items)
    # Remembered per class and typed values: a config built again (``replace``) costs no merge.
    return _check_values(type(obj), prefix, items)


@functools.lru_cache(maxsize=4096)
def _check_values(cls: type, prefix: str, items: tuple) -> None:
    """``_check_types`` of the fields ``items`` (``(name, type, value)``) of a ``cls``."""
    schema, nodes = _schema(cls)
    # OmegaConf takes Python's primitives: NumPy scalars are checked as the Python values they hold.
    plain = {name: value.item() if isinstance(value, np.generic) else value for name, _, value in items}
    try:
        checked = OmegaConf.merge(schema, plain)
    except OmegaConfBaseException as err:  # the field is the first part of OmegaConf's key (user_range[0])
        name = re.split(r"[.\[]", str(err.full_key))[0]
        given = {field: value for field, _, value in items}
        kind = KIND_NAMES.get(nodes.get(name))
        raise ConfigError(f"{prefix}{name} must be {kind}, got {given.get(name)!r}" if kind
                          else f"{prefix}{name}: {str(err).splitlines()[0]}") from None
    for name, _, value in items:
        kind = nodes[name]
        if kind not in KIND_NAMES or value is None:
            continue
        # OmegaConf converts what it can ("5" to 5, 1 to True): a value it had to convert had the
        # wrong type, except an int for a number.
        if type(checked[name]) is not type(plain[name]) and not (kind is FloatNode and type(plain[name]) is int):
            raise ConfigError(f"{prefix}{name} must be {KIND_NAMES[kind]}, got {value!r}")
        if kind is FloatNode and not math.isfinite(checked[name]):
            raise ConfigError(f"{prefix}{name} must be a finite number, got {value!r}")


def _check_required(obj: Any, names: Sequence[str]) -> None:
    missing = [name for name in names if getattr(obj, name) is None]
    if missing:
        raise ConfigError(f"a user config needs {', '.join(missing)} (got None)")


def _user_range(value: Any) -> tuple[int, int]:
    """``[start, stop)`` as a tuple of two ints; ``[0.5, 3]`` or ``5`` is an error, never truncated."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) or len(value) != 2:
        raise ConfigError(f"user_range must be [start, stop) with stop > start, got {value!r}")
    for bound in value:
        if not isinstance(bound, numbers.Integral) or isinstance(bound, (bool, np.bool_)):
            raise ConfigError(f"user_range must hold two ints, got {list(value)!r}")
    return int(value[0]), int(value[1])


def _non_negative(name: str, value: Optional[float]) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class LocalDiffPrivacy:
    """Local defences: gradient/input noise scale (std or Laplace b) and per-example clipping bound.

    breaching's ``local_diff_privacy`` block; 0 turns a defence off. Checked when built: a known
    ``distribution``, numbers (finite, >= 0) where numbers belong.

    Attributes:
      gradient_noise: scale of the i.i.d. noise added to every entry of the shared gradient.
      input_noise: scale of the i.i.d. noise added to every input before the forward pass.
      distribution: ``"gaussian"`` (a scale is the standard deviation) or ``"laplacian"`` (a scale is
        Laplace's ``b``).
      per_example_clipping: the bound ``C`` on a gradient's global L2 norm: each example's for a
        single-step user, each step's batch gradient for a multi-step user.

    Example::

        >>> LocalDiffPrivacy(gradient_noise=0.01, distribution="gaussian").per_example_clipping
        0.0
        >>> LocalDiffPrivacy(input_noise=-1.0)
        Traceback (most recent call last):
        ...
        fedjax_users.config.ConfigError: local_diff_privacy.input_noise must be >= 0, got -1.0
    """

    gradient_noise: float = 0.0
    input_noise: float = 0.0
    distribution: str = "laplacian"
    per_example_clipping: float = 0.0

    def __post_init__(self):
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"unknown distribution {self.distribution!r}; expected one of {', '.join(DISTRIBUTIONS)}"
            )
        _check_types(self, "local_diff_privacy.")
        for name in ("gradient_noise", "input_noise", "per_example_clipping"):
            _non_negative(f"local_diff_privacy.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class UserConfig:
    """The keys of breaching's ``local_gradient``/``local_updates``/``multiuser_aggregate`` YAML files.

    Keys a file does not have stay ``None``; the multi-step keys are required where they are used.
    Checked when built (types, ranges, the keys its kind needs); frozen and hashable.

    Attributes:
      user_type: ``"local_gradient"``, ``"local_update"`` or ``"multiuser_aggregate"`` (``UserKind``).
      num_data_points: the examples each user takes (the first ones it holds), at least 1.
      user_idx: which user of the data's partition (a single user).
      user_range: ``(start, stop)``, the users ``range(start, stop)`` of an aggregate.
      provide_buffers: whether the user shares its BatchNorm buffers.
      provide_labels: whether the metadata reveal the labels.
      provide_num_data_points: whether the metadata reveal ``num_data_points``.
      local_diff_privacy: the local defences (a mapping is read as ``LocalDiffPrivacy``).
      num_local_updates: local SGD steps of a multi-step user.
      num_data_per_local_update_step: examples per local step.
      local_learning_rate: the local SGD step size.
      provide_local_hyperparams: whether a multi-step user's metadata reveal its schedule and each
        step's labels.

    Example::

        >>> cfg = UserConfig(user_type="multiuser_aggregate", num_data_points=2, user_range=[0, 4])
        >>> cfg.num_users, cfg.is_aggregate, cfg.is_multi_step
        (4, True, False)
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
        _check_required(self, ("user_type", "num_data_points"))
        if self.user_range is not None:  # as a tuple of two ints first: its own messages, and hashable
            object.__setattr__(self, "user_range", _user_range(self.user_range))
        _check_types(self)
        if self.user_range is not None:
            if self.user_range[1] <= self.user_range[0]:
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
        if self.kind is UserKind.LOCAL_GRADIENT and (self.num_local_updates or 1) > 1:
            # breaching's UserSingleStep would ignore the steps and take one gradient.
            raise ConfigError(
                f"a local_gradient user takes one gradient, got num_local_updates={self.num_local_updates}; "
                "use user_type local_update for local training"
            )
        if self.kind is UserKind.LOCAL_UPDATE or (self.num_local_updates or 1) > 1:
            self.require_multi_step()

    def require_multi_step(self) -> None:
        """Raise unless the keys of a multi-step (FedAvg) user are all set.

        Raises:
          ConfigError: naming the missing keys among ``num_local_updates``,
            ``num_data_per_local_update_step`` and ``local_learning_rate``.
        """
        missing = [
            name
            for name in ("num_local_updates", "num_data_per_local_update_step", "local_learning_rate")
            if getattr(self, name) is None
        ]
        if missing:
            raise ConfigError(f"a local_update user needs {', '.join(missing)}")

    @property
    def kind(self) -> UserKind:
        """Which user this config describes: the one place ``user_type`` is read."""
        return UserKind(self.user_type)

    @property
    def is_aggregate(self) -> bool:
        """Whether this config describes a cohort of users (breaching's ``MultiUserAggregate``)."""
        return self.kind is UserKind.AGGREGATE

    @property
    def num_users(self) -> int:
        """Users in the silo: ``len(range(*user_range))`` for aggregates, else one."""
        return 1 if self.user_range is None else self.user_range[1] - self.user_range[0]

    @property
    def is_multi_step(self) -> bool:
        """Whether each user trains several local steps (breaching's ``UserMultiStep``)."""
        if self.kind is UserKind.LOCAL_UPDATE:
            return True
        return self.is_aggregate and (self.num_local_updates or 1) > 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "UserConfig":
        """Build from a mapping of breaching's user keys; unknown or missing keys are errors.

        Args:
          values: breaching's user keys (a ``dict``, or OmegaConf's ``cfg_case.user`` as a container);
            ``local_diff_privacy`` may be a mapping.

        Returns:
          The validated config.

        Raises:
          ConfigError: ``values`` is no mapping, has an unknown key, lacks ``user_type`` or
            ``num_data_points``, or holds a value the config refuses.

        Example::

            >>> UserConfig.from_dict({"user_type": "local_gradient", "num_data_points": 3}).num_users
            1
        """
        if not isinstance(values, Mapping):
            raise ConfigError(f"a user config must be a mapping of breaching's user keys, got {values!r}")
        _check_keys(values, cls, "user config")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ConfigError(f"a user config needs {', '.join(missing)}")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> "UserConfig":
        """Read a breaching user YAML file as it is, then apply ``key=value`` overrides.

        Args:
          path: a YAML file, or the name of one of breaching's user configs shipped in the package
            (``"local_gradient"``, ``"local_updates"``, ``"multiuser_aggregate"``: :func:`user_config_names`),
            found from any folder and in an installed wheel.
          overrides: ``key=value`` items, as on breaching's command line.

        Returns:
          The validated config.

        Example::

            >>> UserConfig.from_yaml("local_updates", ["num_data_points=8"]).num_data_points
            8
        """
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        path = _user_config_path(path)
        loaded = load_yaml_mapping(path)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key = item.split("=", 1)[0].strip()
            head = key.split(".")[0]
            if head not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"unknown key {key!r} in overrides")
        try:
            merged = OmegaConf.merge(loaded, OmegaConf.from_dotlist(list(overrides)))
            values = OmegaConf.to_container(merged, resolve=True)
        except (OmegaConfBaseException, TypeError, ValueError) as err:  # OmegaConf raises all three
            raise ConfigError(f"{path}: cannot apply overrides {' '.join(overrides)}: {_yaml_problem(err)}") from None
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping with breaching's keys (YAML-ready).

        Returns:
          The keys that are set (``None`` ones left out), ``local_diff_privacy`` as a nested dict and
          ``user_range`` as a list; ``UserConfig.from_dict`` of it is an equal config.

        Example::

            >>> values = UserConfig(user_type="local_gradient", num_data_points=1).to_dict()
            >>> values["num_data_points"], values["local_diff_privacy"]["distribution"], "user_idx" in values
            (1, 'laplacian', False)
        """
        values = dataclasses.asdict(self)
        if self.user_range is not None:
            values["user_range"] = list(self.user_range)
        return {k: v for k, v in values.items() if v is not None}

    def replace(self, **changes: Any) -> "UserConfig":
        """A copy with some keys changed (validated again).

        Args:
          **changes: new values of ``UserConfig`` fields.

        Returns:
          A new config; this one is unchanged.

        Example::

            >>> UserConfig.from_yaml("local_gradient").replace(num_data_points=5).num_data_points
            5
        """
        return dataclasses.replace(self, **changes)


# breaching's user YAML files, shipped in the package (configs/user/NAME.yaml): the folder.
USER_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "user")


def user_config_names() -> list[str]:
    """The names of the user configs shipped in the package.

    Returns:
      The sorted names, each usable as ``UserConfig.from_yaml(name)``.

    Example::

        >>> user_config_names()
        ['local_gradient', 'local_updates', 'multiuser_aggregate']
    """
    return sorted(os.path.splitext(f)[0] for f in os.listdir(USER_CONFIGS) if f.endswith(".yaml"))


def _user_config_path(path: str | os.PathLike) -> str:
    """``path`` itself, or the shipped config of that name: a bare name that is no file here."""
    path = os.fspath(path)
    if os.path.exists(path) or os.sep in path or path.endswith((".yaml", ".yml")):
        return path
    names = user_config_names()
    if path not in names:
        from fedjax_users.suggestions import did_you_mean

        hint = did_you_mean(path, names)
        raise ConfigError(f"no user config file or shipped user config named {path!r}; "
                          + (f"{hint} " if hint else "") + f"shipped: {', '.join(names)}")
    return os.path.join(USER_CONFIGS, path + ".yaml")

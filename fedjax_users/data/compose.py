"""Composing a case file as breaching (Hydra) does: its defaults list, ``_self_``, then overrides.

A case file names one config per group in its ``defaults`` list, then holds its own keys:

    defaults:
      - data: ImageNetAnimals
      - impl: default
      - server: honest-but-curious
      - user: local_gradient
      - _self_
    model: ResNet18

Each entry ``group: name`` is the file ``<group>/<name>.yaml`` of the config tree the case sits in,
looked for, in this order:

1. beside the case file (``<case dir>/<group>/``): breaching's layout, whose case files sit in
   ``config/case/`` and whose groups are ``config/case/data/``, ``config/case/impl/``, ...;
2. one folder up (``<case dir>/../<group>/``): the layout of the bundled ``configs/``, whose cases
   sit in ``configs/case/`` beside ``configs/data/``;
3. the bundled ``fedjax_users/configs/<group>/`` (which has every group breaching's cases name).

A group config may have its own ``defaults`` (breaching's data configs name ``db: none``),
resolved the same way relative to its own file and placed under its group (``data.db``).
``_self_`` (the file's own keys) goes where it is listed, else last. Then the command line:
``group=name`` picks another config of a group the case names, ``key=value`` sets a key that
exists, ``+key=value`` adds one.

A data config that lists ``inherit: [keys]`` (the bundled ``synthetic``), chosen on the command
line in place of the case's own data config, takes those keys from the config it replaces, and
records the replaced config's name as ``data.like``: ``data=synthetic`` then gives data of the
case's shape, classes and partition, and the model breaching builds for the replaced data.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedjax_users.config import load_yaml_mapping
from fedjax_users.data.errors import CaseConfigError
from fedjax_users.suggestions import did_you_mean

# The bundled configs ship inside the package (the checkout's top-level configs/ links to them).
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CASE = os.path.join(CONFIG_ROOT, "case", "default.yaml")
SELF = "_self_"
INHERIT = "inherit"
HYDRA_FLOATS = {"nan": float("nan"), "inf": float("inf"), "+inf": float("inf"), "-inf": float("-inf")}
# Keys a case may set on the command line without ``+`` although breaching's files lack them.
OPTIONAL_KEYS = {"server.weights": None}


def _read_yaml(path: str) -> DictConfig:
    return load_yaml_mapping(path, "config file", CaseConfigError)


def _defaults_list(config: DictConfig, path: str) -> list:
    """``[(group, name) | SELF, ...]`` from a file's ``defaults``; ``_self_`` last unless placed."""
    defaults = config.get("defaults") or []
    if not isinstance(defaults, (list, ListConfig)):
        raise CaseConfigError(f"{path}: defaults must be a list of 'group: name' entries, got {defaults!r}")
    entries = []
    for entry in defaults:
        if entry == SELF:
            entries.append(SELF)
        elif isinstance(entry, DictConfig) and len(entry) == 1:
            (group, name), = entry.items()
            entries.append((str(group), None if name is None else str(name)))
        else:
            raise CaseConfigError(f"{path}: defaults entries must be '{SELF}' or 'group: name', got {entry!r}")
    return entries if SELF in entries else entries + [SELF]


def _group_folders(group: str, owner: str, package: tuple[str, ...]) -> list[str]:
    """Where ``group`` of the file ``owner`` (placed at ``package``) is looked for, in order."""
    here = os.path.dirname(os.path.abspath(owner))
    folders = [os.path.join(here, group)]
    if not package:  # a case file: also the bundled layout's sibling folders
        folders.append(os.path.join(os.path.dirname(here), group))
    folders.append(os.path.join(CONFIG_ROOT, *package, group))
    return list(dict.fromkeys(folders))


def _options(folders: Sequence[str]) -> list[str]:
    found = set()
    for folder in folders:
        if os.path.isdir(folder):
            found.update(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
    return sorted(found)


def group_file(group: str, name: str, owner: str, package: tuple[str, ...] = ()) -> str:
    """The file of option ``name`` of ``group`` for the config file ``owner`` (see the module docstring)."""
    folders = _group_folders(group, owner, package)
    for folder in folders:
        candidate = os.path.join(folder, f"{name}.yaml")
        if os.path.isfile(candidate):
            return candidate
    where = ".".join(package + (group,))
    options = _options(folders)
    raise CaseConfigError(
        f"no {where} config named {name!r} (looked for {name}.yaml in {', '.join(folders)}); "
        f"options: {', '.join(options) if options else 'none'}"
    )


def _merge(cfg: DictConfig, other: Any, where: str) -> DictConfig:
    """``OmegaConf.merge``, a conflict (a list where the case has a mapping) named by its file."""
    try:
        return OmegaConf.merge(cfg, other)
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # OmegaConf raises all three
        raise CaseConfigError(f"{where}: cannot merge: {err}".replace("\n", " ")) from None


def _nest(package: tuple[str, ...], value: Any) -> Any:
    for key in reversed(package):
        value = {key: value}
    return value


def _compose_file(path: str, package: tuple[str, ...], choices: dict[str, str]) -> DictConfig:
    """One config file with its defaults resolved, as the mapping to place at ``package``."""
    own = _read_yaml(path)
    body = OmegaConf.masked_copy(own, [k for k in own if k != "defaults"])
    cfg = OmegaConf.create()
    for entry in _defaults_list(own, path):
        if entry == SELF:
            cfg = _merge(cfg, body, path)
            continue
        group, name = entry
        name = choices.get(group, name) if not package else name
        if name is None:  # ``group: null`` in a defaults list leaves the group out, as Hydra
            continue
        sub_path = group_file(group, name, path, package)
        sub = _compose_file(sub_path, package + (group,), {})
        if not package and group in choices and choices[group] != entry[1] and INHERIT in sub:
            sub = _inherit(sub, group, entry[1], path)
        cfg = _merge(cfg, {group: sub}, sub_path)
    return cfg


def _inherit(chosen: DictConfig, group: str, replaced: Optional[str], case_path: str) -> DictConfig:
    """``chosen`` with its ``inherit`` keys taken from the config ``replaced`` of ``group``."""
    keys = chosen.get(INHERIT)
    if replaced is None or not isinstance(keys, (list, ListConfig)):
        return chosen
    original = _compose_file(group_file(group, replaced, case_path), (group,), {})
    taken = {str(k): original[k] for k in keys if k in original}
    return _merge(chosen, {**taken, "like": original.get("name", replaced)}, case_path)


def _split_overrides(
    overrides: Sequence[str], groups: set[str]
) -> tuple[dict[str, str], list[tuple[str, str, bool]]]:
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
        if key in groups and not may_add:
            choices[key] = value
        else:
            keys.append((key, value, may_add))
    return choices, keys


_ABSENT = object()


def _dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every key of ``cfg`` as a dotted path (``user.num_data_points``), blocks included."""
    keys = []
    for name in cfg.keys():
        path = f"{prefix}{name}"
        keys.append(path)
        child = cfg._get_node(name)
        if isinstance(child, DictConfig):
            keys += _dotted_keys(child, path + ".")
    return keys


def _apply_override(cfg: DictConfig, key: str, value: str, may_add: bool) -> DictConfig:
    if not may_add and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
        hint = did_you_mean(key, _dotted_keys(cfg))
        raise CaseConfigError(f"override key {key!r} is not in the case" + (f"; {hint}" if hint else "")
                              + f" (use +{key}=... to add a new key)")
    if value.lower() in HYDRA_FLOATS:
        # Hydra's override grammar (breaching's command line) reads nan and inf as floats; YAML,
        # which OmegaConf's dotlist uses, reads them as strings and only .nan / .inf as floats.
        return OmegaConf.merge(cfg, OmegaConf.create(_nest(tuple(key.split(".")), HYDRA_FLOATS[value.lower()])))
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
    except yaml.YAMLError as err:  # an unclosed [ or {: the parser's message, without its context lines
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CaseConfigError(f"cannot parse override {key}={value}: {problem}") from None
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # OmegaConf raises all three
        raise CaseConfigError(f"cannot apply override {key}={value}: {err}".replace("\n", " ")) from None


def _with_optional_keys(cfg: DictConfig) -> DictConfig:
    """Add ``OPTIONAL_KEYS`` (at their defaults) where their parent block exists and they do not."""
    for key, default in OPTIONAL_KEYS.items():
        parent = key.rsplit(".", 1)[0]
        if isinstance(OmegaConf.select(cfg, parent), DictConfig) and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(_nest(tuple(key.split(".")), default)))
    return cfg


def load_case(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a case file (``None``: the bundled default case) and apply command-line overrides."""
    path = DEFAULT_CASE if path is None else os.fspath(path)
    case = _read_yaml(path)
    groups = {entry[0] for entry in _defaults_list(case, path) if entry != SELF}
    choices, key_overrides = _split_overrides(overrides, groups)
    _check_group_choices(overrides, groups, path)
    cfg = _with_optional_keys(_compose_file(path, (), choices))
    for key, value, may_add in key_overrides:
        cfg = _apply_override(cfg, key, value, may_add)
    for group in sorted(groups):
        require_mapping(cfg, group, path)
    return cfg


def _check_group_choices(overrides: Sequence[str], groups: set[str], path: str) -> None:
    """``data=...`` on a case without a ``data`` entry in its defaults has nothing to replace."""
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key in ("data", "impl", "server", "user") and key not in groups and "." not in value and "[" not in value:
            raise CaseConfigError(f"{path}: the case has no {key!r} entry in its defaults to replace")


def require_mapping(cfg: DictConfig, group: str, where: str) -> None:
    """A case's group block, when present, is a mapping of keys (``user: 5`` is not)."""
    value = cfg.get(group)
    if value is not None and not isinstance(value, DictConfig):
        raise CaseConfigError(f"{where}: {group} must be a mapping of {group} keys, got {value!r}")

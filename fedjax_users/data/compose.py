"""Composing a case file with Hydra, as breaching does, then its command-line overrides.

breaching composes its cases with Hydra (``breaching.get_case_config``: ``hydra.initialize`` on
``config/case`` and ``hydra.compose`` of the case's name with the command line); ``load_case`` makes
the same two calls, so a case file means here what it means to breaching. A case file names one
config per group in its ``defaults`` list, then holds its own keys:

    defaults:
      - data: ImageNetAnimals
      - impl: default
      - server: honest-but-curious
      - user: local_gradient
      - _self_
    model: ResNet18

Hydra looks for ``<group>/<name>.yaml`` along its search path, first match first:

1. the case file's own folder: breaching's layout, whose groups are ``config/case/data/``, ...;
2. the folder above it: the layout of the bundled ``configs/``, whose cases sit in ``configs/case/``
   beside ``configs/data/``;
3. the bundled ``fedjax_users/configs/`` (which has every group breaching's cases name, and the
   data configs only this package reads: ``digits``, ``synthetic``, ``random_tokens``, ...).

The command line is Hydra's override grammar: ``group=name`` picks another config of a group,
``key=value`` sets a key that exists, ``+key=value`` adds one (``nan`` and ``inf`` are numbers).
On top of Hydra, ``load_case`` gives:

* one-line errors naming the case file and the override at fault, with the closest key or config
  name where one was mistyped (Hydra's own messages span lines and name no file);
* YAML's ``.nan`` / ``.inf`` read as Hydra's ``nan`` / ``inf`` (the spelling of breaching's YAML files);
* ``server.weights`` settable without ``+`` although breaching's server configs lack it;
* a data config that lists ``inherit: [keys]`` (the bundled ``synthetic``), chosen on the command
  line in place of the case's own data config, takes those keys from the config it replaces (unless
  the command line sets them) and records the replaced config's name as ``data.like``:
  ``data=synthetic`` then gives data of the case's shape, classes and partition, and the model
  breaching builds for the replaced data.

Example::

    >>> from fedjax_users.data.compose import load_case
    >>> cfg = load_case(None, ["user.num_local_updates=8", "data=synthetic"])
    >>> cfg.data.name, cfg.data.like, cfg.user.num_local_updates
    ('synthetic', 'digits', 8)
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from typing import Any, Iterator, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.version import VersionBase
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fedjax_users.config import load_yaml_mapping
from fedjax_users.data.errors import CaseConfigError
from fedjax_users.suggestions import did_you_mean

__all__ = ["CONFIG_ROOT", "DEFAULT_CASE", "load_case", "require_mapping"]

# The bundled configs ship inside the package (the checkout's top-level configs/ links to them), and
# the case composed when none is given.
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CASE = os.path.join(CONFIG_ROOT, "case", "default.yaml")
INHERIT = "inherit"
# YAML's spellings (OmegaConf's, in breaching's files) of the floats Hydra's grammar spells nan / inf.
YAML_FLOATS = {".nan": "nan", ".inf": "inf", "+.inf": "+inf", "-.inf": "-inf"}
# Keys a case may set on the command line without ``+`` although breaching's files lack them.
OPTIONAL_KEYS = {"server.weights": None}
# The compose API keeps its state in a process-wide singleton (GlobalHydra): one composition at a time.
_HYDRA_LOCK = threading.RLock()
# Exceptions a composition raises: Hydra's, OmegaConf's, and plain ValueErrors for a malformed
# defaults list or a group override whose value is no name (``user=5``).
_REFUSED = (HydraException, OmegaConfBaseException, ValueError, TypeError)


def load_case(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a case file with Hydra and apply command-line overrides, as breaching does.

    Args:
      path: a case file (``.yaml``), or ``None`` for the bundled default case. Names of cases
        (``4_fedavg_small_scale``) are resolved to files by ``fedjax_users.data.catalog.resolve``.
      overrides: command-line items in Hydra's grammar (``data=synthetic``, ``user.num_data_points=2``,
        ``+data.target_label=3``).

    Returns:
      The composed case (not in struct mode: keys may be added), without its ``defaults``.

    Raises:
      CaseConfigError: the file, one of its configs or an override is refused, in one line.

    Example::

        >>> load_case(None, ["user=local_gradient"]).user.user_type
        'local_gradient'
    """
    path = os.path.abspath(DEFAULT_CASE if path is None else os.fspath(path))
    load_yaml_mapping(path, "config file", CaseConfigError)  # the file itself: our one-line errors
    if not path.endswith(".yaml"):
        # Hydra reads a config by its name and appends .yaml to it.
        raise CaseConfigError(f"config file {path} must be named *.yaml to be composed (as Hydra reads configs)")
    items = [_hydra_override(item) for item in overrides]
    parsed = [_parse(item) for item in items]
    with _hydra(os.path.dirname(path)):
        cfg, choices = _compose_or_explain(path, items, parsed)
        cfg = _inherit(cfg, choices, parsed, path)
    cfg = _with_optional_keys(cfg)
    for group in sorted(choices):
        require_mapping(cfg, group, path)
    return cfg


def _hydra_override(item: str) -> str:
    """``item`` for Hydra's parser: checked for a key, YAML's ``.nan``, ``server.weights`` made settable."""
    if item.lstrip().startswith("~") and "=" not in item:  # Hydra's ``~key``: delete a key
        return item
    if "=" not in item:
        raise CaseConfigError(f"override {item!r} is not of the form key=value")
    key, value = (part.strip() for part in item.split("=", 1))
    if not key.lstrip("+~"):
        raise CaseConfigError(f"override {item!r} has no key")
    value = YAML_FLOATS.get(value.lower(), value)
    if value.startswith("~"):
        # A home-relative path (data.path=~/data): a shell leaves the ~ of such a word alone (the
        # part before = is not a variable name), and Hydra's grammar has no unquoted ~ in a value.
        # Expanded here, as the shell would in an assignment, so the run's config records the path.
        value = os.path.expanduser(value)
        if value.startswith("~") or any(char.isspace() for char in value):  # no such user, or a space: quoted
            value = "'" + value.replace("'", "\\'") + "'"
    if key in OPTIONAL_KEYS:
        key = "++" + key  # Hydra's add-or-override: the key need not be in the server config
    return f"{key}={value}"


def _parse(item: str) -> Override:
    """``item`` parsed by Hydra's override parser; a malformed one is a one-line error."""
    try:
        return OverridesParser.create().parse_overrides([item])[0]
    except OverrideParseException as err:
        raise CaseConfigError(f"cannot parse override {item}: {_one_line(err.message)}") from None


def _one_line(message: str) -> str:
    """Hydra's message on one line, without its pointers to the documentation and the search path."""
    lines = []
    for line in str(message).splitlines():
        if line.startswith(("See https://", "Config search path")):
            break
        if line.strip() not in ("", "^") and not line.startswith(("Error parsing override", "    ")):
            lines.append(line.strip())
    return " ".join(lines)


def _search_path(folder: str) -> list[str]:
    """Where Hydra looks for a case's groups after the case's own folder (see the module docstring)."""
    return list(dict.fromkeys([os.path.dirname(folder), CONFIG_ROOT]))


def _quoted(text: str) -> str:
    """``text`` as a quoted string of Hydra's grammar (a folder's name may hold spaces, commas, quotes).

    In a quoted string only the backslashes before a quote are escapes, so only those are doubled.
    """
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"


@contextlib.contextmanager
def _hydra(folder: str) -> Iterator[None]:
    """Hydra's compose API set up on ``folder``, one composition at a time.

    A program that set up Hydra itself (a ``@hydra.main`` application, or inside breaching's
    ``hydra.initialize``) gets its set-up and version base back afterwards: the compose API refuses
    to start while another is set up.
    """
    with _HYDRA_LOCK, warnings.catch_warnings():
        # breaching's cases and ours follow Hydra >= 1.1 (``_self_`` last when unlisted); this
        # warning is Hydra's note to configs written for 1.0.
        warnings.filterwarnings("ignore", message=".*Defaults list is missing `_self_`", category=UserWarning)
        outer, base = GlobalHydra.instance().hydra, VersionBase.instance().getbase()
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=folder, version_base="1.3"):
                yield
        finally:
            VersionBase.instance().version_base = base
            if outer is not None:
                GlobalHydra.instance().clear()
                GlobalHydra.instance().initialize(outer)


def _compose(path: str, items: Sequence[str]) -> tuple[DictConfig, dict[str, Optional[str]]]:
    """Hydra's composition of the case file ``path`` with ``items``, and the config it chose per group.

    Args:
      path: the case file, in the folder the compose API was set up on.
      items: overrides in Hydra's grammar.

    Returns:
      The composed config (struct mode off, as a case's users add keys) and ``{group: name}`` for
      the case's top-level groups.
    """
    folders = ",".join(_quoted(f"file://{folder}") for folder in _search_path(os.path.dirname(path)))
    cfg = compose(config_name=os.path.basename(path)[: -len(".yaml")],
                  overrides=[f"hydra.searchpath=[{folders}]", *items], return_hydra_config=True)
    choices = {str(k): v for k, v in cfg.hydra.runtime.choices.items() if "/" not in str(k)}
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.set_struct(cfg, False)
    return cfg, choices


def _compose_or_explain(path: str, items: Sequence[str], parsed: Sequence[Override]
                        ) -> tuple[DictConfig, dict[str, Optional[str]]]:
    """``_compose``; when Hydra refuses, the override at fault is found and named in one line.

    Hydra applies the command line in one go, so the culprit is the first item whose addition to
    the items before it makes the composition fail (found only on failure).
    """
    try:
        return _compose(path, items)
    except MissingConfigException as err:
        raise _missing_config(err, path) from None
    except _REFUSED as err:
        refused = err
    for count in range(len(items) + 1):
        try:
            cfg, choices = _compose(path, items[:count])
        except MissingConfigException as err:
            raise _missing_config(err, path) from None
        except _REFUSED as err:
            if count == 0:  # the case itself does not compose
                merge = isinstance(err.__context__, OmegaConfBaseException) and err.__cause__ is None
                raise CaseConfigError(f"{path}: {'cannot merge: ' if merge else ''}{_one_line(err)}") from None
            raise _explain(err, parsed[count - 1], items[count - 1], previous) from None
        previous = (cfg, choices)
    raise CaseConfigError(f"{path}: {_one_line(refused)}") from None  # fails only all together


def _missing_config(err: MissingConfigException, path: str) -> CaseConfigError:
    """``no data config named 'x'`` with the closest names and the options, for Hydra's missing config."""
    group, _, name = (err.missing_cfg_file or "").rpartition("/")
    options = sorted(err.options or [])
    hint = did_you_mean(name, options)
    folders = [os.path.dirname(path), *_search_path(os.path.dirname(path))]
    return CaseConfigError(
        f"no {group.replace('/', '.')} config named {name!r}" + (f"; {hint}" if hint else "")
        + f" (looked for {group}/{name}.yaml in {', '.join(folders)}); options: {', '.join(options) or 'none'}"
    )


def _explain(err: Exception, override: Override, item: str, previous: tuple[DictConfig, dict]) -> CaseConfigError:
    """The one-line message for the override Hydra refused, given the composition before it.

    Args:
      err: what Hydra raised.
      override: the refused item, parsed.
      item: the refused item as given to Hydra.
      previous: the config and group choices composed from the items before it.

    Returns:
      The error to raise.
    """
    cfg, choices = previous
    key, value = override.key_or_group, override.value()
    if override.package is None and key in choices and override.type is OverrideType.ADD:
        if isinstance(value, str):  # Hydra's "Multiple values for user"
            return CaseConfigError(f"the case already chooses {key}: {choices[key]}; use {key}={value} to replace it")
        return CaseConfigError(f"{key} must be a mapping of {key} keys, got {value!r}")
    if override.package is None and key in choices and not isinstance(value, str):
        return CaseConfigError(f"no {key} config named {str(value)!r}: {key}=NAME names a file {key}/NAME.yaml")
    if isinstance(err.__cause__, (ConfigKeyError, ConfigAttributeError)):  # Hydra's "Could not override"
        hint = did_you_mean(key, _dotted_keys(cfg))
        return CaseConfigError(f"override key {key!r} is not in the case" + (f"; {hint}" if hint else "")
                               + f" (use +{key}=... to add a new key)")
    if "." not in key and override.type is OverrideType.CHANGE and key not in cfg:  # "No match in the defaults list"
        return CaseConfigError(f"the case has no {key!r} entry in its defaults to replace (use +{item} to add one)")
    return CaseConfigError(f"cannot apply override {item}: {_one_line(err)}")


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


def _inherit(cfg: DictConfig, choices: dict[str, Optional[str]], parsed: Sequence[Override], path: str) -> DictConfig:
    """``cfg`` with the ``inherit`` keys of each group config chosen on the command line taken from
    the config it replaced (see the module docstring); keys the command line sets are kept.

    Hydra has no such notion: the replaced config is the case composed without the command line.
    """
    chosen = {o.key_or_group: o.value() for o in parsed
              if o.type is OverrideType.CHANGE and o.package is None and o.key_or_group in choices}
    inheriting = [g for g in chosen if isinstance(cfg.get(g), DictConfig) and INHERIT in cfg[g]]
    if not inheriting:
        return cfg
    original, original_choices = _compose(path, [])
    set_here = {o.key_or_group for o in parsed}
    for group in inheriting:
        replaced = original_choices.get(group)
        keys = cfg[group][INHERIT]
        if replaced is None or replaced == chosen[group] or not OmegaConf.is_list(keys):
            continue
        block = original[group]
        taken = {str(k): block[k] for k in keys if k in block and f"{group}.{k}" not in set_here}
        cfg = OmegaConf.merge(cfg, {group: {**taken, "like": block.get("name", replaced)}})
    return cfg


def _with_optional_keys(cfg: DictConfig) -> DictConfig:
    """Add ``OPTIONAL_KEYS`` (at their defaults) where their parent block exists and they do not."""
    for key, default in OPTIONAL_KEYS.items():
        parent, _, name = key.rpartition(".")
        block = OmegaConf.select(cfg, parent)
        if isinstance(block, DictConfig) and name not in block:
            block[name] = default  # cfg is this call's own composition: no caller's config changes
    return cfg


def require_mapping(cfg: DictConfig, group: str, where: str) -> None:
    """A case's group block, when present, is a mapping of keys (``user: 5`` is not).

    Args:
      cfg: the composed case.
      group: a top-level group (``user``, ``data``, ...).
      where: what to name in the error (the case file).

    Raises:
      CaseConfigError: the block is there and is no mapping.

    Example::

        >>> from omegaconf import OmegaConf
        >>> require_mapping(OmegaConf.create({"user": {"num_data_points": 2}}), "user", "case.yaml")
        >>> require_mapping(OmegaConf.create({"user": 5}), "user", "case.yaml")
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.CaseConfigError: case.yaml: user must be a mapping of user keys, got 5
    """
    value = cfg.get(group)
    if value is not None and not isinstance(value, DictConfig):
        raise CaseConfigError(f"{where}: {group} must be a mapping of {group} keys, got {value!r}")

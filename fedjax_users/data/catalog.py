"""Case files by name: the ones shipped in the package and, when installed, breaching's own.

``fedjax-users run 4_fedavg_small_scale`` and ``fedjax-users cases`` read this catalogue. A case is
named by its file name without ``.yaml`` (breaching's ``4_fedavg_small_scale``, the bundled
``cifar10_single_image``); a path to any case file is taken as it is. breaching's case files are
found through ``importlib.util.find_spec``, which locates the installed package without importing
it (importing breaching imports torch): ``pip install --no-deps breaching==0.1.2`` is all they need.

Example::

    >>> import os
    >>> from fedjax_users.data import catalog
    >>> os.path.basename(catalog.resolve("default"))
    'default.yaml'
    >>> "default" in [case.name for case in catalog.case_files()]
    True
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional

from omegaconf import OmegaConf

from fedjax_users.data.compose import CONFIG_ROOT, load_case
from fedjax_users.data.errors import CaseConfigError, DataError
from fedjax_users.suggestions import did_you_mean

__all__ = ["CaseFile", "breaching_case_folder", "case_files", "describe", "resolve"]

BUNDLED = "fedjax_users"
BREACHING = "breaching"


@dataclasses.dataclass(frozen=True)
class CaseFile:
    """One case file a name resolves to.

    Attributes:
      name: the file name without ``.yaml``, as given on the command line.
      path: the file.
      source: ``"fedjax_users"`` (shipped in the package) or ``"breaching"`` (the installed package's).
    """

    name: str
    path: str
    source: str


def breaching_case_folder() -> Optional[str]:
    """The installed breaching's ``config/case`` folder, found without importing breaching.

    Returns:
      The folder, or ``None`` when breaching is not installed (or has no case files).
    """
    try:
        spec = importlib.util.find_spec("breaching")
    except (ImportError, ValueError):  # a broken install, or a module named breaching without a spec
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "config", "case")
    return folder if os.path.isdir(folder) else None


def _cases_in(folder: Optional[str], source: str) -> list[CaseFile]:
    if folder is None or not os.path.isdir(folder):
        return []
    names = sorted((f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")), key=_natural)
    return [CaseFile(name, os.path.join(folder, f"{name}.yaml"), source) for name in names]


def _natural(name: str) -> tuple:
    """breaching numbers its cases 0 to 10: ``2_...`` sorts before ``10_...``."""
    head = name.split("_", 1)[0]
    return (int(head), name) if head.isdigit() else (float("inf"), name)


def case_files() -> list[CaseFile]:
    """Every case file a name can resolve to.

    Returns:
      The package's own, then breaching's (if installed), each in breaching's numbering order.

    Example::

        >>> [(case.name, case.source) for case in case_files() if case.name == "default"]
        [('default', 'fedjax_users')]
    """
    return _cases_in(os.path.join(CONFIG_ROOT, "case"), BUNDLED) + _cases_in(breaching_case_folder(), BREACHING)


def resolve(case: Optional[str]) -> Optional[str]:
    """The case file for a command line's case argument.

    Args:
      case: a path to a case file (used as it is), the name of a known case file (with or
        without ``.yaml``), or ``None`` (the default case, left to ``load_case``).

    Returns:
      The path, or ``None`` for ``None``.

    Raises:
      CaseConfigError: neither a file nor a known name; says the closest names and how to list
        them, and that breaching's cases need breaching installed when it is not.

    Example::

        >>> resolve("defualt")
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.CaseConfigError: no case file or case named 'defualt'; did you mean 'default'? ...
    """
    if case is None or os.path.isfile(case):
        return case
    name = os.path.basename(case)[:-5] if case.endswith(".yaml") else case
    known = case_files()
    if os.sep not in case and "/" not in case:
        for entry in known:
            if entry.name == name:
                return entry.path
    hint = did_you_mean(name, [entry.name for entry in known])
    where = "" if breaching_case_folder() else (
        "; breaching's case files need breaching installed (pip install --no-deps breaching==0.1.2)")
    raise CaseConfigError(
        f"no case file or case named {case!r}" + (f"; {hint}" if hint else "")
        + f" (fedjax-users cases lists the {len(known)} known){where}"
    )


def describe(entry: CaseFile) -> str:
    """One line about a case, from its composed config (``fedjax-users cases`` lists these).

    Args:
      entry: the case file.

    Returns:
      Its model, data, user, examples and users; for a case that does not compose (a data config
      this package does not know, say), why not.

    Example::

        >>> describe(next(case for case in case_files() if case.name == "default"))
        'ConvNet on digits 3x32x32; local_update, 4 examples, 4 local steps'
    """
    try:
        cfg = load_case(entry.path)
    except DataError as err:
        return f"does not compose here: {err}"
    user = cfg.get("user") or {}
    data = cfg.get("data") or {}
    kind = user.get("user_type", "?")
    user_range = user.get("user_range") or [0, 0]
    users = f", {user_range[1] - user_range[0]} users" if kind == "multiuser_aggregate" else ""
    steps = (f", {user.get('num_local_updates')} local steps" if kind == "local_update" else "")
    examples = user.get("num_data_points", "?")  # each user's
    model = cfg.get("model", "?")
    data_name = OmegaConf.select(cfg, "data.name", default="?")
    shape = data.get("shape")
    size = f" {'x'.join(str(s) for s in shape)}" if shape is not None else ""
    return f"{model} on {data_name}{size}; {kind}{users}, {examples} example{'s' if examples != 1 else ''}{' each' if users else ''}{steps}"

"""'Did you mean' for a mistyped name: the known names closest to it, in one short clause.

difflib's ratio is the right measure for typos of names (a dropped, doubled or swapped letter
keeps it high) and needs no dependency.

Example::

    >>> from fedjax_users.suggestions import did_you_mean
    >>> did_you_mean("user.num_data_point", ["user.num_data_points", "user.user_type", "data.name"])
    "did you mean 'user.num_data_points'?"
    >>> did_you_mean("zzz", ["data", "user"])
    ''
    >>> did_you_mean("resnet81", ["ResNet18", "ResNet34", "ConvNet"], ignore_case=True)
    "did you mean 'ResNet18' or 'ResNet34'?"
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(name: str, known: Iterable[str], limit: int = 3, cutoff: float = 0.6,
                 ignore_case: bool = False) -> str:
    """``"did you mean 'a' or 'b'?"`` for the known names close to ``name``, ``""`` when none is.

    Args:
      name: what was asked for.
      known: the names that exist.
      limit: at most this many suggestions, closest first.
      cutoff: the least difflib similarity (0 to 1) a suggestion needs.
      ignore_case: compare lower-cased (model names match case-insensitively, as in breaching);
        the suggestions keep their own spelling.

    Returns:
      The clause, or an empty string.

    Example::

        >>> did_you_mean("lenet_zhy", ["lenet_zhu", "ConvNet"])
        "did you mean 'lenet_zhu'?"
    """
    spelled = {(k.lower() if ignore_case else k): k for k in sorted(set(known))}
    close = difflib.get_close_matches(name.lower() if ignore_case else name, list(spelled), n=limit, cutoff=cutoff)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(spelled[c]) for c in close) + "?"

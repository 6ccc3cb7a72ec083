"""The naming convention that pairs torch parameters/buffers with Flax variables.

The convention (by name, never by order: JAX tree utilities re-sort dict keys):

* Path: a torch name ``a.b.leaf`` is the Flax path ``('a', 'b', <leaf>)`` in the ``params``
  collection (parameters) or ``batch_stats`` (buffers). A leading ``model.`` (the prefix of
  breaching's ``VisionContainer``) is dropped, repeatedly, while the Flax tree has no top-level
  ``model``; so ``model.model.conv0.weight`` of breaching's ConvNet is ``('conv0', 'kernel')``.
* Leaf names: ``weight`` is whichever of ``kernel``, ``scale``, ``embedding`` or ``weight`` the
  Flax module at that path holds; ``running_mean`` is ``mean``, ``running_var`` is ``var``; every
  other name (``bias``, ``num_batches_tracked``, ``in_proj_weight``, ...) is kept.
* Layout: a ``kernel`` is torch's weight with its axes reordered to (spatial..., in, out):
  conv OIHW <-> HWIO, dense (out, in) <-> (in, out). Everything else keeps its layout.
* Tied weights: ``named_parameters()`` lists a shared tensor once; the Flax model holds it once.

Any unmatched name or double match is a ``ValueError`` naming both sides. This module does not
import torch (:mod:`fedjax_users.io` writes torch-named files with it).

Example::

    >>> link("model.model.conv0.weight", {"conv0": {"kernel": 0, "bias": 0}}, PARAMS).flax_path
    ('conv0', 'kernel')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util

__all__ = [
    "BATCH_STATS",
    "CONTAINER_PREFIX",
    "Link",
    "PARAMS",
    "layout_from_torch",
    "layout_to_torch",
    "link",
    "link_all",
    "torch_name",
]

# The Flax collections that hold torch's parameters and buffers.
PARAMS = "params"
BATCH_STATS = "batch_stats"
# The prefix breaching's ``VisionContainer`` puts before each name.
CONTAINER_PREFIX = "model"

# Flax names a torch ``weight`` can have, depending on the layer type.
_WEIGHT_NAMES = ("kernel", "scale", "embedding", "weight")
_BUFFER_NAMES = {"running_mean": "mean", "running_var": "var"}


@dataclasses.dataclass(frozen=True)
class Link:
    """A torch tensor name and the Flax leaf it corresponds to.

    Attributes:
      torch_name: the torch name, as ``named_parameters()`` / ``named_buffers()`` gives it.
      collection: the Flax collection of the leaf, :data:`PARAMS` or :data:`BATCH_STATS`.
      flax_path: the leaf's path in that collection, e.g. ``('conv0', 'kernel')``.
    """

    torch_name: str
    collection: str
    flax_path: tuple[str, ...]

    def describe(self) -> str:
        """Both names, for error messages.

        Returns:
          One line naming the torch tensor and the Flax leaf.

        Example::

            >>> Link("fc.weight", PARAMS, ("fc", "kernel")).describe()
            "torch 'fc.weight' <-> Flax params/fc/kernel"
        """
        return f"torch {self.torch_name!r} <-> Flax {self.collection}/{'/'.join(self.flax_path)}"


def _strip_container(segments: list[str], tree: Mapping) -> list[str]:
    """Drop leading ``model`` segments that the Flax tree does not mirror."""
    while len(segments) > 1 and segments[0] == CONTAINER_PREFIX and CONTAINER_PREFIX not in tree:
        segments = segments[1:]
    return segments


def _subtree(tree: Mapping, path: Sequence[str]) -> Optional[Mapping]:
    """The Flax module dict at ``path``, or None."""
    node: Any = tree
    for segment in path:
        if not isinstance(node, Mapping) or segment not in node:
            return None
        node = node[segment]
    return node if isinstance(node, Mapping) else None


def _flax_leaf(torch_leaf: str, module: Mapping, collection: str) -> tuple[str, ...]:
    """The Flax leaf names ``torch_leaf`` can have, given what ``module`` holds (normally one)."""
    if collection == BATCH_STATS:
        return (_BUFFER_NAMES.get(torch_leaf, torch_leaf),)
    if torch_leaf != "weight":
        return (torch_leaf,)
    present = tuple(
        name for name in _WEIGHT_NAMES if name in module and not isinstance(module[name], Mapping)
    )
    return present or (torch_leaf,)


def link(torch_name: str, tree: Mapping, collection: str) -> Link:
    """The Flax leaf of ``tree`` (one collection) that ``torch_name`` maps to.

    Args:
      torch_name: a torch parameter or buffer name, with or without breaching's ``model.`` prefixes.
      tree: one Flax collection (arrays, ``jax.ShapeDtypeStruct`` s or any leaves: only the keys are read).
      collection: the collection ``tree`` is, :data:`PARAMS` or :data:`BATCH_STATS`.

    Returns:
      The :class:`Link` of the two names.

    Raises:
      ValueError: no Flax leaf for the name, or more than one (a module holding both ``kernel``
        and ``scale``, say), naming both sides.

    Example::

        >>> link("bn0.running_var", {"bn0": {"mean": 0, "var": 0}}, BATCH_STATS).flax_path
        ('bn0', 'var')
    """
    segments = _strip_container(torch_name.split("."), tree)
    module_path, torch_leaf = segments[:-1], segments[-1]
    module = _subtree(tree, module_path)
    candidates = _flax_leaf(torch_leaf, module or {}, collection)
    result = Link(torch_name, collection, tuple(module_path) + (candidates[0],))
    if len(candidates) > 1:
        raise ValueError(
            f"{result.describe()}: ambiguous, the Flax module holds {list(candidates)}"
        )
    if module is None:
        where = "/".join((collection,) + tuple(module_path))
        raise ValueError(f"torch {torch_name!r} has no Flax counterpart: no module {where}")
    if candidates[0] not in module or isinstance(module[candidates[0]], Mapping):
        raise ValueError(
            f"{result.describe()}: no such Flax entry (torch entry without counterpart)"
        )
    return result


def torch_name(path: Sequence[str], collection: str) -> str:
    """The torch name the convention gives a Flax path, without breaching's container prefix.

    Args:
      path: the Flax path in its collection, e.g. ``('conv0', 'kernel')``.
      collection: ``PARAMS`` or ``BATCH_STATS``.

    Returns:
      The torch name, e.g. ``'conv0.weight'`` (breaching's ConvNet calls it ``model.model.conv0.weight``).

    Example::

        >>> torch_name(("bn0", "mean"), BATCH_STATS)
        'bn0.running_mean'
    """
    path = tuple(path)
    if collection == BATCH_STATS:
        renames = {flax_leaf: torch_leaf for torch_leaf, flax_leaf in _BUFFER_NAMES.items()}
    else:
        renames = {flax: "weight" for flax in _WEIGHT_NAMES}
    return ".".join(path[:-1] + (renames.get(path[-1], path[-1]),))


def link_all(torch_names: Sequence[str], tree: Mapping, collection: str) -> list[Link]:
    """Link every torch name; every Flax leaf of ``tree`` must be linked exactly once.

    Args:
      torch_names: the torch model's names of one kind (all its parameters, or all its buffers).
      tree: the Flax collection they pair with.
      collection: :data:`PARAMS` or :data:`BATCH_STATS`.

    Returns:
      One :class:`Link` per torch name, in ``torch_names``' order.

    Raises:
      ValueError: a torch name without a Flax leaf, two names on one leaf, or a Flax leaf without
        a torch name (with the torch name the convention expects for it).

    Example::

        >>> tree = {"fc": {"kernel": 0, "bias": 0}}
        >>> [item.flax_path for item in link_all(["fc.weight", "fc.bias"], tree, PARAMS)]
        [('fc', 'kernel'), ('fc', 'bias')]
    """
    links = [link(name, tree, collection) for name in torch_names]
    seen: dict[tuple[str, ...], Link] = {}
    for item in links:
        if item.flax_path in seen:
            other = seen[item.flax_path].torch_name
            raise ValueError(f"{item.describe()}: Flax entry already taken by torch {other!r}")
        seen[item.flax_path] = item
    for path in traverse_util.flatten_dict(dict(tree)):
        if path not in seen:
            expected = torch_name(path, collection)
            raise ValueError(
                f"Flax {collection}/{'/'.join(path)} has no torch counterpart "
                f"(expected torch name {expected!r}, possibly under a 'model.' prefix)"
            )
    return links


def _kernel_axes(ndim: int) -> tuple[int, ...]:
    """Torch weight axes (out, in, spatial...) in a Flax kernel's order (spatial..., in, out)."""
    return tuple(range(2, ndim)) + (1, 0)


def _is_kernel(item: Link, ndim: int) -> bool:
    """Whether the leaf is a Dense/Conv kernel, whose axes differ from torch's weight."""
    return item.flax_path[-1] == "kernel" and ndim >= 2


def layout_from_torch(value: np.ndarray, item: Link) -> np.ndarray:
    """A torch tensor's values in the layout of its Flax leaf.

    Args:
      value: the torch tensor's values (as numpy).
      item: the :class:`Link` of the tensor; a ``kernel`` leaf takes Flax's axis order.

    Returns:
      ``value`` with a kernel's axes as (spatial..., in, out), anything else unchanged.

    Example::

        >>> layout_from_torch(np.zeros((2, 3)), Link("fc.weight", PARAMS, ("fc", "kernel"))).shape
        (3, 2)
    """
    return np.transpose(value, _kernel_axes(value.ndim)) if _is_kernel(item, value.ndim) else value


def layout_to_torch(value: np.ndarray, item: Link) -> np.ndarray:
    """A Flax leaf's values in the layout of its torch tensor (the inverse of :func:`layout_from_torch`).

    Args:
      value: the Flax leaf's values (as numpy).
      item: the :class:`Link` of the leaf; a ``kernel`` leaf takes torch's axis order.

    Returns:
      ``value`` with a kernel's axes as (out, in, spatial...), anything else unchanged.

    Example::

        >>> layout_to_torch(np.zeros((3, 3, 1, 8)), Link("conv.weight", PARAMS, ("conv", "kernel"))).shape
        (8, 1, 3, 3)
    """
    if not _is_kernel(item, value.ndim):
        return value
    return np.transpose(value, np.argsort(_kernel_axes(value.ndim)))

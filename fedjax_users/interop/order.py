"""The order of breaching's gradient and buffer lists, found without torch.

breaching shares ``gradients`` as a list in ``model.parameters()`` order and ``buffers`` in
``model.buffers()`` order. A Flax tree has no such order: JAX's tree utilities sort dict keys, so
any tree that went through ``jax.grad`` or ``tree_map`` is in alphabetical order (``bn0`` before
``conv0``). :class:`TorchOrder` holds the order as Flax paths; it comes from

* :func:`torch_order`, the Flax model alone, by torch's own rule: ``named_parameters()`` is a
  preorder walk of the module tree in which each module lists its own tensors first, then its
  children in the order they were registered. A compact Flax module has no registration order;
  the order its submodules are created in (the call order, which ``model.init`` records) stands
  in for it. A module whose torch twin registers its children in another order says so in a class
  attribute ``torch_children`` (a tuple of child names, e.g. ``TransformerModel``'s ``pos_encoder``
  before ``encoder``, which its ``forward`` calls first); children it does not name follow, in
  creation order. ``tests/interop/test_order.py`` checks the result against ``named_parameters()``
  and ``named_buffers()`` of breaching's own models.
* :func:`order_from_torch_names`, torch's names as a torch model lists them: exact, for any model.

This module does not import torch.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from fedjax_users import models
    >>> from fedjax_users.interop import order
    >>> found = order.torch_order(models.get("ConvNet"), jnp.zeros((1, 32, 32, 3)))
    >>> found.torch_names("params")[:4]  # a sorted tree would start with bn0
    ['conv0.weight', 'conv0.bias', 'bn0.weight', 'bn0.bias']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from flax import traverse_util

from fedjax_users.interop.naming import BATCH_STATS, PARAMS, link_all, torch_name

__all__ = ["TORCH_CHILDREN", "TorchOrder", "order_from_torch_names", "torch_order"]

Path = tuple[str, ...]

# The class attribute through which a Flax module names its children in its torch twin's order.
TORCH_CHILDREN = "torch_children"


@dataclasses.dataclass(frozen=True)
class TorchOrder:
    """Flax paths in torch's order: ``params`` as ``named_parameters()``, ``batch_stats`` as ``named_buffers()``.

    Attributes:
      params: the paths of the Flax ``params`` collection, in ``named_parameters()`` order.
      batch_stats: the paths of the ``batch_stats`` collection, in ``named_buffers()`` order.

    Example::

        >>> TorchOrder(params=(("conv0", "kernel"), ("bn0", "scale"))).torch_names("params")
        ['conv0.weight', 'bn0.weight']
    """

    params: tuple[Path, ...]
    batch_stats: tuple[Path, ...] = ()

    def paths(self, collection: str) -> tuple[Path, ...]:
        """The paths of ``collection`` in torch's order.

        Args:
          collection: ``"params"`` or ``"batch_stats"``.

        Returns:
          The Flax paths of that collection, in torch's order.

        Raises:
          ValueError: another collection name.
        """
        if collection not in (PARAMS, BATCH_STATS):
            raise ValueError(f"collection must be {PARAMS!r} or {BATCH_STATS!r}, got {collection!r}")
        return self.params if collection == PARAMS else self.batch_stats

    def torch_names(self, collection: str) -> list[str]:
        """The torch names of ``collection``'s paths (naming convention, no container prefix), in order.

        Args:
          collection: ``"params"`` or ``"batch_stats"``.

        Returns:
          The torch names (:func:`fedjax_users.interop.naming.torch_name`), in torch's order.

        Raises:
          ValueError: another collection name.
        """
        return [torch_name(path, collection) for path in self.paths(collection)]


def _torch_preorder(paths: Sequence[Path], declared: Mapping[Path, Sequence[str]]) -> list[Path]:
    """``paths`` (in creation order) in torch's order: own leaves first, then children, recursively."""

    def visit(prefix: Path, group: list[Path]) -> list[Path]:
        depth = len(prefix)
        own = [path for path in group if len(path) == depth + 1]
        nested: dict[str, list[Path]] = {}  # child name -> its paths, children in creation order
        for path in group:
            if len(path) > depth + 1:
                nested.setdefault(path[depth], []).append(path)
        rank = {name: i for i, name in enumerate(declared.get(prefix, ()))}
        children = sorted(nested, key=lambda name: rank.get(name, len(rank)))  # stable: the rest keep theirs
        result = own
        for name in children:
            result = result + visit(prefix + (name,), nested[name])
        return result

    return visit((), list(paths))


def torch_order(model: nn.Module, *inputs: Any, **init_kwargs: Any) -> TorchOrder:
    """The order in which torch lists ``model``'s parameters and buffers, from the Flax model alone.

    ``model.init`` is traced with ``jax.eval_shape`` (shapes only: nothing is computed, no weights
    are made); the creation order of the variables and each module's ``torch_children`` give torch's
    order (see the module docstring for the rule and its check).

    Args:
      model: the Flax model.
      *inputs: its example inputs, as ``model.init(key, *inputs)`` takes them (arrays or
        ``jax.ShapeDtypeStruct`` s; one example is enough).
      **init_kwargs: further keyword arguments of ``model.init``.

    Returns:
      The :class:`TorchOrder` of the model's ``params`` and ``batch_stats``.

    Example::

        >>> import flax.linen as nn, jax.numpy as jnp
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(2, name="b")(nn.Dense(3, name="a")(x))  # "a" is made first
        >>> torch_order(Net(), jnp.zeros((1, 4))).torch_names("params")
        ['a.weight', 'a.bias', 'b.weight', 'b.bias']
    """
    created: dict[str, list[Path]] = {}
    declared: dict[Path, tuple[str, ...]] = {}

    def record(next_fun, args, kwargs, context):
        names = getattr(type(context.module), TORCH_CHILDREN, None)
        if names is not None:
            declared.setdefault(tuple(context.module.path), tuple(names))
        return next_fun(*args, **kwargs)

    def init(*args):
        with nn.intercept_methods(record):
            variables = model.init(jax.random.key(0), *args, **init_kwargs)
        # Read inside the trace: the dicts leave eval_shape with their keys sorted.
        for collection in (PARAMS, BATCH_STATS):
            created[collection] = list(traverse_util.flatten_dict(dict(variables.get(collection, {}))))
        return variables

    jax.eval_shape(init, *inputs)
    return TorchOrder(
        params=tuple(_torch_preorder(created[PARAMS], declared)),
        batch_stats=tuple(_torch_preorder(created[BATCH_STATS], declared)),
    )


def order_from_torch_names(
    parameter_names: Sequence[str],
    buffer_names: Sequence[str],
    params: Mapping,
    batch_stats: Optional[Mapping] = None,
) -> TorchOrder:
    """The order of a torch model's own lists, paired with the Flax trees by name.

    Args:
      parameter_names: ``[name for name, _ in torch_model.named_parameters()]``.
      buffer_names: ``[name for name, _ in torch_model.named_buffers()]``.
      params: the Flax params tree (arrays or ``jax.ShapeDtypeStruct`` s).
      batch_stats: the Flax batch_stats tree, or ``None`` for a model without buffers.

    Returns:
      The :class:`TorchOrder`; a name without a Flax counterpart, or a Flax leaf without a torch
      name, is a ``ValueError`` (:func:`fedjax_users.interop.naming.link_all`).

    Example::

        >>> # the names of torch.nn.Sequential(torch.nn.Linear(4, 2)), a Flax tree with the layer "0"
        >>> order_from_torch_names(["0.weight", "0.bias"], [], {"0": {"bias": 0, "kernel": 0}}).params
        (('0', 'kernel'), ('0', 'bias'))
    """
    buffers = link_all(list(buffer_names), batch_stats or {}, BATCH_STATS)
    return TorchOrder(
        params=tuple(item.flax_path for item in link_all(list(parameter_names), params, PARAMS)),
        batch_stats=tuple(item.flax_path for item in buffers),
    )

"""Parameters, buffers and gradients between a torch module and Flax variables.

Pairing follows :mod:`fedjax_users.interop.naming` (by name). Values convert with
:mod:`fedjax_users.interop.tensors`: float64 is kept, other floats become float32, integers
(``num_batches_tracked``) int32; on the way back each tensor takes the dtype and device of the
torch tensor it stands for. Lists are in ``model.parameters()`` / ``model.buffers()`` order.
Every unmatched name, double match, length or shape mismatch is a ``ValueError``.

A *template* is what fixes the Flax structure: a variables dict ``{'params': ..., 'batch_stats':
...}`` (e.g. ``model.init``'s result) or a :class:`~fedjax_users.types.ServerPayload`. Only its
structure and shapes are read, so ``jax.eval_shape(model.init, ...)`` (no compute) works too.

Example::

    >>> import jax.numpy as jnp, torch
    >>> net = torch.nn.Linear(3, 2)  # names weight (2, 3) and bias (2,)
    >>> variables = variables_from_torch(net, {"params": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}})
    >>> bool((variables["params"]["kernel"] == net.weight.detach().numpy().T).all())
    True
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

from fedjax_users.interop.naming import (
    BATCH_STATS,
    PARAMS,
    layout_from_torch,
    layout_to_torch,
    link_all,
)
from fedjax_users.interop.tensors import to_numpy, to_torch
from fedjax_users.types import ServerPayload

__all__ = [
    "Template",
    "buffers_from_torch_list",
    "buffers_to_torch_list",
    "grads_from_torch_list",
    "grads_to_torch_list",
    "params_from_torch_list",
    "params_to_torch_list",
    "payload_from_torch",
    "payload_to_torch",
    "tree_from_torch",
    "tree_to_torch",
    "variables_from_torch",
    "variables_to_torch",
]

PyTree = Any
# What fixes the Flax structure: a variables dict or a ServerPayload (see the module docstring).
Template = Union[Mapping[str, PyTree], ServerPayload]
Named = Sequence[tuple[str, torch.Tensor]]


def _shape(leaf: Any) -> tuple[int, ...]:
    """The shape of a template leaf: an array or an abstract ``jax.ShapeDtypeStruct``."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def tree_from_torch(named_tensors: Named, template: Mapping, collection: str) -> dict:
    """A new tree shaped like ``template`` (one collection) holding the torch tensors' values.

    Args:
      named_tensors: ``(name, tensor)`` pairs, as ``named_parameters()`` or ``named_buffers()`` gives them.
      template: the Flax collection whose structure and shapes the result has (leaves may be abstract).
      collection: :data:`~fedjax_users.interop.naming.PARAMS` or
        :data:`~fedjax_users.interop.naming.BATCH_STATS`.

    Returns:
      The tree, JAX arrays in Flax's layouts with :func:`~fedjax_users.interop.tensors.to_numpy`'s dtypes.

    Raises:
      ValueError: a name without a Flax leaf (or the reverse), or a shape mismatch, naming both sides.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> net = torch.nn.Linear(3, 2)
        >>> tree = tree_from_torch(list(net.named_parameters()), {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
        ...                        PARAMS)
        >>> tree["kernel"].shape
        (3, 2)
    """
    links = link_all([name for name, _ in named_tensors], template, collection)
    flat_template = traverse_util.flatten_dict(dict(template))
    values = {}
    for item, (_, tensor) in zip(links, named_tensors):
        value = layout_from_torch(to_numpy(tensor), item)
        expected = _shape(flat_template[item.flax_path])
        if value.shape != expected:
            raise ValueError(
                f"{item.describe()}: shape mismatch, torch {tuple(tensor.shape)} gives "
                f"{value.shape} but the Flax template has {expected}"
            )
        values[item.flax_path] = jnp.asarray(value)
    # Insert in the template's order so the result has exactly its structure.
    return traverse_util.unflatten_dict({path: values[path] for path in flat_template})


def tree_to_torch(tree: Mapping, named_references: Named, collection: str) -> list[torch.Tensor]:
    """The leaves of ``tree`` as torch tensors, in the order and dtypes of ``named_references``.

    Args:
      tree: one Flax collection.
      named_references: ``(name, tensor)`` pairs of the torch model; each result takes its
        reference's dtype and device (the references are not changed).
      collection: :data:`~fedjax_users.interop.naming.PARAMS` or
        :data:`~fedjax_users.interop.naming.BATCH_STATS`.

    Returns:
      One new torch tensor per reference, in torch's layouts.

    Raises:
      ValueError: a name without a Flax leaf (or the reverse), or a shape mismatch, naming both sides.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> net = torch.nn.Linear(3, 2)
        >>> tensors = tree_to_torch({"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}, list(net.named_parameters()),
        ...                         PARAMS)
        >>> [tuple(tensor.shape) for tensor in tensors]
        [(2, 3), (2,)]
    """
    links = link_all([name for name, _ in named_references], tree, collection)
    flat = traverse_util.flatten_dict(dict(tree))
    tensors = []
    for item, (_, reference) in zip(links, named_references):
        flax_value = np.asarray(flat[item.flax_path])
        value = layout_to_torch(flax_value, item)
        if value.shape != tuple(reference.shape):
            raise ValueError(
                f"{item.describe()}: shape mismatch, Flax {flax_value.shape} gives "
                f"{value.shape} but torch has {tuple(reference.shape)}"
            )
        tensors.append(to_torch(value, like=reference))
    return tensors


def _named(torch_model: torch.nn.Module, collection: str) -> list[tuple[str, torch.Tensor]]:
    """The torch model's parameters or buffers with their names, in torch's order."""
    if collection == PARAMS:
        return list(torch_model.named_parameters())
    return list(torch_model.named_buffers())


def _pair(torch_model: torch.nn.Module, tensors: Sequence[torch.Tensor], collection: str) -> Named:
    """Name a list given in ``parameters()``/``buffers()`` order; its length must match."""
    names = [name for name, _ in _named(torch_model, collection)]
    tensors = list(tensors)
    if len(tensors) < len(names):
        raise ValueError(
            f"{len(tensors)} tensors for {len(names)} torch {collection} entries: "
            f"none for torch {names[len(tensors)]!r} and after"
        )
    if len(tensors) > len(names):
        raise ValueError(
            f"{len(tensors)} tensors for {len(names)} torch {collection} entries: "
            f"{len(tensors) - len(names)} extra after the last one, "
            f"{names[-1] if names else None!r}"
        )
    return list(zip(names, tensors))


def _template_tree(template: Template, collection: str) -> Mapping:
    """One collection of a variables dict or a ServerPayload (empty if absent)."""
    if isinstance(template, ServerPayload):
        tree = template.params if collection == PARAMS else template.batch_stats
    else:
        tree = template.get(collection)
    return tree if tree is not None else {}


def variables_from_torch(
    torch_model: torch.nn.Module, flax_variables: Mapping[str, PyTree]
) -> dict:
    """New Flax variables shaped like ``flax_variables``, filled from the torch model's state.

    Collections other than params/batch_stats have no torch counterpart and are passed through.

    Args:
      torch_model: the torch module whose parameters and buffers are read (not changed).
      flax_variables: the template variables dict (``model.init``'s result, or its ``jax.eval_shape``).

    Returns:
      A new variables dict: ``params`` (and ``batch_stats`` where the torch model has buffers or the
      template has the collection) from torch, any other collection as in ``flax_variables``.

    Raises:
      ValueError: as :func:`tree_from_torch`.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> bn = torch.nn.BatchNorm1d(2)  # weight, bias; buffers running_mean, running_var, num_batches_tracked
        >>> template = {"params": {"scale": jnp.zeros(2), "bias": jnp.zeros(2)},
        ...             "batch_stats": {"mean": jnp.zeros(2), "var": jnp.zeros(2),
        ...                             "num_batches_tracked": jnp.zeros((), int)}}
        >>> variables_from_torch(bn, template)["batch_stats"]["var"].tolist()
        [1.0, 1.0]
    """
    result = dict(flax_variables)
    result[PARAMS] = tree_from_torch(_named(torch_model, PARAMS), flax_variables[PARAMS], PARAMS)
    buffers = _named(torch_model, BATCH_STATS)
    if buffers or BATCH_STATS in flax_variables:
        template = _template_tree(flax_variables, BATCH_STATS)
        result[BATCH_STATS] = tree_from_torch(buffers, template, BATCH_STATS)
    return result


def variables_to_torch(flax_variables: Mapping[str, PyTree], torch_model: torch.nn.Module) -> None:
    """Copy Flax variables into the torch model's parameters and buffers (in place).

    Everything is converted before anything is copied, so a mismatch leaves the torch model as it was.

    Args:
      flax_variables: the variables dict (``params``, and ``batch_stats`` for a model with buffers).
      torch_model: the torch module written to; each tensor keeps its dtype and device.

    Raises:
      ValueError: as :func:`tree_to_torch`.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> net = torch.nn.Linear(3, 2)
        >>> variables_to_torch({"params": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}, net)
        >>> float(net.weight.detach().sum())
        6.0
    """
    # Convert everything first, so a mismatch leaves the torch model untouched.
    updates = []
    for collection in (PARAMS, BATCH_STATS):
        named = _named(torch_model, collection)
        tensors = tree_to_torch(_template_tree(flax_variables, collection), named, collection)
        updates += [(target, value) for (_, target), value in zip(named, tensors)]
    with torch.no_grad():
        for target, value in updates:
            target.copy_(value)


def params_from_torch_list(
    parameters: Sequence[torch.Tensor], torch_model: torch.nn.Module, template: Template
) -> dict:
    """A params tree from tensors in ``model.parameters()`` order.

    Also :func:`grads_from_torch_list`: a gradient has the parameters' names, shapes and layouts.

    Args:
      parameters: one tensor per torch parameter, in ``torch_model.parameters()`` order.
      torch_model: the torch module that names them.
      template: a variables dict or a ServerPayload with the Flax ``params``.

    Returns:
      The params tree (JAX arrays).

    Raises:
      ValueError: too few or too many tensors, or as :func:`tree_from_torch`.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> net = torch.nn.Linear(3, 2)
        >>> template = {"params": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
        >>> params_from_torch_list([torch.ones(2, 3), torch.zeros(2)], net, template)["kernel"].shape
        (3, 2)
    """
    return tree_from_torch(
        _pair(torch_model, parameters, PARAMS), _template_tree(template, PARAMS), PARAMS
    )


def params_to_torch_list(params: Mapping, torch_model: torch.nn.Module) -> list[torch.Tensor]:
    """A params-shaped tree as tensors in ``model.parameters()`` order.

    Also :func:`grads_to_torch_list`: a gradient has the parameters' names, shapes and layouts.

    Args:
      params: the Flax params tree (or a gradient of it).
      torch_model: the torch module whose parameters give the order, dtypes and devices.

    Returns:
      One new torch tensor per parameter.

    Raises:
      ValueError: as :func:`tree_to_torch`.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> tensors = params_to_torch_list({"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}, torch.nn.Linear(3, 2))
        >>> [tuple(tensor.shape) for tensor in tensors]
        [(2, 3), (2,)]
    """
    return tree_to_torch(params, _named(torch_model, PARAMS), PARAMS)


def buffers_from_torch_list(
    buffers: Sequence[torch.Tensor], torch_model: torch.nn.Module, template: Template
) -> dict:
    """A batch_stats tree from tensors in ``model.buffers()`` order.

    Args:
      buffers: one tensor per torch buffer, in ``torch_model.buffers()`` order.
      torch_model: the torch module that names them.
      template: a variables dict or a ServerPayload with the Flax ``batch_stats``.

    Returns:
      The batch_stats tree (JAX arrays; ``num_batches_tracked`` int32).

    Raises:
      ValueError: too few or too many tensors, or as :func:`tree_from_torch`.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> stats = {"mean": jnp.zeros(2), "var": jnp.zeros(2), "num_batches_tracked": jnp.zeros((), int)}
        >>> template = {"batch_stats": stats}
        >>> buffers_from_torch_list(list(bn.buffers()), bn, template)["var"].tolist()
        [1.0, 1.0]
    """
    return tree_from_torch(
        _pair(torch_model, buffers, BATCH_STATS), _template_tree(template, BATCH_STATS), BATCH_STATS
    )


def buffers_to_torch_list(batch_stats: Mapping, torch_model: torch.nn.Module) -> list[torch.Tensor]:
    """A batch_stats tree as tensors in ``model.buffers()`` order.

    Args:
      batch_stats: the Flax batch_stats tree.
      torch_model: the torch module whose buffers give the order, dtypes and devices.

    Returns:
      One new torch tensor per buffer.

    Raises:
      ValueError: as :func:`tree_to_torch`.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> stats = {"mean": jnp.zeros(2), "var": jnp.ones(2), "num_batches_tracked": jnp.zeros((), int)}
        >>> [tensor.dtype for tensor in buffers_to_torch_list(stats, torch.nn.BatchNorm1d(2))]
        [torch.float32, torch.float32, torch.int64]
    """
    return tree_to_torch(batch_stats, _named(torch_model, BATCH_STATS), BATCH_STATS)


# A gradient (or a parameter difference) has the parameters' names, shapes and layouts.
grads_from_torch_list = params_from_torch_list
grads_to_torch_list = params_to_torch_list


def payload_from_torch(
    parameters: Sequence[torch.Tensor],
    buffers: Optional[Sequence[torch.Tensor]],
    torch_model: torch.nn.Module,
    template: Template,
) -> ServerPayload:
    """breaching's server payload (parameter and buffer lists) as a ServerPayload.

    Args:
      parameters: the payload's ``parameters``, in ``torch_model.parameters()`` order.
      buffers: the payload's ``buffers``, in ``torch_model.buffers()`` order, or ``None``.
      torch_model: the torch module that names them.
      template: a variables dict or a ServerPayload fixing the Flax structure.

    Returns:
      The :class:`~fedjax_users.types.ServerPayload`; ``batch_stats`` is ``None`` where ``buffers`` is.

    Raises:
      ValueError: as :func:`params_from_torch_list` and :func:`buffers_from_torch_list`.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> net = torch.nn.Linear(3, 2)
        >>> template = {"params": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
        >>> payload = payload_from_torch(list(net.parameters()), None, net, template)
        >>> payload.params["kernel"].shape, payload.batch_stats
        ((3, 2), None)
    """
    batch_stats = None
    if buffers is not None:
        batch_stats = buffers_from_torch_list(buffers, torch_model, template)
    return ServerPayload(
        params=params_from_torch_list(parameters, torch_model, template), batch_stats=batch_stats
    )


def payload_to_torch(payload: ServerPayload, torch_model: torch.nn.Module) -> dict:
    """A ServerPayload as breaching's ``dict(parameters=[...], buffers=[...] or None)``.

    Args:
      payload: the :class:`~fedjax_users.types.ServerPayload`.
      torch_model: the torch module whose parameters and buffers give the order, dtypes and devices.

    Returns:
      breaching's payload dict; ``buffers`` is ``None`` where ``payload.batch_stats`` is.

    Raises:
      ValueError: as :func:`tree_to_torch`.

    Example::

        >>> import jax.numpy as jnp, torch
        >>> from fedjax_users.types import ServerPayload
        >>> payload = ServerPayload(params={"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}, batch_stats=None)
        >>> shared = payload_to_torch(payload, torch.nn.Linear(3, 2))
        >>> [tuple(tensor.shape) for tensor in shared["parameters"]], shared["buffers"]
        ([(2, 3), (2,)], None)
    """
    buffers = None
    if payload.batch_stats is not None:
        buffers = buffers_to_torch_list(payload.batch_stats, torch_model)
    return dict(parameters=params_to_torch_list(payload.params, torch_model), buffers=buffers)

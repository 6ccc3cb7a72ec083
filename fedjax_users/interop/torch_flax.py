"""Parameters, buffers and gradients between a torch module and Flax variables.

Pairing follows :mod:`fedjax_users.interop.naming` (by name). Values convert with
:mod:`fedjax_users.interop.tensors`: float64 is kept, other floats become float32, integers
(``num_batches_tracked``) int32; on the way back each tensor takes the dtype and device of the
torch tensor it stands for. Lists are in ``model.parameters()`` / ``model.buffers()`` order.
Every unmatched name, double match, length or shape mismatch is a ``ValueError``.

A *template* is what fixes the Flax structure: a variables dict ``{'params': ..., 'batch_stats':
...}`` (e.g. ``model.init``'s result) or a :class:`~fedjax_users.types.ServerPayload`. Only its
structure and shapes are read, so ``jax.eval_shape(model.init, ...)`` (no compute) works too.
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

PyTree = Any
Template = Union[Mapping[str, PyTree], ServerPayload]
Named = Sequence[tuple[str, torch.Tensor]]


def _shape(leaf: Any) -> tuple[int, ...]:
    """The shape of a template leaf: an array or an abstract ``jax.ShapeDtypeStruct``."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def tree_from_torch(named_tensors: Named, template: Mapping, collection: str) -> dict:
    """A new tree shaped like ``template`` (one collection) holding the torch tensors' values."""
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
    """The leaves of ``tree`` as torch tensors, in the order and dtypes of ``named_references``."""
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
    """
    result = dict(flax_variables)
    result[PARAMS] = tree_from_torch(_named(torch_model, PARAMS), flax_variables[PARAMS], PARAMS)
    buffers = _named(torch_model, BATCH_STATS)
    if buffers or BATCH_STATS in flax_variables:
        template = _template_tree(flax_variables, BATCH_STATS)
        result[BATCH_STATS] = tree_from_torch(buffers, template, BATCH_STATS)
    return result


def variables_to_torch(flax_variables: Mapping[str, PyTree], torch_model: torch.nn.Module) -> None:
    """Copy Flax variables into the torch model's parameters and buffers (in place)."""
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
    """A params tree from tensors in ``model.parameters()`` order."""
    return tree_from_torch(
        _pair(torch_model, parameters, PARAMS), _template_tree(template, PARAMS), PARAMS
    )


def params_to_torch_list(params: Mapping, torch_model: torch.nn.Module) -> list[torch.Tensor]:
    """A params-shaped tree as tensors in ``model.parameters()`` order."""
    return tree_to_torch(params, _named(torch_model, PARAMS), PARAMS)


def buffers_from_torch_list(
    buffers: Sequence[torch.Tensor], torch_model: torch.nn.Module, template: Template
) -> dict:
    """A batch_stats tree from tensors in ``model.buffers()`` order."""
    return tree_from_torch(
        _pair(torch_model, buffers, BATCH_STATS), _template_tree(template, BATCH_STATS), BATCH_STATS
    )


def buffers_to_torch_list(batch_stats: Mapping, torch_model: torch.nn.Module) -> list[torch.Tensor]:
    """A batch_stats tree as tensors in ``model.buffers()`` order."""
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
    """breaching's server payload (parameter and buffer lists) as a ServerPayload."""
    batch_stats = None
    if buffers is not None:
        batch_stats = buffers_from_torch_list(buffers, torch_model, template)
    return ServerPayload(
        params=params_from_torch_list(parameters, torch_model, template), batch_stats=batch_stats
    )


def payload_to_torch(payload: ServerPayload, torch_model: torch.nn.Module) -> dict:
    """A ServerPayload as breaching's ``dict(parameters=[...], buffers=[...] or None)``."""
    buffers = None
    if payload.batch_stats is not None:
        buffers = buffers_to_torch_list(payload.batch_stats, torch_model)
    return dict(parameters=params_to_torch_list(payload.params, torch_model), buffers=buffers)

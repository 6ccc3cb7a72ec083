"""What breaching's honest-but-curious server sends: pretrained weights, ``model_state``, buffers.

``HonestServer.distribute_payload`` reconfigures its model by ``server.model_state`` before every
query, then sends the parameters, and the buffers when ``server.provide_public_buffers``:

* ``default`` / ``trained``: the model as built (breaching does nothing for either);
* ``untrained``: every module re-initialised (``reset_parameters``, BatchNorm statistics too),
  afresh at each query; here a fresh ``model.init`` from a key folded with the query index;
* ``orthogonal``: re-initialised, then every kernel of a module whose torch name contains
  ``conv`` or ``linear`` set orthogonal (``torch.nn.init.orthogonal_``: the weight as a
  ``(out, in * k * k)`` matrix, gain 1), at each query;
* ``linearized``: each BatchNorm's scale set to its running variance and bias to its running
  mean + 10, each convolution's bias + 10, compounding from query to query; breaching fails on a
  convolution without bias (``None.data``), and so does this, with one line.

Other values (breaching's malicious servers' states) are refused. ``server.pretrained=True``
matters where breaching's ``construct_model`` reads it: for the Hugging Face text models the
weights come from the local hub cache (``fedjax_users.models.huggingface``); for torchvision's
models on ImageNet data the torchvision state dict comes from the local file ``server.weights``
(``torch.load(weights_only=True)``: tensors only, no code), its ``fc`` cut to the data's classes
as breaching does, and is converted by torch name with fedjax_users.interop.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedjax_users.data.errors import CaseConfigError, DataError
from fedjax_users.interop.state_dict import read_state_dict

__all__ = [
    "BREACHING_IMAGENET_MODELS", "BUFFER_LEAVES", "HONEST", "LINEARIZED_SHIFT", "MODEL_STATES", "Variables",
    "check_server", "load_pretrained", "pretrained_variables", "query_variables", "reads_pretrained", "weights_path",
]

# breaching's honest server's ``server.name``, and the ``server.model_state`` values it has.
HONEST = "honest_but_curious"
MODEL_STATES = ("default", "trained", "untrained", "orthogonal", "linearized")
# breaching's own ImageNet-branch models (model_preparation.py): never pretrained.
BREACHING_IMAGENET_MODELS = ("linear", "none")
# The last part of a torch state dict's buffer names (BatchNorm's), which go to ``batch_stats``.
BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")
# What ``linearized`` adds to each BatchNorm's and convolution's bias, per query (breaching's + 10).
LINEARIZED_SHIFT = 10.0

# A Flax variables dict: ``{"params": ..., "batch_stats": ...}``.
Variables = Mapping[str, Any]


def check_server(cfg_server: Mapping) -> None:
    """Refuse a server other than breaching's honest one, or a ``model_state`` it does not have.

    Args:
      cfg_server: the case's ``server`` block (a missing ``name`` is the honest server's, a missing
        ``model_state`` is ``default``).

    Raises:
      CaseConfigError: another server, or a ``model_state`` not in ``MODEL_STATES``.

    Example::

        >>> check_server({"name": "honest_but_curious", "model_state": "orthogonal"})
        >>> check_server({"model_state": "malicious"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.CaseConfigError: server.model_state='malicious' is not an honest server's; known: ...
    """
    name = cfg_server.get("name", HONEST)
    if name != HONEST:
        raise CaseConfigError(
            f"server.name={name!r}: only breaching's honest-but-curious server ({HONEST!r}) is supported"
        )
    state = cfg_server.get("model_state", "default")
    if state not in MODEL_STATES:
        raise CaseConfigError(f"server.model_state={state!r} is not an honest server's; known: {', '.join(MODEL_STATES)}")


def reads_pretrained(model_name: str, data_name: str, modality: str) -> bool:
    """Whether breaching's ``construct_model`` reads ``pretrained`` for this model and data.

    It does for its torchvision models on ImageNet data (vision, a data name containing
    ``ImageNet``), not for its own ``linear`` / ``none`` there, and never elsewhere.

    Args:
      model_name: breaching's model name (``"ResNet18"``).
      data_name: the data config's name (``"ImageNetAnimals"``).
      modality: the data's modality (``"vision"``, ``"text"``).

    Returns:
      Whether ``server.pretrained`` matters.

    Example::

        >>> reads_pretrained("ResNet18", "ImageNetAnimals", "vision")
        True
        >>> reads_pretrained("ResNet18", "CIFAR10", "vision"), reads_pretrained("linear", "ImageNetAnimals", "vision")
        (False, False)
    """
    return modality == "vision" and "ImageNet" in data_name and model_name.lower() not in BREACHING_IMAGENET_MODELS


# ---------------------------------------------------------------------------------------------
# Pretrained weights from a local torchvision state dict


def load_pretrained(path: str, template: Variables, classes: int, model_name: str) -> dict:
    """Variables shaped like ``template`` from the torchvision state dict at ``path``.

    As breaching: ``fc.weight`` / ``fc.bias`` keep their first ``classes`` rows. Buffers
    (``BUFFER_LEAVES``) go to ``batch_stats``, the rest to ``params``, matched by torch name
    (``interop.torch_flax.tree_from_torch``); each value takes the template's dtype.

    Args:
      path: a torch state dict (``torch.save``'d tensors, read with ``weights_only=True``).
      template: the model's variables, whose structure, shapes and dtypes the result takes.
      classes: the data's classes.
      model_name: breaching's model name, for messages.

    Returns:
      The variables.

    Raises:
      DataError: the file cannot be read (or torch is missing), or it does not fit the model.
    """
    state = read_state_dict(path, DataError)  # first: without torch, its one line says so
    from fedjax_users.interop.torch_flax import tree_from_torch

    for name in ("fc.weight", "fc.bias"):
        if name in state:
            state[name] = state[name][:classes]
    buffers = [(k, v) for k, v in state.items() if k.rsplit(".", 1)[-1] in BUFFER_LEAVES]
    params = [(k, v) for k, v in state.items() if k.rsplit(".", 1)[-1] not in BUFFER_LEAVES]
    try:
        variables = {"params": tree_from_torch(params, template["params"], "params")}
        if "batch_stats" in template:
            variables["batch_stats"] = tree_from_torch(buffers, template["batch_stats"], "batch_stats")
        elif buffers:
            raise ValueError(f"torch buffer {buffers[0][0]!r} has no counterpart: {model_name} has no BatchNorm")
    except ValueError as err:
        raise DataError(f"weights file {path} does not fit model {model_name}: {err}") from None
    # The file's dtypes give way to the model's (as load_state_dict copies into the model's tensors).
    return jax.tree_util.tree_map(lambda v, t: jnp.asarray(v, dtype=t.dtype), variables, dict(template))


def weights_path(cfg_server: Mapping, model_name: str) -> str:
    """``server.weights``, or one line saying how to give it.

    Args:
      cfg_server: the case's ``server`` block.
      model_name: breaching's model name, for the message.

    Returns:
      The path, ``~`` expanded.

    Raises:
      DataError: ``server.weights`` is not set (nothing is downloaded).

    Example::

        >>> import os
        >>> weights_path({"weights": "~/resnet18.pth"}, "ResNet18") == os.path.expanduser("~/resnet18.pth")
        True
    """
    path = cfg_server.get("weights")
    if not path:
        raise DataError(
            f"server.pretrained=True needs torchvision's {model_name} weights from a local file (nothing is "
            f"downloaded): pass server.weights=<path to the state dict .pth>, or server.pretrained=False"
        )
    return os.path.expanduser(str(path))


def pretrained_variables(cfg_server: Mapping, template: Variables, classes: int, model_name: str) -> dict:
    """``load_pretrained`` from ``server.weights``.

    Args:
      cfg_server: the case's ``server`` block (``weights`` is read: ``weights_path``).
      template: the model's variables.
      classes: the data's classes.
      model_name: breaching's model name.

    Returns:
      The variables, as ``load_pretrained``.
    """
    return load_pretrained(weights_path(cfg_server, model_name), template, classes, model_name)


# ---------------------------------------------------------------------------------------------
# model_state, per query


def _orthogonal(kernel: jax.Array, key: jax.Array) -> jax.Array:
    """``torch.nn.init.orthogonal_`` of the torch weight this Flax kernel stands for (gain 1)."""
    ndim = kernel.ndim
    # Flax (spatial..., in, out) -> torch (out, in, spatial...): flattened rows are torch's.
    to_torch = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
    torch_shape = tuple(kernel.shape[a] for a in to_torch)
    rows, cols = torch_shape[0], int(np.prod(torch_shape[1:]))
    matrix = jax.nn.initializers.orthogonal()(key, (rows, cols), kernel.dtype).reshape(torch_shape)
    return jnp.transpose(matrix, np.argsort(to_torch))


def _orthogonalize(params: Mapping, key: jax.Array) -> dict:
    flat = traverse_util.flatten_dict(dict(params))
    out = {}
    for i, (path, value) in enumerate(flat.items()):
        module = ".".join(path[:-1])
        if path[-1] == "kernel" and ("conv" in module or "linear" in module):
            value = _orthogonal(value, jax.random.fold_in(key, i))
        out[path] = value
    return traverse_util.unflatten_dict(out)


def _linearize(variables: Variables) -> dict:
    params = traverse_util.flatten_dict(dict(variables["params"]))
    stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
    out = dict(params)
    for path, value in params.items():
        module = path[:-1]
        if module + ("mean",) in stats:  # a BatchNorm
            if path[-1] == "scale":
                out[path] = stats[module + ("var",)].astype(value.dtype)
            elif path[-1] == "bias":
                out[path] = stats[module + ("mean",)].astype(value.dtype) + LINEARIZED_SHIFT
        elif path[-1] == "kernel" and value.ndim == 4:  # a convolution
            if module + ("bias",) not in params:
                raise DataError(
                    f"server.model_state=linearized: convolution {'.'.join(module)} has no bias, where "
                    f"breaching's server fails (it adds to the bias); pick another model_state"
                )
            out[module + ("bias",)] = params[module + ("bias",)] + LINEARIZED_SHIFT
    return {**variables, "params": traverse_util.unflatten_dict(out)}


def query_variables(
    model_state: str, built: Variables, previous: Optional[Variables], init: Callable[[jax.Array], Variables],
    key: jax.Array, query_id: int,
) -> dict:
    """The server's variables at query ``query_id`` (``previous``: those of the query before).

    By ``model_state`` (see the module docstring): ``untrained`` is ``init`` of the key folded with
    ``query_id``; ``orthogonal`` is that, with every ``conv``/``linear`` kernel made orthogonal;
    ``linearized`` shifts the previous query's variables (``built`` at the first); any other state
    gives ``built``.

    Args:
      model_state: ``server.model_state``.
      built: the variables of the model as built (pretrained or initialised).
      previous: the variables of query ``query_id - 1``, or ``None`` at the first.
      init: ``init(key) -> variables``, a fresh initialisation of the model.
      key: the server's key.
      query_id: the query's index.

    Returns:
      The variables the server sends at that query (a new dict; ``built`` is not changed).

    Raises:
      DataError: ``linearized`` on a convolution without bias (where breaching fails).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> built = {"params": {"bn": {"scale": jnp.ones(1), "bias": jnp.zeros(1)}},
        ...          "batch_stats": {"bn": {"mean": jnp.ones(1), "var": jnp.full(1, 2.0)}}}
        >>> first = query_variables("linearized", built, None, None, jax.random.key(0), 0)["params"]["bn"]
        >>> first["scale"].tolist(), first["bias"].tolist()  # the running variance, the running mean + 10
        ([2.0], [11.0])
    """
    query_key = jax.random.fold_in(key, query_id)
    if model_state == "untrained":
        return dict(init(query_key))
    if model_state == "orthogonal":
        fresh = dict(init(query_key))
        return {**fresh, "params": _orthogonalize(fresh["params"], jax.random.fold_in(query_key, 1))}
    if model_state == "linearized":
        return _linearize(built if previous is None else previous)
    return dict(built)

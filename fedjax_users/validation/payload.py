"""The server's payload and a user's BatchNorm state against the model's variables for these inputs.

A parameter whose expected shape follows the inputs' size (a Dense layer after a flatten, a
convolution's input channels) blames the inputs, naming both shapes; other mismatches blame the
payload. A model that draws random masks in train mode needs the server's buffers (eval mode).

Example::

    >>> import jax, jax.numpy as jnp
    >>> import fedjax_users as fu
    >>> from fedjax_users import models
    >>> from fedjax_users.validation import payload
    >>> model = models.get("linear", num_classes=3, num_channels=1)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    >>> payload.check_payload(model, fu.ServerPayload(params=params), (4, 4, 1), jnp.float32, "local_gradient")
    >>> payload.check_payload(model, fu.ServerPayload(params=params), (8, 8, 1), jnp.float32, "local_gradient")
    Traceback (most recent call last):
    ...
    fedjax_users.validation.errors.InputError: examples of shape (8, 8, 1) do not fit the payload: params['1']['kernel'] has shape (16, 3), examples of shape (8, 8, 1) make it (64, 3); the payload's parameters were made for inputs of another shape
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from fedjax_users.config import ConfigError
from fedjax_users.types import ServerPayload
from fedjax_users.validation.errors import InputError
from fedjax_users.validation.introspection import draws_in_train_mode, leaf_dtype, model_shapes, try_shapes
from fedjax_users.validation.layouts import LAYOUTS, input_kind

PyTree = Any
# (message, path, given shape, wanted shape): the shapes only where they differ.
Mismatch = tuple[str, tuple, Optional[tuple[int, ...]], Optional[tuple[int, ...]]]


def check_payload(model: nn.Module, payload: ServerPayload, example_shape: tuple[int, ...], dtype: DTypeLike,
                  function: str, inputs: Any = None) -> None:
    """Raise unless the payload's params (and buffers, if sent) fit the model for examples of ``example_shape``.

    Args:
      model: a Flax module.
      payload: the server's payload.
      example_shape: one example's shape (the inputs without their leading axes).
      dtype: the inputs' dtype.
      function: the public function checking (``"local_gradient"``, ``"local_update"``, ``"aggregate"``).
      inputs: one user's inputs, to hint at a missing examples axis in the message (optional).

    Returns:
      ``None``.

    Raises:
      InputError: naming the first entry that does not fit, and whether the inputs or the payload differ.
      ConfigError: the model draws random masks in train mode and no buffers were sent.
    """
    shape = (1,) + tuple(example_shape)
    expected = model_shapes(model, shape, dtype)
    for collection, given in (("params", payload.params), ("batch_stats", payload.batch_stats)):
        if collection == "batch_stats" and given is None:
            continue
        mismatch = first_mismatch(expected.get(collection, {}), given, collection)
        if mismatch is None:
            continue
        message, path, given_shape, wanted = mismatch
        hint = "" if inputs is None else one_example_hint(model, payload, inputs, dtype, function)
        if given_shape is not None and _depends_on_inputs(model, shape, dtype, collection, path, wanted):
            raise InputError(
                f"examples of shape {tuple(example_shape)} do not fit the payload: {collection}"
                f"{jax.tree_util.keystr(path)} has shape {given_shape}, examples of shape {tuple(example_shape)} "
                f"make it {wanted}; the payload's parameters were made for inputs of another shape{hint}"
            )
        raise InputError(f"payload does not fit the model: {message}{hint}")
    if payload.batch_stats is None and draws_in_train_mode(model, shape, dtype):
        # breaching's user draws these masks from torch's generator, which no JAX draw reproduces, and
        # the users here take no key for them: refuse rather than fail inside Flax mid-trace.
        raise ConfigError(
            f"{function}: the model draws random masks in train mode (dropout or stochastic depth), which "
            "this user does not draw; send the server's buffers (payload.batch_stats, eval mode, as "
            "breaching's default server does) or use a model without dropout"
        )


def check_state(model: nn.Module, state: PyTree, example_shape: tuple[int, ...], dtype: DTypeLike, name: str,
                lead: tuple[int, ...] = ()) -> None:
    """Raise ``InputError`` unless a caller's BatchNorm state fits the model's statistics.

    Args:
      model: a Flax module.
      state: the caller's ``user_state`` (or ``users_state``, stacked per user).
      example_shape: one example's shape (the inputs without their leading axes).
      dtype: the inputs' dtype.
      name: how the message names ``state``.
      lead: the leading axes every leaf of ``state`` has before the model's own shape (``(users,)``).

    Returns:
      ``None``.
    """
    expected = model_shapes(model, (1,) + tuple(example_shape), dtype).get("batch_stats", {})
    mismatch = first_mismatch(expected, state, name, lead)
    if mismatch is not None:
        raise InputError(f"{name} does not fit the model's BatchNorm statistics: {mismatch[0]}")


def first_mismatch(want: PyTree, given: PyTree, name: str, lead: tuple[int, ...] = ()) -> Optional[Mismatch]:
    """The first leaf of ``given`` that does not fit ``want``: missing, another shape, not floats, or extra.

    Args:
      want: the model's variables as shapes (``jax.ShapeDtypeStruct`` leaves).
      given: the caller's tree.
      name: how the message names ``given``.
      lead: leading axes every leaf of ``given`` has before ``want``'s shape.

    Returns:
      ``(message, path, given shape, wanted shape)`` (the shapes ``None`` unless they differ), or
      ``None`` if ``given`` fits.

    Example::

        >>> want = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}
        >>> first_mismatch(want, {"w": np.zeros((2, 3))}, "params")[0]
        "params['w'] has shape (2, 3), the model expects (3, 2)"
        >>> first_mismatch(want, {"w": np.zeros((4, 3, 2))}, "users_state", lead=(4,)) is None
        True
    """
    want_paths, given_paths = _leaves_by_path(want), _leaves_by_path(given)
    for path, leaf in want_paths.items():
        entry = f"{name}{jax.tree_util.keystr(path)}"
        if path not in given_paths:
            return f"{entry} is missing", path, None, None
        shape, wanted = tuple(np.shape(given_paths[path])), lead + tuple(leaf.shape)
        if shape != wanted:
            return f"{entry} has shape {shape}, the model expects {wanted}", path, shape, wanted
        dtype = leaf_dtype(given_paths[path])
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not jnp.issubdtype(dtype, jnp.floating):
            return f"{entry} has dtype {dtype}, the model expects floats", path, None, None
    extra = [p for p in given_paths if p not in want_paths]
    if extra:
        return f"unexpected entry {name}{jax.tree_util.keystr(extra[0])}", extra[0], None, None
    return None


def one_example_hint(model: nn.Module, payload: ServerPayload, inputs: Any, dtype: DTypeLike, function: str) -> str:
    """A hint for a message when ``inputs`` are one example without the leading axis, else ``""``.

    Traces the model again: call it on an error path only.

    Args:
      model: a Flax module.
      payload: the server's payload.
      inputs: one user's inputs as given.
      dtype: the inputs' dtype.
      function: the public function checking (an aggregate gets no hint).

    Returns:
      ``"; inputs of shape ... look like one example ..."``, or ``""``.
    """
    if function == "aggregate" or not _fits(model, (1,) + tuple(np.shape(inputs)), dtype, payload):
        return ""
    layout = LAYOUTS[function][input_kind(dtype)]
    return (
        f"; inputs of shape {tuple(np.shape(inputs))} look like one example without its examples axis: "
        f"{function} expects {layout} (use inputs[None] and labels[None])"
    )


def _leaves_by_path(tree: PyTree) -> dict:
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def _depends_on_inputs(model: nn.Module, shape: tuple[int, ...], dtype: DTypeLike, collection: str, path: tuple,
                       wanted: tuple[int, ...]) -> bool:
    """Whether the variable at ``path`` changes shape with the size of an input axis (a Dense after a flatten)."""
    for axis in range(1, len(shape)):
        other = shape[:axis] + (2 * shape[axis],) + shape[axis + 1 :]
        shapes = try_shapes(model, other, dtype)
        leaf = None if shapes is None else _leaves_by_path(shapes.get(collection, {})).get(path)
        if leaf is not None and tuple(leaf.shape) != wanted:
            return True
    return False


def _fits(model: nn.Module, shape: tuple[int, ...], dtype: DTypeLike, payload: ServerPayload) -> bool:
    """Whether ``payload`` fits the model's variables for inputs of ``shape``."""
    shapes = try_shapes(model, shape, dtype)
    return shapes is not None and first_mismatch(shapes.get("params", {}), payload.params, "params") is None

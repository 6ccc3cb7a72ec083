"""Every check of a user's arguments before computing: one check, for one user or for stacked users.

``validate_data`` checks the argument types, the config's user type against the function, the
ranks and shapes of inputs and labels, the payload (and a caller's BatchNorm state) against the
model's variables for these inputs, and, when they are concrete (not tracers of an outer ``jit``),
the labels against the model's number of outputs and the inputs for NaN and infinity. Shape
checks need no data, so they also run under an outer ``jit``; they trace the model once per
(model, input shape, dtype), cached (``introspection``).

The data's leading axes are the parameter: ``()`` for one user's ``[examples, ...]``
(``validate_user``), ``(num_users,)`` for stacked users' ``[users, examples, ...]``
(``validate_users``). ``check_chunk`` checks a streamed cohort's later users as they load.

Example::

    >>> import jax, jax.numpy as jnp
    >>> import fedjax_users as fu
    >>> from fedjax_users import losses, models
    >>> from fedjax_users.validation import inputs
    >>> model = models.get("linear", num_classes=3, num_channels=1)
    >>> x, y = jnp.ones((2, 4, 4, 1)), jnp.array([0, 2])
    >>> payload = fu.ServerPayload(params=model.init(jax.random.key(0), x)["params"])
    >>> cfg = fu.UserConfig(user_type="multiuser_aggregate", user_range=(0, 3), num_data_points=2)
    >>> inputs.validate_data(model, payload, fu.UserData(x[None], y[None]), cfg, jax.random.key(1), None,
    ...                      losses.softmax_cross_entropy, "aggregate", None, lead=(None,))
    Traceback (most recent call last):
    ...
    fedjax_users.validation.errors.InputError: user_range [0, 3] names 3 users, users_data holds 1
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from fedjax_users.config import ConfigError, UserConfig
from fedjax_users.losses import LossFn
from fedjax_users.types import ServerPayload, UserData
from fedjax_users.validation.arguments import check_types, check_user_kind
from fedjax_users.validation.errors import InputError, InputTypeError
from fedjax_users.validation.labels import INTEGER_LABEL_LOSSES, check_label_shape, check_label_values
from fedjax_users.validation.layouts import LAYOUTS, input_kind
from fedjax_users.validation.nonfinite import check_finite_inputs, is_concrete, on_host
from fedjax_users.validation.payload import check_payload, check_state, one_example_hint

PyTree = Any
# How messages name the data, the caller's state and whose examples they count, by the number of
# user axes before the examples axis.
_NAMES = {0: ("data", "user_state", "the user"), 1: ("users_data", "users_state", "each user")}


def validate_data(model: nn.Module, payload: ServerPayload, data: UserData, cfg: UserConfig, key: Any,
                  state: Optional[PyTree], loss: LossFn, function: str, check_finite: Optional[bool],
                  lead: tuple[Optional[int], ...] = ()) -> UserData:
    """Every check of a public user function before computing; returns ``data`` as arrays.

    Args:
      model: a Flax module.
      payload: the server's payload.
      data: the examples, with ``lead`` axes before the examples axis.
      cfg: the user config.
      key: the call's PRNG key.
      state: the caller's BatchNorm statistics (with ``lead`` axes), used when no buffers are sent.
      loss: the loss the user computes.
      function: ``"local_gradient"``, ``"local_update"`` or ``"aggregate"`` (named in messages).
      check_finite: the caller's ``check_finite`` (``False`` skips the inputs' finite check).
      lead: the sizes of the user axes before the examples axis: ``()`` for one user's
        ``[examples, ...]``, ``(num_users,)`` for stacked users' ``[users, examples, ...]``; a size
        of ``None`` is the data's own (a cohort passes its size, its first user's data holding fewer).

    Returns:
      ``data``, its sequences made arrays (a new ``UserData``; the caller's is not changed).

    Raises:
      InputTypeError: an argument of the wrong Python type.
      InputError: inputs, labels, a payload or a state that do not fit.
      ConfigError: a config of another user kind, or one the inputs cannot honour.
    """
    name, state_name, who = _NAMES[len(lead)]
    check_types(model, payload, data, cfg, key, loss, check_finite, name)
    check_user_kind(cfg, function)
    data = _as_arrays(data, name)
    inputs, labels, axis = data.inputs, data.labels, len(lead)
    _check_dtypes(inputs, labels, loss, name)
    _check_ranks(inputs, labels, function, name, lead=axis + 1)
    users = tuple(size or np.shape(inputs)[i] for i, size in enumerate(lead))
    _check_users(inputs, labels, cfg, users, name)
    dtype = jax.dtypes.canonicalize_dtype(inputs.dtype)
    _check_lengths(np.shape(inputs)[axis], np.shape(labels)[axis], dtype, cfg, who,
                   lambda: one_example_hint(model, payload, inputs, dtype, function))
    example_shape = tuple(np.shape(inputs))[axis + 1 :]
    check_payload(model, payload, example_shape, dtype, function, inputs)
    if payload.batch_stats is None and state is not None:
        check_state(model, state, example_shape, dtype, state_name, lead=users)
    check_label_shape(model, example_shape, dtype, labels, loss, name, lead=axis + 1)
    # Only the first num_data_points examples of each user are used, so only they must be valid.
    used_inputs = first_examples(inputs, cfg.num_data_points, axis)
    used_labels = first_examples(labels, cfg.num_data_points, axis)
    if is_concrete(used_inputs, used_labels):
        check_label_values(model, example_shape, dtype, used_inputs, used_labels, name, lead=axis + 1, loss=loss)
    if check_finite is not False and on_host(used_inputs, payload, state):
        check_finite_inputs({f"{name}.inputs": used_inputs, "payload": payload, state_name: state})
    return data


def validate_user(model: nn.Module, payload: ServerPayload, data: UserData, cfg: UserConfig, key: Any,
                  user_state: Optional[PyTree], loss: LossFn, function: str,
                  check_finite: Optional[bool]) -> UserData:
    """Every check of ``local_gradient`` / ``local_update`` before computing: ``validate_data`` for one user.

    Args:
      model, payload, cfg, key, loss, function, check_finite: as for ``validate_data``.
      data: one user's examples, ``[examples, ...]``.
      user_state: the user's BatchNorm statistics, or ``None``.

    Returns:
      ``data`` as arrays.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> from fedjax_users import losses, models
        >>> model = models.get("linear", num_classes=3, num_channels=1)
        >>> x = jnp.ones((2, 4, 4, 1))
        >>> payload = fu.ServerPayload(params=model.init(jax.random.key(0), x)["params"])
        >>> cfg = fu.UserConfig(user_type="local_gradient", num_data_points=2)
        >>> validate_user(model, payload, fu.UserData(x, [0, 1, 2]), cfg, jax.random.key(1), None,
        ...               losses.softmax_cross_entropy, "local_gradient", None)
        Traceback (most recent call last):
        ...
        fedjax_users.validation.errors.InputError: inputs and labels of the user have different lengths: 2 and 3
    """
    return validate_data(model, payload, data, cfg, key, user_state, loss, function, check_finite, lead=())


def validate_users(model: nn.Module, payload: ServerPayload, users_data: UserData, cfg: UserConfig, key: Any,
                   users_state: Optional[PyTree], loss: LossFn, check_finite: Optional[bool],
                   num_users: Optional[int] = None) -> UserData:
    """Every check of ``aggregate`` before computing: ``validate_data`` for stacked users.

    Args:
      model, payload, cfg, key, loss, check_finite: as for ``validate_data``.
      users_data: the users' examples, ``[users, examples, ...]``.
      users_state: the users' BatchNorm statistics stacked, or ``None``.
      num_users: ``users_data`` is the first user of a cohort of that many (``fedjax_users.cohort``),
        whose other users ``check_chunk`` checks as they load; ``None``: the users of ``users_data``.

    Returns:
      ``users_data`` as arrays.
    """
    return validate_data(model, payload, users_data, cfg, key, users_state, loss, "aggregate", check_finite,
                         lead=(num_users,))


def check_chunk(model: nn.Module, payload: ServerPayload, inputs: Any, labels: Any, loss: LossFn,
                check_finite: Optional[bool]) -> None:
    """A streamed chunk's examples as ``validate_users`` checks a cohort's, before the chunk runs.

    The shapes are those of the first user, checked before computing; a later user may still hold
    a label outside the model's classes or a non-finite input.

    Args:
      model: a Flax module.
      payload: the server's payload.
      inputs: the chunk's inputs, ``[users, examples, ...]`` host arrays.
      labels: the chunk's labels, ``[users, examples, ...]``.
      loss: the loss the users compute.
      check_finite: the caller's ``check_finite`` (``False`` skips the finite check).

    Returns:
      ``None``.
    """
    example_shape, dtype = tuple(np.shape(inputs))[2:], jax.dtypes.canonicalize_dtype(inputs.dtype)
    check_label_values(model, example_shape, dtype, inputs, labels, "users_data", lead=2, loss=loss)
    if check_finite is not False:
        check_finite_inputs({"users_data.inputs": inputs})


def first_examples(values: Any, count: int, axis: int = 0) -> Any:
    """The first ``count`` examples of ``values`` along ``axis``: ``values`` itself when that is all of them.

    Every example is used in the common call, and an eager call checks its inputs each time: returning
    the array itself there dispatches no slicing op.

    Args:
      values: an array whose axis ``axis`` holds the examples.
      count: how many examples are used (``cfg.num_data_points``).
      axis: the examples' axis (after any users' axes).

    Returns:
      ``values[..., :count, ...]`` on ``axis``, or ``values`` itself if it holds exactly ``count``.

    Example::

        >>> import numpy as np
        >>> x = np.arange(12).reshape(2, 3, 2)
        >>> first_examples(x, 2, axis=1).shape
        (2, 2, 2)
        >>> first_examples(x, 3, axis=1) is x
        True
    """
    if np.shape(values)[axis] == count:
        return values
    return values[(slice(None),) * axis + (slice(None, count),)]


def as_array(value: Any, name: str) -> Any:
    """``value`` if it is an array, else ``np.asarray(value)`` (nested lists of numbers).

    Args:
      value: an array (JAX, NumPy, a tracer) or nested lists of numbers.
      name: how messages name ``value`` (``"data.inputs"``).

    Returns:
      An array.

    Raises:
      InputTypeError: ``value`` is not an array nor numbers.
      InputError: ``value`` is ragged.

    Example::

        >>> as_array([[1, 2], [3, 4]], "data.labels").shape
        (2, 2)
        >>> as_array([[1, 2], [3]], "data.labels")
        Traceback (most recent call last):
        ...
        fedjax_users.validation.errors.InputError: data.labels is ragged: its entries have shapes [0] (2,), [1] (1,); data.labels must be one array
    """
    if isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)):
        return value
    if not isinstance(value, (list, tuple, int, float, np.generic)) or isinstance(value, bool):
        raise InputTypeError(f"{name} must be an array (JAX, NumPy or nested lists of numbers), got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None
    if array is None or array.dtype == object:
        raise InputError(f"{name} is ragged: its entries have shapes {_entry_shapes(value)}; {name} must be one array")
    return array


def _entry_shapes(value: Sequence) -> str:
    """The first two different shapes among the entries of a ragged sequence, with their indices."""
    seen: dict = {}
    for index, entry in enumerate(value):
        try:
            shape = np.shape(entry)
        except ValueError:
            shape = "ragged"
        seen.setdefault(shape, index)
        if len(seen) == 2:
            break
    return ", ".join(f"[{index}] {shape}" for shape, index in seen.items())


def _as_arrays(data: UserData, name: str) -> UserData:
    """``data`` with sequences made arrays (a new ``UserData``; the caller's is not changed)."""
    inputs, labels = as_array(data.inputs, f"{name}.inputs"), as_array(data.labels, f"{name}.labels")
    if inputs is data.inputs and labels is data.labels:
        return data
    return UserData(inputs=inputs, labels=labels)


def _check_dtypes(inputs: Any, labels: Any, loss: LossFn, name: str) -> None:
    if not (jnp.issubdtype(inputs.dtype, jnp.floating) or jnp.issubdtype(inputs.dtype, jnp.integer)):
        raise InputError(
            f"{name}.inputs have dtype {inputs.dtype}; expected floats (images) or integers (token ids)"
        )
    if not (jnp.issubdtype(labels.dtype, jnp.number) or labels.dtype == jnp.bool_):
        raise InputError(f"{name}.labels have dtype {labels.dtype}; expected numbers")
    if loss in INTEGER_LABEL_LOSSES and not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputError(f"{name}.labels have dtype {labels.dtype}; {loss.__name__} takes integer class indices")


def _check_ranks(inputs: Any, labels: Any, function: str, name: str, lead: int) -> None:
    """``lead`` leading axes (examples, or users and examples) on both, and at least one feature axis."""
    layout = LAYOUTS[function]
    expected = f"{function} expects {name}.inputs {layout[input_kind(inputs.dtype)]} and {name}.labels {layout['labels']}"
    if np.ndim(labels) < lead:
        raise InputError(f"{name}.labels have shape {tuple(np.shape(labels))}: {expected}")
    if np.ndim(inputs) < lead + 1:
        raise InputError(f"{name}.inputs have shape {tuple(np.shape(inputs))}: {expected}")


def _check_users(inputs: Any, labels: Any, cfg: UserConfig, users: tuple[int, ...], name: str) -> None:
    """Stacked users: as many as the config's ``user_range`` names, and as many labels as inputs."""
    if users and cfg.is_aggregate and cfg.user_range is not None and cfg.num_users != math.prod(users):
        raise InputError(
            f"user_range {list(cfg.user_range)} names {cfg.num_users} users, {name} holds {math.prod(users)}"
        )
    for axis in range(len(users)):
        if np.shape(labels)[axis] != np.shape(inputs)[axis]:
            raise InputError(f"inputs hold {np.shape(inputs)[axis]} users, labels hold {np.shape(labels)[axis]}")


def _check_lengths(num_inputs: int, num_labels: int, dtype: DTypeLike, cfg: UserConfig, who: str,
                   hint: Callable[[], str] = lambda: "") -> None:
    """Examples of inputs and labels (``num_*``: their examples axis) against each other and the config."""
    if num_inputs != num_labels:
        raise InputError(f"inputs and labels of {who} have different lengths: {num_inputs} and {num_labels}{hint()}")
    if num_inputs < cfg.num_data_points:
        raise InputError(f"{who} holds {num_inputs} examples, fewer than num_data_points={cfg.num_data_points}")
    if cfg.local_diff_privacy.input_noise > 0 and jnp.issubdtype(dtype, jnp.integer):
        raise ConfigError(
            "input_noise > 0 asks for float noise on integer token inputs (input_ids); set input_noise to 0"
        )

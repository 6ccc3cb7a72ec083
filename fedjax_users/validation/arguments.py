"""Arguments of the right Python type and kind: payload, data, config, loss, model, key, strategy.

These checks read no array values, so they cost nothing and run first: a wrong argument is named
before any shape is traced.

Example::

    >>> import fedjax_users as fu
    >>> from fedjax_users.validation import arguments
    >>> arguments.check_strategy("fast")
    Traceback (most recent call last):
    ...
    fedjax_users.validation.errors.InputTypeError: strategy must be a fedjax_users.strategy.Strategy or None, got str
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_users.config import ConfigError, UserConfig
from fedjax_users.strategy import Strategy
from fedjax_users.types import ServerPayload, UserData
from fedjax_users.validation.errors import InputTypeError


def check_types(model: Any, payload: Any, data: Any, cfg: Any, key: Any, loss: Any, check_finite: Any,
                data_name: str) -> None:
    """Raise ``InputTypeError`` naming the first argument of the wrong Python type.

    Args:
      model: must be a Flax module (anything with ``init`` and ``apply``).
      payload: must be a ``ServerPayload``.
      data: must be a ``UserData``.
      cfg: must be a ``UserConfig``.
      key: must be one PRNG key (typed, or a raw ``uint32[2]``).
      loss: must be callable.
      check_finite: must be ``None``, ``True`` or ``False``.
      data_name: how messages name ``data`` (``"data"``, ``"users_data"``).

    Returns:
      ``None``.
    """
    if not isinstance(payload, ServerPayload):
        raise InputTypeError(f"payload must be a fedjax_users.ServerPayload, got {type(payload).__name__}")
    if not isinstance(data, UserData):
        raise InputTypeError(f"{data_name} must be a fedjax_users.UserData, got {type(data).__name__}")
    if not isinstance(cfg, UserConfig):
        raise InputTypeError(
            f"cfg must be a fedjax_users.UserConfig (UserConfig.from_yaml / from_dict), got {type(cfg).__name__}"
        )
    if not callable(loss):
        raise InputTypeError(f"loss must be a function loss(logits, labels) -> [examples] or losses.SummedLosses, "
                             f"got {type(loss).__name__}")
    if not callable(getattr(model, "apply", None)) or not callable(getattr(model, "init", None)):
        raise InputTypeError(f"model must be a Flax module (with init and apply), got {type(model).__name__}")
    if check_finite is not None and not isinstance(check_finite, bool):
        raise InputTypeError(f"check_finite must be None, True or False, got {check_finite!r}")
    check_key(key)


def check_key(key: Any) -> None:
    """Raise ``InputTypeError`` unless ``key`` is one PRNG key.

    Args:
      key: a typed key (``jax.random.key``, shape ``()``) or a raw one (``jax.random.PRNGKey``, ``uint32[2]``).

    Returns:
      ``None``.

    Example::

        >>> check_key(jax.random.key(0))
        >>> check_key(0)
        Traceback (most recent call last):
        ...
        fedjax_users.validation.errors.InputTypeError: key must be one PRNG key (jax.random.key(seed)), got int
    """
    dtype, shape = getattr(key, "dtype", None), np.shape(key) if hasattr(key, "shape") else None
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype is not None and dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        described = f"{getattr(dtype, 'name', dtype)} array of shape {shape}" if dtype is not None else type(key).__name__
        raise InputTypeError(f"key must be one PRNG key (jax.random.key(seed)), got {described}")


def check_user_kind(cfg: UserConfig, function: str) -> None:
    """Raise ``ConfigError`` if ``cfg`` describes another kind of user than ``function`` computes.

    ``local_gradient`` takes ``local_gradient`` configs, ``local_update`` takes ``local_update``
    configs; a ``multiuser_aggregate`` config describes a cohort and goes to ``aggregate``, which
    also takes the two single-user kinds (every user of ``users_data`` is then one of them).

    Args:
      cfg: the user config.
      function: ``"local_gradient"``, ``"local_update"`` or ``"aggregate"``.

    Returns:
      ``None``.

    Example::

        >>> import fedjax_users as fu
        >>> check_user_kind(fu.UserConfig(user_type="local_gradient", num_data_points=1), "aggregate")
        >>> check_user_kind(fu.UserConfig(user_type="local_gradient", num_data_points=1), "local_update")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fedjax_users.config.ConfigError: local_update trains local steps, but cfg is a local_gradient config: ...
    """
    if function == "aggregate" or cfg.user_type == function:
        return
    one_user = "local_update" if cfg.is_multi_step else "local_gradient"
    if cfg.is_aggregate:
        raise ConfigError(
            f"{function} runs one user, but cfg is a multiuser_aggregate config (a cohort, user_range "
            f"{None if cfg.user_range is None else list(cfg.user_range)}): call aggregate, or pass "
            f"cfg.replace(user_type='{one_user}', user_range=None) to {one_user} for one of its users"
        )
    if function == "local_gradient":
        raise ConfigError(
            f"local_gradient takes one gradient, but cfg is a {cfg.user_type} config "
            f"(num_local_updates={cfg.num_local_updates}, local_learning_rate={cfg.local_learning_rate}): "
            "call local_update, or use user_type local_gradient"
        )
    raise ConfigError(
        f"local_update trains local steps, but cfg is a {cfg.user_type} config: call local_gradient, or use "
        "user_type local_update with num_local_updates, num_data_per_local_update_step and local_learning_rate"
    )


def check_strategy(strategy: Optional[Any]) -> None:
    """Raise ``InputTypeError`` unless ``strategy`` is ``None`` or a ``fedjax_users.strategy.Strategy``.

    A ``Strategy`` checks its own fields when it is built.

    Args:
      strategy: what the caller passed as ``strategy``.

    Returns:
      ``None``.
    """
    if strategy is not None and not isinstance(strategy, Strategy):
        raise InputTypeError(f"strategy must be a fedjax_users.strategy.Strategy or None, got {type(strategy).__name__}")

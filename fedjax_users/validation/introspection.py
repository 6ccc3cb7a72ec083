"""What a model's variables and outputs look like for given inputs: traced once, cached per model.

The checks need these shapes before computing, and the compute path reads the same cache
(``fedjax_users.users`` builds its programs from ``variable_shapes``), so a model is traced once
per (model, input shape, dtype) for both. Tracing is ``jax.eval_shape``: no data, no FLOPs, so it
also runs under an outer ``jit``.

Example::

    >>> import jax.numpy as jnp
    >>> from fedjax_users import models
    >>> from fedjax_users.validation import introspection
    >>> model = models.get("linear", num_classes=3, num_channels=1)
    >>> introspection.output_shape(model, (2, 4, 4, 1), jnp.float32).shape
    (2, 3)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.errors import InvalidRngError
from jax.typing import DTypeLike

from fedjax_users.validation.errors import InputError, first_line

PyTree = Any
T = TypeVar("T")
ShapeFn = Callable[[nn.Module, tuple[int, ...], DTypeLike], T]


def cached_by_model(fn: ShapeFn[T]) -> ShapeFn[T]:
    """``functools.lru_cache`` for functions of (model, shape, dtype), bypassed for an unhashable model.

    Flax modules hash by their fields, so equal models share entries; a module holding an
    unhashable field (a list, an array) is traced on every call instead of failing.

    Args:
      fn: a function of ``(model, shape, dtype)``.

    Returns:
      ``fn`` with its results cached (64 entries) for hashable models.

    Example::

        >>> calls = []
        >>> size = cached_by_model(lambda model, shape, dtype: calls.append(shape) or len(shape))
        >>> size("model", (2, 3), "float32"), size("model", (2, 3), "float32"), len(calls)
        (2, 2, 1)
        >>> size(["unhashable"], (2, 3), "float32"), len(calls)
        (2, 2)
    """
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def call(model: Any, shape: tuple[int, ...], dtype: DTypeLike) -> T:
        try:
            hash(model)
        except TypeError:
            return fn(model, shape, dtype)
        return cached(model, shape, dtype)

    return call


@cached_by_model
def variable_shapes(model: nn.Module, shape: tuple[int, ...], dtype: DTypeLike) -> PyTree:
    """The shapes of ``model``'s variables for inputs of ``shape`` (cached: each trace costs ~5 ms).

    Args:
      model: a Flax module.
      shape: the inputs' shape, examples axis first.
      dtype: the inputs' dtype.

    Returns:
      ``model.init``'s variables (``params``, ``batch_stats``, ...) as ``jax.ShapeDtypeStruct`` leaves.

    Example::

        >>> import jax.numpy as jnp
        >>> from fedjax_users import models
        >>> model = models.get("linear", num_classes=3, num_channels=1)
        >>> jax.tree_util.tree_map(lambda s: s.shape, variable_shapes(model, (1, 4, 4, 1), jnp.float32)["params"])
        {'1': {'bias': (3,), 'kernel': (16, 3)}}
    """
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, dtype))


@cached_by_model
def output_shape(model: nn.Module, shape: tuple[int, ...], dtype: DTypeLike) -> Any:
    """The shape of ``model.apply`` (eval mode) for inputs of ``shape``, from its variables' shapes.

    Args:
      model: a Flax module whose ``__call__`` takes ``train``.
      shape: the inputs' shape, examples axis first.
      dtype: the inputs' dtype.

    Returns:
      The output's ``jax.ShapeDtypeStruct`` (a tree of them for a model with several outputs).

    Example::

        >>> import jax.numpy as jnp
        >>> from fedjax_users import models
        >>> output_shape(models.get("linear", num_classes=3, num_channels=1), (5, 4, 4, 1), jnp.float32).shape
        (5, 3)
    """
    variables = variable_shapes(model, shape, dtype)
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jax.ShapeDtypeStruct(shape, dtype))


@cached_by_model
def draws_in_train_mode(model: nn.Module, shape: tuple[int, ...], dtype: DTypeLike) -> bool:
    """Whether ``model`` in train mode asks for an RNG stream (dropout, stochastic depth).

    Args:
      model: a Flax module whose ``__call__`` takes ``train``.
      shape: the inputs' shape, examples axis first.
      dtype: the inputs' dtype.

    Returns:
      ``True`` if the train-mode forward pass on such inputs needs a random key.

    Example::

        >>> import jax.numpy as jnp
        >>> from fedjax_users import models
        >>> draws_in_train_mode(models.get("linear", num_classes=3, num_channels=1), (1, 4, 4, 1), jnp.float32)
        False
    """
    variables = variable_shapes(model, shape, dtype)

    def train_forward(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    try:
        jax.eval_shape(train_forward, variables, jax.ShapeDtypeStruct(shape, dtype))
    except InvalidRngError:
        return True
    return False


def model_shapes(model: nn.Module, shape: tuple[int, ...], dtype: DTypeLike, what: ShapeFn = variable_shapes) -> Any:
    """``what(model, shape, dtype)``, a model that fails on such inputs reported as an ``InputError``.

    Args:
      model: a Flax module.
      shape: the inputs' shape, examples axis first.
      dtype: the inputs' dtype.
      what: ``variable_shapes`` or ``output_shape``.

    Returns:
      What ``what`` returns.

    Raises:
      InputError: naming the example shape and quoting the model's own error (chained).

    Example::

        >>> import jax.numpy as jnp
        >>> from fedjax_users import models
        >>> model_shapes(models.get("linear", num_classes=3, num_channels=1), (1, 4, 4, 1), jnp.float32,
        ...              output_shape).shape
        (1, 3)
    """
    try:
        return what(model, shape, dtype)
    except Exception as err:  # noqa: BLE001  (any failure of the model on these inputs; the cause is chained)
        raise InputError(
            f"the model cannot take examples of shape {shape[1:]} ({jnp.dtype(dtype).name}): {first_line(err)}"
        ) from err


def try_shapes(model: nn.Module, shape: tuple[int, ...], dtype: DTypeLike) -> Optional[PyTree]:
    """Variable shapes for ``shape``, or ``None`` where the model cannot take it (for a diagnosis only).

    Args:
      model: a Flax module.
      shape: the inputs' shape, examples axis first.
      dtype: the inputs' dtype.

    Returns:
      ``variable_shapes(model, shape, dtype)``, or ``None`` if tracing the model fails.
    """
    try:
        return variable_shapes(model, shape, dtype)
    except Exception:  # noqa: BLE001  (a shape the model refuses answers "does not fit"; no cause to report)
        return None


def leaf_dtype(leaf: Any) -> np.dtype:
    """A leaf's dtype: arrays, tracers and ``ShapeDtypeStruct`` have one; Python numbers get NumPy's.

    Args:
      leaf: a leaf of a payload, state or output tree.

    Returns:
      Its dtype.

    Example::

        >>> leaf_dtype(np.zeros(2, np.float32)), leaf_dtype(1.5)
        (dtype('float32'), dtype('float64'))
    """
    return leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)

"""Labels against the model's outputs: their shape per example, and integer labels within its classes.

The package's losses take integer class indices of the logits' shape without the class axis; a
language model's token ids (integer inputs of the labels' shape) index the same vocabulary.

Example::

    >>> import numpy as np, jax.numpy as jnp
    >>> from fedjax_users import models
    >>> from fedjax_users.validation import labels
    >>> model = models.get("linear", num_classes=3, num_channels=1)
    >>> x = np.zeros((2, 4, 4, 1), np.float32)
    >>> labels.check_label_values(model, (4, 4, 1), jnp.float32, x, np.array([0, 3]), "data", lead=1)
    Traceback (most recent call last):
    ...
    fedjax_users.validation.errors.InputError: data.labels must be class indices in [0, 3) for a model with 3 outputs; data.labels[1] is 3
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from fedjax_users import losses
from fedjax_users.losses import LossFn
from fedjax_users.validation.errors import InputError
from fedjax_users.validation.introspection import model_shapes, output_shape

# The package's losses take integer class indices of the logits' shape without the class axis.
INTEGER_LABEL_LOSSES = (losses.softmax_cross_entropy, losses.causal_lm_loss, losses.masked_lm_loss)
# Losses for which a label of ``losses.IGNORE_INDEX`` means "no loss here" (torch's ignore_index).
IGNORING_LOSSES = (losses.masked_lm_loss,)


def check_label_shape(model: nn.Module, example_shape: tuple[int, ...], dtype: DTypeLike, labels: Any,
                      loss: LossFn, name: str, lead: int) -> None:
    """Raise ``InputError`` unless labels have the logits' shape per example, without the class axis.

    Only the package's own losses (``INTEGER_LABEL_LOSSES``) say what labels they take; another
    loss's labels are not checked.

    Args:
      model: a Flax module.
      example_shape: one example's shape (the inputs without their leading axes).
      dtype: the inputs' dtype.
      labels: the labels, with ``lead`` leading axes (users, examples).
      loss: the loss the user computes.
      name: how messages name the data (``"data"``, ``"users_data"``).
      lead: the number of leading axes of ``labels`` before one example's labels.

    Returns:
      ``None``.
    """
    if loss not in INTEGER_LABEL_LOSSES:
        return
    out = model_shapes(model, (1,) + example_shape, dtype, output_shape)
    want = tuple(out.shape[1:-1])
    if tuple(np.shape(labels))[lead:] != want:
        raise InputError(
            f"{name}.labels have shape {tuple(np.shape(labels))}: the model's logits per example have shape "
            f"{tuple(out.shape[1:])}, so {loss.__name__} takes labels of {want or 'one class index'} per example"
        )


def check_label_values(model: nn.Module, example_shape: tuple[int, ...], dtype: DTypeLike, inputs: Any,
                       labels: Any, name: str, lead: int, loss: Optional[LossFn] = None) -> None:
    """Raise ``InputError`` naming the first integer label (or token id) outside the model's classes.

    A loss of ``IGNORING_LOSSES`` also takes ``losses.IGNORE_INDEX`` (no loss at that label).
    Float labels, and labels whose shape does not index the logits, are not checked. Reads the
    values: call it on concrete arrays only.

    Args:
      model: a Flax module.
      example_shape: one example's shape (the inputs without their leading axes).
      dtype: the inputs' dtype.
      inputs: the inputs, checked too when they are token ids of the labels' shape.
      labels: the labels, with ``lead`` leading axes (users, examples).
      name: how messages name the data (``"data"``, ``"users_data"``).
      lead: the number of leading axes of ``labels`` before one example's labels.
      loss: the loss the user computes.

    Returns:
      ``None``.
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        return
    classes = _class_bounds(model, example_shape, dtype, tuple(np.shape(labels))[lead:])
    if classes is None:
        return
    expected = f"class indices in [0, {classes}) for a model with {classes} outputs"
    if loss in IGNORING_LOSSES:
        labels = np.where(np.asarray(labels) == losses.IGNORE_INDEX, 0, np.asarray(labels))
        expected += f", or {losses.IGNORE_INDEX} (ignored)"
    _check_indices(labels, classes, f"{name}.labels", expected)
    # Per-token logits of a language model: the token ids index the same vocabulary.
    if jnp.issubdtype(inputs.dtype, jnp.integer) and tuple(np.shape(labels)) == tuple(np.shape(inputs)):
        _check_indices(inputs, classes, f"{name}.inputs (token ids)", f"in [0, {classes}), the model's vocabulary")


def _class_bounds(model: nn.Module, example_shape: tuple[int, ...], dtype: DTypeLike,
                  labels_shape: tuple[int, ...]) -> Optional[int]:
    """The number of classes (the logits' last axis) when labels of ``labels_shape`` per example index it."""
    out = model_shapes(model, (1,) + example_shape, dtype, output_shape)
    if not hasattr(out, "shape") or len(out.shape) < 2 or tuple(out.shape[1:-1]) != labels_shape:
        return None
    return int(out.shape[-1])


def _first_outside(values: np.ndarray, low: int, high: int) -> Optional[tuple]:
    """Index of the first entry outside ``[low, high)``, or ``None`` (one pass for min and max)."""
    if values.size == 0 or (values.min() >= low and values.max() < high):
        return None
    return tuple(int(i) for i in np.argwhere((values < low) | (values >= high))[0])


def _check_indices(values: Any, classes: int, what: str, expected: str) -> None:
    """Raise naming the first entry of ``values`` outside ``[0, classes)``."""
    host = np.asarray(values)
    bad = _first_outside(host, 0, classes)
    if bad is not None:
        where = what.split(" ")[0]
        raise InputError(f"{what} must be {expected}; {where}[{', '.join(map(str, bad))}] is {host[bad]}")

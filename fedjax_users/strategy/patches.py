"""Convolutions as patches times kernel (im2col), for layers whose kernel differs per user.

Under ``vmap`` over users whose parameters differ (every local step after the first), XLA lowers a
convolution with a batched kernel to a grouped convolution, which XLA:CPU runs several times slower than
the same arithmetic written as im2col patches and one batched matmul: ``[users, positions, window
* C] @ [users, window * C, features]``. ``convolutions_as_matmuls()`` swaps plain ``nn.Conv``
layers for that form inside a Flax ``apply``; the result is the same convolution up to float
rounding. Per-example clipping (``fedjax_users.strategy.clipping``) forms kernel gradients from the same
patches.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

Array = jax.Array

__all__ = [
    "computes_in_one_dtype",
    "conv_as_matmul",
    "conv_window",
    "convolutions_as_matmuls",
    "im2col",
    "is_plain_conv",
]


def conv_window(module: nn.Conv) -> tuple[int, ...]:
    """The kernel's spatial size, one entry per spatial axis.

    Args:
      module: a Flax convolution.

    Returns:
      ``kernel_size`` as a tuple.

    Example::

        >>> import flax.linen as nn
        >>> conv_window(nn.Conv(features=4, kernel_size=(3, 5)))
        (3, 5)
    """
    size = module.kernel_size
    return (size,) if isinstance(size, int) else tuple(size)


def _per_axis(module: nn.Conv, value: Any, default: int = 1) -> tuple[int, ...]:
    """A stride or dilation setting as one int per spatial axis."""
    rank = len(conv_window(module))
    value = default if value is None else value
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _padding_supported(module: nn.Conv) -> bool:
    """Zero padding (explicit, SAME or VALID): the padded input is what the kernel sees."""
    try:
        padding = canonicalize_padding(module.padding, len(conv_window(module)))
    except ValueError:
        return False
    # CIRCULAR / REFLECT / CAUSAL pad inside the layer with something other than zeros.
    return not isinstance(padding, str) or padding in ("SAME", "VALID")


def computes_in_one_dtype(module: nn.Module, inputs: Array, kernel: Any) -> bool:
    """Inputs, kernel and the layer's ``dtype`` (when set) agree: no promotion inside the layer.

    Args:
      module: a Flax layer with a ``dtype`` field.
      inputs: the layer's inputs.
      kernel: its kernel (an array or anything with a ``dtype``).

    Returns:
      Whether one dtype covers all three.

    Example::

        >>> import jax.numpy as jnp, flax.linen as nn
        >>> x, kernel = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 4))
        >>> computes_in_one_dtype(nn.Conv(4, (3, 3)), x, kernel)
        True
        >>> computes_in_one_dtype(nn.Conv(4, (3, 3), dtype=jnp.bfloat16), x, kernel)
        False
    """
    dtypes = {jnp.dtype(inputs.dtype), jnp.dtype(kernel.dtype)}
    if module.dtype is not None:
        dtypes.add(jnp.dtype(module.dtype))
    return len(dtypes) == 1


def is_plain_conv(module: nn.Module, inputs: Array, kernel: Any) -> bool:
    """An ``nn.Conv`` with no custom kernel, mask, groups or input dilation, in one dtype.

    What :func:`conv_as_matmul` computes exactly: zero padding (explicit, ``SAME`` or ``VALID``),
    any strides and kernel dilation.

    Args:
      module: a Flax layer.
      inputs: its inputs.
      kernel: its kernel.

    Returns:
      Whether the layer is such a convolution.

    Example::

        >>> import jax.numpy as jnp, flax.linen as nn
        >>> x, kernel = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 4))
        >>> is_plain_conv(nn.Conv(4, (3, 3)), x, kernel)
        True
        >>> is_plain_conv(nn.Conv(4, (3, 3), padding="CIRCULAR"), x, kernel)  # pads with other values than zeros
        False
    """
    if type(module) is not nn.Conv:
        return False
    return (
        module.conv_general_dilated is None
        and module.conv_general_dilated_cls is None
        and module.mask is None
        and module.feature_group_count == 1
        and all(d == 1 for d in _per_axis(module, module.input_dilation))
        and _padding_supported(module)
        and inputs.ndim > len(conv_window(module))
        and computes_in_one_dtype(module, inputs, kernel)
    )


def _zero_padding(module: nn.Conv, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """(low, high) zero padding per spatial axis for inputs of spatial size ``spatial``."""
    window = conv_window(module)
    padding = canonicalize_padding(module.padding, len(window))
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(window, _per_axis(module, module.kernel_dilation))]
        padding = jax.lax.padtype_to_pads(spatial, dilated, _per_axis(module, module.strides), padding)
    return [tuple(p) for p in padding]


def im2col(module: nn.Conv, x: Array) -> Array:
    """The patches a convolution's kernel sees, one row per output position, in the kernel's order.

    Args:
      module: a plain ``nn.Conv`` (:func:`is_plain_conv`): its window, padding, strides and dilation.
      x: ``[N, *spatial, C]`` inputs.

    Returns:
      ``[N, *out_spatial, prod(window) * C]``: at each output position the padded window's
      entries, flattened as the kernel ``[*window, C, features]`` is.

    Example::

        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> x = jax.ShapeDtypeStruct((2, 5, 5, 3), jnp.float32)
        >>> jax.eval_shape(lambda x: im2col(nn.Conv(4, (3, 3), padding="VALID", strides=2), x), x).shape
        (2, 2, 2, 27)
    """
    window = conv_window(module)
    rank = len(window)
    strides = _per_axis(module, module.strides)
    dilation = _per_axis(module, module.kernel_dilation)
    pads = _zero_padding(module, tuple(x.shape[1 : rank + 1]))
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
    # One spatial axis at a time, last first: stacking the strided slices of one axis shrinks the
    # array before the next axis multiplies it, and copies longer contiguous runs than slicing
    # every kernel offset of the full window (lax's patches op would run an identity convolution).
    for axis in reversed(range(1, rank + 1)):
        k, d, s = window[axis - 1], dilation[axis - 1], strides[axis - 1]
        out = (x.shape[axis] - (k - 1) * d - 1) // s + 1
        slices = [
            jax.lax.slice_in_dim(x, o * d, o * d + (out - 1) * s + 1, stride=s, axis=axis) for o in range(k)
        ]
        # Kernel-offset axes collect after the spatial ones, ahead of those already stacked.
        x = jnp.stack(slices, axis=rank + 1)
    return x.reshape(x.shape[: rank + 1] + (-1,))


def conv_as_matmul(module: nn.Conv, x: Array, kernel: Array, bias: Array | None) -> Array:
    """``module``'s convolution of ``x`` computed as im2col patches times the flattened kernel.

    Equal to the convolution up to float rounding (the same products, summed in another order).

    Args:
      module: a plain ``nn.Conv`` (:func:`is_plain_conv`).
      x: its inputs, ``[..., *spatial, C]`` (any leading axes, or none).
      kernel: ``[*window, C, features]``.
      bias: ``[features]``, or ``None``.

    Returns:
      ``[..., *out_spatial, features]``, as ``module.apply`` gives it.

    Example::

        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> conv, kernel, x = nn.Conv(4, (3, 3)), jnp.ones((3, 3, 2, 4)), jnp.arange(32.0).reshape(1, 4, 4, 2)
        >>> y = jax.jit(lambda x: conv_as_matmul(conv, x, kernel, None))(x)
        >>> bool(jnp.allclose(y, conv.apply({"params": {"kernel": kernel, "bias": jnp.zeros(4)}}, x)))
        True
    """
    rank = len(conv_window(module))
    lead = x.shape[: -rank - 1]
    # nn.Conv folds any number of leading axes into one batch; an unbatched input gets one.
    batched = x.reshape((-1,) + x.shape[-rank - 1 :])
    cols = im2col(module, batched)
    # The kernel's gradient is a contraction over positions, which XLA:CPU forms faster into
    # [features, fan_in] than into [fan_in, features] (``python -m benchmarks.studies.kernel_layout``).
    # Passing the kernel
    # through a transpose that the barrier keeps XLA from folding away gives its gradient that layout.
    kernel = jax.lax.optimization_barrier(kernel.reshape(-1, kernel.shape[-1]).T).T
    y = jnp.einsum("n...k,kf->n...f", cols, kernel, precision=module.precision)
    if bias is not None:
        y = y + bias
    return y.reshape(lead + y.shape[1:])


def _intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module) is not nn.Conv or len(args) != 1 or kwargs:
        return next_fun(*args, **kwargs)
    params = module.variables.get("params", {})
    kernel = params.get("kernel")
    if kernel is None or not is_plain_conv(module, args[0], kernel):
        return next_fun(*args, **kwargs)
    return conv_as_matmul(module, args[0], kernel, params.get("bias") if module.use_bias else None)


@contextlib.contextmanager
def convolutions_as_matmuls() -> Iterator[None]:
    """Within this context, plain ``nn.Conv`` calls run as :func:`conv_as_matmul` (others unchanged).

    Used while tracing a per-user computation under ``vmap`` over users whose kernels differ
    (module docstring), where XLA:CPU runs the matmul form faster.

    Example::

        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> conv, x = nn.Conv(4, (3, 3)), jnp.ones((1, 4, 4, 2))
        >>> variables = {"params": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}}
        >>> def apply(x):
        ...     with convolutions_as_matmuls():
        ...         return conv.apply(variables, x)
        >>> jax.jit(apply)(x)[0, 0, 0].tolist()  # a corner: 4 of the 9 positions are inside, 2 channels each
        [8.0, 8.0, 8.0, 8.0]
    """
    with nn.intercept_methods(_intercept):
        yield

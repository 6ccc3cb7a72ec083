"""A function's convolutions rewritten into the form XLA:CPU runs through Eigen, inside loops too.

XLA:CPU runs a convolution through Eigen's kernels only when it is *canonical*: input NHWC,
kernel HWIO, output NHWC, no window reversal. Its compiler brings other convolutions into that
form by transposing their operands, but only at a program's top level (``ConvCanonicalization``
walks the entry computation alone): in the body of a ``lax.scan`` or ``while_loop`` the
convolutions that autodiff makes (kernel gradients, and their derivatives in an attack's
gradient of a gradient) keep their layout and run through a generic loop. Its algebraic
simplifier also swaps the operands of a convolution whose kernel has more taps than its input
has positions, adding a window reversal that Eigen does not run, at the top level too. In the
gradient-inversion attack's loop on lenet_zhu (``fedjax_users.attacks``) those convolutions took
most of each step (``python -m benchmarks.studies.evaluate_vs_breaching``, docs/performance.md).

:func:`canonical` traces a function and evaluates its program again with every convolution
written as a canonical one between transposes; with its operands swapped here, reversed by
explicit ``rev`` rather than a window reversal, where XLA would swap them; as one matrix product
of its gathered windows where it has few output positions and more kernel taps (a kernel
gradient, which Eigen computes slowly); and, for a grouped convolution of at most
:data:`MAX_SPLIT_GROUPS` groups (what ``jax.vmap`` makes of a convolution whose operands are both
batched), as one convolution per group. Transposes, reversals, gathers and splits move values
without arithmetic; the products added are the same, in another order, so results agree to float
rounding. It is written by hand because XLA offers no option to canonicalize inside loops, and
no library we know of rewrites a JAX program's convolutions.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax.extend.core import primitives

# A convolution with at most this many output positions, and more kernel taps than that, is
# computed as one matrix product of its gathered windows: a kernel gradient of lenet_zhu (5x5
# positions, 8x8 or 16x16 taps of one example) took 85-95 us as Eigen's convolution and 15 us so,
# in CPU time on the 2-core machine; a slice per position bounds the program's size.
MAX_ROWS = 64

# Grouped convolutions of more groups than this stay grouped: splitting one into a convolution per
# group pays for the few groups of a vmap over attacks, not for a depthwise layer's hundreds.
MAX_SPLIT_GROUPS = 64

__all__ = ["MAX_ROWS", "MAX_SPLIT_GROUPS", "canonical", "convolution"]


def canonical(fun: Callable) -> Callable:
    """``fun`` with its convolutions rewritten as XLA:CPU's canonical ones (see the module docstring).

    Args:
      fun: a function of arrays (pytrees of them) to arrays, as ``jax.jit`` takes. Convolutions in
        ``jit``-ted calls inside it, and in the bodies of its ``scan``, ``while_loop`` and ``cond``,
        are rewritten too; those inside custom derivative rules are left as they are.

    Returns:
      A function of the same arguments returning the same values to float rounding. Differentiate
      ``fun`` before rewriting it, not after: the rewrite is for the program that runs.

    Example::

        >>> x, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
        >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
        ...                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
        >>> kernel_gradient = jax.grad(lambda w: jnp.sum(conv(x, w) ** 2))
        >>> bool(jnp.allclose(canonical(kernel_gradient)(w), kernel_gradient(w)))
        True
    """

    @functools.wraps(fun)
    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return rewritten


def _evaluate(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """``jaxpr`` on ``args``, convolutions rewritten, calls inlined, loop and branch bodies rewritten."""
    env: dict[Any, Any] = {}

    def read(var):
        return var.val if isinstance(var, core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        prim, params = eqn.primitive, eqn.params
        if prim is primitives.conv_general_dilated_p:
            outs = [convolution(*invals, **params)]
        elif prim is primitives.jit_p:
            outs = _evaluate(params["jaxpr"].jaxpr, params["jaxpr"].consts, invals)
        elif prim is primitives.closed_call_p:
            outs = _evaluate(params["call_jaxpr"].jaxpr, params["call_jaxpr"].consts, invals)
        else:
            if prim in (primitives.scan_p, primitives.while_p, primitives.cond_p):
                params = {k: _rewrite_jaxprs(v) for k, v in params.items()}
            outs = prim.bind(*invals, **prim.get_bind_params(params))
            outs = outs if prim.multiple_results else [outs]
        env.update((v, x) for v, x in zip(eqn.outvars, outs) if not isinstance(v, core.DropVar))
    return [read(v) for v in jaxpr.outvars]


def _rewrite_jaxprs(param: Any) -> Any:
    """A loop's or branch's closed jaxpr (or a tuple of them) traced again through :func:`_evaluate`."""
    if isinstance(param, tuple):
        return tuple(_rewrite_jaxprs(p) for p in param)
    if not isinstance(param, core.ClosedJaxpr):
        return param
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type) for v in param.jaxpr.invars]
    return jax.make_jaxpr(lambda *args: _evaluate(param.jaxpr, param.consts, args))(*avals)


def convolution(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    """``lax.conv_general_dilated_p`` with these ``params``, as canonical convolutions between transposes.

    Args:
      lhs: the input, laid out as ``params["dimension_numbers"]`` says.
      rhs: the kernel, likewise.
      **params: the parameters of a ``conv_general_dilated`` equation of a jaxpr.

    Returns:
      What ``lax.conv_general_dilated_p.bind(lhs, rhs, **params)`` returns, to float rounding.

    Example::

        >>> x, w = jnp.ones((2, 3, 9, 9)), jnp.ones((4, 3, 2, 2))  # NCHW input, OIHW kernel
        >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID")
        >>> params = jax.make_jaxpr(conv)(x, w).eqns[0].params
        >>> bool(jnp.array_equal(convolution(x, w, **params), conv(x, w)))
        True
    """
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    for count, lhs_axis in (("feature_group_count", lhs_spec[1]), ("batch_group_count", lhs_spec[0])):
        groups = params[count]
        if 1 < groups <= MAX_SPLIT_GROUPS:
            # Group g: the g-th slice of lhs along the grouped axis with the g-th slice of rhs's
            # output features; the outputs stacked along the output features.
            pairs = zip(jnp.split(lhs, groups, axis=lhs_axis), jnp.split(rhs, groups, axis=rhs_spec[0]))
            return lax.concatenate([convolution(l, r, **{**params, count: 1}) for l, r in pairs], out_spec[1])
    # The operands as NHWC and HWIO; the convolution's result comes back NHWC.
    x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    if _swap_pays(x, w, params):
        y = _swapped(x, w, params)
    elif _by_rows_pays(x, w, params):
        y = _by_rows(x, w, params)
    else:
        y = _nhwc(x, w, params)
    order = (out_spec[0], *out_spec[2:], out_spec[1])  # axis i of y is axis order[i] of the output
    return jnp.transpose(y, [order.index(axis) for axis in range(y.ndim)])


def _nhwc(x: jax.Array, w: jax.Array, params: dict, **changes: Any) -> jax.Array:
    """The canonical convolution of NHWC ``x`` with HWIO ``w`` (``params`` with ``changes``)."""
    n = x.ndim - 2
    params = {**params, **changes}
    if any(lo < 0 or hi < 0 for lo, hi in params["padding"]):
        # XLA:CPU's canonical convolution gets negative padding wrong (an 8x8 input padded (-6, 0),
        # (-5, 1): off by up to 4.4 in JAX 0.10.2), so the input is cropped (and dilated) first.
        crop = [(min(lo, 0), min(hi, 0), d - 1) for (lo, hi), d in zip(params["padding"], params["lhs_dilation"])]
        x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *crop, (0, 0, 0)])
        params.update(padding=tuple((max(lo, 0), max(hi, 0)) for lo, hi in params["padding"]), lhs_dilation=(1,) * n)
    spec = lax.ConvDimensionNumbers((0, n + 1, *range(1, n + 1)), (n + 1, n, *range(n)), (0, n + 1, *range(1, n + 1)))
    return primitives.conv_general_dilated_p.bind(x, w, **{**params, "dimension_numbers": spec})


def _swap_pays(x: jax.Array, w: jax.Array, params: dict) -> bool:
    """Whether XLA would swap the operands: its ``ConvOperandSwapper``'s test, more kernel taps than input positions.

    Spatial axes where the kernel spans the whole unpadded input, or that hold groups, are left
    out of both counts, as there; an input of one position fully padded counts as the kernel's.
    """
    if params["feature_group_count"] > 1 or params["batch_group_count"] > 1:
        return False
    n = x.ndim - 2
    taps = positions = 1
    for size, k, (lo, hi), s, ld, rd in zip(x.shape[1 : n + 1], w.shape[:n], params["padding"], params["window_strides"],
                                           params["lhs_dilation"], params["rhs_dilation"]):
        unpadded = lo == 0 and hi == 0 and rd == 1
        if unpadded and ((ld == k and s == k - 1) or (k == size and ld == 1 and s == 1)):
            continue
        taps *= k
        positions *= k if size == 1 and s == 1 and rd == 1 and lo == hi == k - 1 else size
    return taps > positions


def _swapped(x: jax.Array, w: jax.Array, params: dict) -> jax.Array:
    """The convolution of ``x`` with ``w`` computed with ``w`` as the input and ``x`` as the kernel.

    As XLA swaps them, but with both operands reversed explicitly rather than by a window
    reversal: the kernel's dilation becomes the input's and the input's the kernel's, the stride
    stays, the padding becomes ``|x dilated| + pad - |w dilated|`` on each side, and batch and
    output features trade places.
    """
    n = x.ndim - 2
    dilated_x = [(s - 1) * d + 1 for s, d in zip(x.shape[1 : n + 1], params["lhs_dilation"])]
    dilated_w = [(k - 1) * d + 1 for k, d in zip(w.shape[:n], params["rhs_dilation"])]
    padding = tuple((dx + lo - dw, dx + hi - dw) for dx, dw, (lo, hi) in zip(dilated_x, dilated_w, params["padding"]))
    new_x = lax.rev(jnp.moveaxis(w, -1, 0), tuple(range(1, n + 1)))  # [Cout, K..., Cin]: output features as the batch
    new_w = lax.rev(jnp.moveaxis(x, 0, -1), tuple(range(n)))  # [S..., Cin, B]: the batch as output features
    y = _nhwc(new_x, new_w, params, padding=padding, lhs_dilation=tuple(params["rhs_dilation"]),
              rhs_dilation=tuple(params["lhs_dilation"]))
    return jnp.moveaxis(jnp.moveaxis(y, 0, -1), -2, 0)  # [Cout, out..., B] -> [B, out..., Cout]


def _output_sizes(x: jax.Array, w: jax.Array, params: dict) -> list[int]:
    """The convolution's output size along each spatial axis (NHWC ``x``, HWIO ``w``)."""
    n = x.ndim - 2
    return [((s - 1) * ld + 1 + lo + hi - (k - 1) * rd - 1) // stride + 1
            for s, k, (lo, hi), ld, rd, stride in zip(x.shape[1 : n + 1], w.shape[:n], params["padding"],
                                                      params["lhs_dilation"], params["rhs_dilation"],
                                                      params["window_strides"])]


def _by_rows_pays(x: jax.Array, w: jax.Array, params: dict) -> bool:
    """Whether to gather the windows (:func:`_by_rows`): few output positions, more kernel taps than those."""
    n = x.ndim - 2
    positions = math.prod(_output_sizes(x, w, params))
    return (params["feature_group_count"] == 1 and params["batch_group_count"] == 1
            and positions <= MAX_ROWS and positions < math.prod(w.shape[:n]))


def _by_rows(x: jax.Array, w: jax.Array, params: dict) -> jax.Array:
    """The convolution as one matrix product: each output position's window sliced out, all stacked."""
    n = x.ndim - 2
    dilations = [(lo, hi, d - 1) for (lo, hi), d in zip(params["padding"], params["lhs_dilation"])]
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *dilations, (0, 0, 0)])  # negative padding crops
    taps, rd, strides = w.shape[:n], params["rhs_dilation"], params["window_strides"]
    span = [(k - 1) * d + 1 for k, d in zip(taps, rd)]
    outs = _output_sizes(x, w, {**params, "padding": ((0, 0),) * n, "lhs_dilation": (1,) * n})
    windows = []
    for position in itertools.product(*map(range, outs)):
        start = [q * s for q, s in zip(position, strides)]
        windows.append(lax.slice(x, (0, *start, 0), (x.shape[0], *[a + b for a, b in zip(start, span)], x.shape[-1]),
                                 (1, *rd, 1)))
    patches = jnp.stack(windows, axis=1).reshape(x.shape[0], *outs, -1)  # [B, out..., taps * Cin]
    return lax.dot_general(patches, w.reshape(-1, w.shape[-1]), (((n + 1,), (0,)), ((), ())),
                           precision=params["precision"], preferred_element_type=params["preferred_element_type"])

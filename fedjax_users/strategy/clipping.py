"""Per-example gradient clipping without per-example convolution and dense weight gradients.

The reference clips each example's gradient to a global L2 norm and averages the clipped
gradients. Doing that with ``vmap(grad)`` builds a weight gradient per example for every
convolution, which XLA lowers to slow grouped convolutions. For a layer ``y = W * a + b`` whose
kernel ``W`` is used only there, example ``i``'s kernel gradient is a function of that layer's
input ``a_i`` and output cotangent ``delta_i`` alone:

* dense: ``G_i = a_i^T delta_i`` (positions = every axis but the features);
* convolution: ``G_i = P_i^T delta_i`` with ``P_i`` the example's im2col patches.

So one vectorised backward pass to the layer *outputs* (cheap: no weight gradients) gives every
``a_i`` and ``delta_i``; the kernel norms come from one batched matmul per layer (or, when the
patch Gram matrices are smaller, from ``||G_i||^2 = <P_i P_i^T, delta_i delta_i^T>``, the "ghost
norm"), and the clipped sum ``sum_i c_i G_i`` from the same quantities. Every other parameter
(biases, BatchNorm, embeddings, kernels of unsupported or reused layers) keeps an ordinary
per-example gradient from that same pass.

Each example still runs as its own batch of one (the pass is a ``vmap`` over examples), so
BatchNorm in train mode normalises each example with its own statistics, as the reference does.
The result equals ``vmap(grad)`` clipping up to float rounding.

Example::

    >>> import jax, jax.numpy as jnp
    >>> import fedjax_users as fu
    >>> from fedjax_users import semantics
    >>> from fedjax_users.strategy import clipping
    >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
    >>> x, y = jax.random.normal(jax.random.key(0), (4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> def objective(p, example):  # one example as a batch of one
    ...     logits = model.apply({"params": p}, example[0][None])
    ...     return fu.losses.softmax_cross_entropy(logits, example[1][None]).mean(), None
    >>> fast, _ = jax.jit(clipping.clipped_mean_gradient, static_argnums=0)(objective, params, (x, y), 0.1)
    >>> plain, _ = jax.jit(semantics.clipped_mean_gradient, static_argnums=0)(objective, params, (x, y), 0.1)
    >>> bool(jnp.allclose(fast["1"]["kernel"], plain["1"]["kernel"], atol=1e-6))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_users import convolutions, privacy, semantics

from fedjax_users.strategy import chunking, cpu, patches

__all__ = ["Objective", "auto_examples_per_chunk", "chunk_bounds", "clipped_mean_gradient", "example_bytes",
           "fast_layers"]

Array = jax.Array
PyTree = Any
Path = tuple[str, ...]
# objective(params, example) -> (loss of that one example, aux); ``example`` is one slice of the batch.
Objective = Callable[[PyTree, PyTree], tuple[Array, PyTree]]

# Primitives through which a supported layer consumes its kernel.
_KERNEL_PRIMITIVES = {"conv_general_dilated", "dot_general"}


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A dense or convolution layer whose kernel gradient is formed from its input and cotangent."""

    path: Path
    module: nn.Module
    input_shape: tuple[int, ...]  # one example's, as the layer sees it
    output_shape: tuple[int, ...]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        in_features = self.input_shape[-1]
        if self.is_conv:
            return patches.conv_window(self.module) + (in_features, self.module.features)
        return (in_features, self.module.features)


# ----------------------------------------------------------------------------------------------
# Which layers take the fast path


def _supported(module: nn.Module, inputs: Array, kernel: Any) -> bool:
    """Plain ``nn.Dense`` / ``nn.Conv`` computing in their kernel's dtype (no custom kernels)."""
    if type(module) is nn.Conv:
        return patches.is_plain_conv(module, inputs, kernel)
    return (
        type(module) is nn.Dense
        and module.dot_general is None
        and module.dot_general_cls is None
        and patches.computes_in_one_dtype(module, inputs, kernel)
    )


def _kernels(params: PyTree, paths: list[Path]) -> list[Optional[Any]]:
    """The kernel of the module at each of ``paths`` in a Flax parameter dict (``None`` where it has none)."""
    flat = traverse_util.flatten_dict(params)
    return [flat.get(path + ("kernel",)) for path in paths]


def _with_kernels(params: PyTree, layers: list[_Layer], kernels: list[Any]) -> PyTree:
    """A copy of ``params`` with each of ``layers``' kernels replaced (``None`` drops that leaf)."""
    # keep_empty_nodes: an empty sub-dict is part of the tree's structure and must come back.
    flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
    flat.update({layer.path + ("kernel",): kernel for layer, kernel in zip(layers, kernels)})
    return traverse_util.unflatten_dict(flat)


def _kernel_used_once(objective: Objective, params: PyTree, example: PyTree, layers: list[_Layer]) -> set:
    """Paths whose kernel enters the computation through exactly one conv/matmul and nothing else.

    A kernel read anywhere else (weight tying, a regulariser, a lifted transform) would get gradient
    the fast path does not see, so such layers stay on the per-example path.
    """

    def with_kernels(kernels, ex):
        return objective(_with_kernels(params, layers, kernels), ex)

    kernels = _kernels(params, [layer.path for layer in layers])
    jaxpr = jax.make_jaxpr(with_kernels)(kernels, example).jaxpr
    kernel_vars = jaxpr.invars[: len(layers)]
    uses = {id(v): [] for v in kernel_vars}
    for eqn in jaxpr.eqns:
        for var in eqn.invars:
            if id(var) in uses:
                uses[id(var)].append(eqn.primitive.name)
    outputs = {id(v) for v in jaxpr.outvars}
    return {
        layer.path
        for layer, var in zip(layers, kernel_vars)
        if len(uses[id(var)]) == 1 and uses[id(var)][0] in _KERNEL_PRIMITIVES and id(var) not in outputs
    }


def fast_layers(objective: Objective, params: PyTree, example: PyTree) -> list[_Layer]:
    """The layers whose kernels take the fast path, found by tracing ``objective`` on one example.

    A layer qualifies when it is a plain ``nn.Dense`` or ``nn.Conv`` (computing in its kernel's
    dtype, no custom dot), called once, and its kernel enters the computation only through that call.

    Args:
      objective: ``objective(params, example) -> (loss, aux)`` of one example.
      params: the parameters (a Flax ``params`` dict).
      example: one example (no leading examples axis); only its shapes are traced.

    Returns:
      The qualifying layers (their ``path`` in ``params``, module and one example's shapes), in call order.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jnp.ones((4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> def objective(p, example):  # one example as a batch of one
        ...     logits = model.apply({"params": p}, example[0][None])
        ...     return fu.losses.softmax_cross_entropy(logits, example[1][None]).mean(), None
        >>> [layer.path for layer in fast_layers(objective, params, (x[0], y[0]))]
        [('1',)]
    """
    calls: list[tuple[nn.Module, Any, Any]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            calls.append((context.module, args[0] if args else None, out))
        return out

    def traced(p, ex):
        with nn.intercept_methods(record):
            return objective(p, ex)

    jax.eval_shape(traced, params, example)
    paths = [module.path for module, _, _ in calls]
    candidates = []
    for (module, inputs, out), kernel in zip(calls, _kernels(params, paths)):
        if inputs is None or kernel is None or paths.count(module.path) != 1:
            continue
        if not _supported(module, inputs, kernel):
            continue
        layer = _Layer(module.path, module.clone(parent=None), tuple(inputs.shape), tuple(out.shape))
        if tuple(np.shape(kernel)) == layer.kernel_shape:
            candidates.append(layer)
    if not candidates:
        return []
    once = _kernel_used_once(objective, params, example, candidates)
    return [layer for layer in candidates if layer.path in once]


# ----------------------------------------------------------------------------------------------
# Kernel gradients from layer inputs and output cotangents


def _rows(layer: _Layer, inputs: Array, cotangents: Array) -> tuple[Array, Array]:
    """Per example ``A [B, positions, fan_in]`` and ``D [B, positions, features]`` with ``G_i = A_i^T D_i``."""
    batch = inputs.shape[0]
    if layer.is_conv:
        rank = len(patches.conv_window(layer.module))
        # Fold any extra leading axes of one example into the convolution batch.
        inputs = inputs.reshape((-1,) + inputs.shape[-rank - 1 :])
        inputs = patches.im2col(layer.module, inputs)
    rows = inputs.reshape(batch, -1, inputs.shape[-1])
    cols = cotangents.reshape(batch, -1, cotangents.shape[-1])
    if rows.shape[1] != cols.shape[1]:
        raise AssertionError(f"layer {'/'.join(layer.path)}: {rows.shape} patches vs {cols.shape} outputs")
    return rows, cols


def _prefer_gram(positions: int, fan_in: int, features: int) -> bool:
    """Gram matrices beat materialising ``G_i`` when positions are few (always for a plain Dense)."""
    # Materialising costs P*K*F to build plus 2*K*F to reduce and reweight; the Gram route costs
    # P^2*(K+F) plus one batched weight gradient (P*K*F) at the end.
    return positions * positions * (fan_in + features) < 2 * fan_in * features


def _kernel_norms_and_sum(layer: _Layer, inputs: Array, cotangents: Array, precision):
    """Squared per-example kernel-gradient norms ``[B]`` and a function ``weights -> sum_i w_i G_i``."""
    rows, cols = _rows(layer, inputs, cotangents)
    shape = layer.kernel_shape
    if _prefer_gram(rows.shape[1], rows.shape[2], cols.shape[2]):
        gram_in = jnp.einsum("bpk,bqk->bpq", rows, rows, precision=precision)
        gram_out = jnp.einsum("bpf,bqf->bpq", cols, cols, precision=precision)
        squares = jnp.sum(gram_in * gram_out, axis=(1, 2))

        def weighted_sum(weights):
            scaled = cols * weights[:, None, None].astype(cols.dtype)
            return jnp.einsum("bpk,bpf->kf", rows, scaled, precision=precision).reshape(shape)

        return squares, weighted_sum
    # Features-major output: XLA's CPU batched matmul runs about twice as fast in this layout.
    per_example = jnp.einsum("bpk,bpf->bfk", rows, cols, precision=precision)
    squares = jnp.sum(jnp.square(per_example), axis=(1, 2))

    def weighted_sum(weights):
        return jnp.tensordot(weights.astype(per_example.dtype), per_example, 1).T.reshape(shape)

    return squares, weighted_sum


# ----------------------------------------------------------------------------------------------
# Clipped mean gradient


def _tree_squares(tree: PyTree) -> Array:
    """Per-example squared L2 norm over all leaves (leading axis = examples)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1)), axis=1) for leaf in leaves)


def _weighted_sum(weights: Array, tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, 1), tree)


def _clipped_sum_vmap(
    objective: Objective, params: PyTree, examples: PyTree, clip_value: float, divisor: int
) -> tuple[PyTree, PyTree]:
    """The sum of the examples' clipped gradients over ``divisor``, by ``vmap`` of per-example gradients."""
    grads, aux = semantics.clipped_example_gradients(objective, params, examples, clip_value)
    return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0) / divisor, grads), aux


def _clipped_sum_fast(
    objective: Objective, params: PyTree, examples: PyTree, clip_value: float, divisor: int, layers: list[_Layer]
) -> tuple[PyTree, PyTree]:
    """The sum of the examples' clipped gradients over ``divisor``; ``layers``' kernels from inputs and cotangents."""
    kernels = _kernels(params, [layer.path for layer in layers])
    # A placeholder keeps the tree's structure; the real kernel is put back below.
    others = _with_kernels(params, layers, [jnp.zeros((), kernels[0].dtype) for _ in layers])
    index = {layer.path: i for i, layer in enumerate(layers)}

    def one_example(other_params, perturbations, example):
        captured = [None] * len(layers)

        def intercept(next_fun, args, kwargs, context):
            position = index.get(context.module.path) if context.method_name == "__call__" else None
            if position is None or not isinstance(context.module, (nn.Dense, nn.Conv)):
                return next_fun(*args, **kwargs)
            captured[position] = args[0]
            # Adding a zero whose gradient we take exposes the cotangent of the layer's output.
            return next_fun(*args, **kwargs) + perturbations[position]

        merged = _with_kernels(other_params, layers, kernels)
        with nn.intercept_methods(intercept):
            loss, aux = objective(merged, example)
        return loss, (aux, captured)

    count = _count(examples)
    zeros = [jnp.zeros((count,) + layer.output_shape, kernels[i].dtype) for i, layer in enumerate(layers)]
    grad_fn = jax.grad(one_example, argnums=(0, 1), has_aux=True)
    (other_grads, cotangents), (aux, inputs) = jax.vmap(grad_fn, in_axes=(None, 0, 0))(others, zeros, examples)
    other_grads = _with_kernels(other_grads, layers, [None] * len(layers))

    squares = _tree_squares(other_grads)
    kernel_sums = []
    for layer, x, delta in zip(layers, inputs, cotangents):
        layer_squares, weighted = _kernel_norms_and_sum(layer, x, delta, layer.module.precision)
        squares = squares + layer_squares
        kernel_sums.append(weighted)
    factors = privacy.clip_factor(jnp.sqrt(squares), clip_value) / divisor

    total = _weighted_sum(factors, other_grads)
    return _with_kernels(total, layers, [weighted(factors) for weighted in kernel_sums]), aux


# ----------------------------------------------------------------------------------------------
# Chunks of examples



def _count(examples: PyTree) -> int:
    return jax.tree_util.tree_leaves(examples)[0].shape[0]


def example_bytes(layers: list[_Layer], example: PyTree) -> int:
    """Scratch one example takes on the fast path: its inputs, cotangents and kernel gradients, one layer's patches.

    Args:
      layers: the fast layers (``fast_layers``).
      example: one example (arrays or shape-dtype structs).

    Returns:
      The bytes: the example's own, each layer's input, output cotangent and kernel gradient in the
      layer's ``param_dtype``, and the largest one layer's im2col patches.

    Example::

        >>> import jax.numpy as jnp
        >>> example_bytes([], jnp.ones((4, 4, 1)))  # no fast layer: the example's 16 floats
        64
    """
    total = sum(np.size(leaf) * jnp.result_type(leaf).itemsize for leaf in jax.tree_util.tree_leaves(example))
    patches_bytes = 0
    for layer in layers:
        positions = int(np.prod(layer.output_shape[:-1]))
        fan_in = int(np.prod(layer.kernel_shape[:-1]))
        features = layer.kernel_shape[-1]
        itemsize = jnp.dtype(layer.module.param_dtype).itemsize
        total += (int(np.prod(layer.input_shape)) + positions * features + fan_in * features) * itemsize
        # Each layer's patches are freed once its kernel gradients are formed.
        patches_bytes = max(patches_bytes, positions * fan_in * itemsize)
    return int(total + patches_bytes)


def auto_examples_per_chunk(count: int, per_example_bytes: int, budget_bytes: Optional[int] = None) -> int:
    """Examples per chunk: the whole batch off CPU; on CPU what fits ``cpu.CLIP_CHUNK_BYTES``
    (at least ``cpu.MIN_EXAMPLES_PER_CHUNK``), in even chunks.

    The chunks run as one ``lax.scan`` (:func:`clipped_mean_gradient`), so their number does not
    grow the program, and a chunk's scratch stays within the budget for any batch.

    Args:
      count: the user's examples.
      per_example_bytes: scratch of one example (``example_bytes``).
      budget_bytes: the bytes a chunk may take; ``None``: the default above.

    Returns:
      Examples per chunk: chunks of equal size, the last possibly shorter.

    Example::

        >>> auto_examples_per_chunk(128, 1, budget_bytes=2**30)  # it all fits: one chunk
        128
        >>> auto_examples_per_chunk(128, 2**20, budget_bytes=2**20)  # cpu.MIN_EXAMPLES_PER_CHUNK at least
        32
        >>> auto_examples_per_chunk(4096, 2**20, budget_bytes=2**20)  # 128 chunks: no cap on their number
        32
    """
    if budget_bytes is None:
        if not cpu.is_cpu():
            return count
        budget_bytes = cpu.CLIP_CHUNK_BYTES
    size = max(cpu.MIN_EXAMPLES_PER_CHUNK, budget_bytes // max(per_example_bytes, 1))
    chunks = chunking.num_chunks(count, size)
    # Even chunks (128 examples in 4 of 32, not 3 of 41 and one of 5): one shape for all but the last.
    return int(chunking.num_chunks(count, chunks))


def chunk_bounds(count: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks of ``size`` examples covering ``count`` (the last may be shorter).

    Args:
      count: the examples.
      size: examples per chunk.

    Returns:
      The bounds, in order.

    Example::

        >>> chunk_bounds(5, 2)
        [(0, 2), (2, 4), (4, 5)]
    """
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def clipped_mean_gradient(
    objective: Objective,
    params: PyTree,
    examples: PyTree,
    clip_value: float,
    fast: bool = True,
    examples_per_chunk: Optional[int] = None,
) -> tuple[PyTree, PyTree]:
    """Mean over examples of each example's gradient clipped to global norm ``clip_value``.

    ``objective(params, example) -> (loss, aux)`` evaluates one example as a batch of one;
    ``examples`` stacks the examples on a leading axis. Returns the mean clipped gradient and the
    stacked ``aux``. Dense and convolution kernels take the fast path described in the module
    docstring (``fast=False`` forces plain ``vmap`` for every parameter). The examples run
    ``examples_per_chunk`` at a time (``None``: ``auto_examples_per_chunk``), the chunks of equal
    size as one ``lax.scan`` (its convolutions rewritten by ``convolutions.canonical`` on CPU) and
    a shorter last one after it; each example's clipping is its own, so chunks change only the
    order of the final sum.

    Args:
      objective: ``objective(params, example) -> (loss, aux)`` of one example.
      params: the parameters differentiated.
      examples: a pytree whose leaves stack the examples on a leading axis.
      clip_value: the bound ``C`` (breaching's rule: ``privacy.clip_factor``).
      fast: whether qualifying dense and convolution kernels take the fast path.
      examples_per_chunk: examples per chunk, at least 1; ``None``: ``auto_examples_per_chunk``.

    Returns:
      ``(grads, aux)``: the mean clipped gradient, in ``params``' structure, and the stacked ``aux``;
      ``semantics.clipped_mean_gradient``'s result up to float rounding.

    Raises:
      ValueError: ``examples_per_chunk`` < 1.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jnp.ones((4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> def objective(p, example):  # one example as a batch of one
        ...     logits = model.apply({"params": p}, example[0][None])
        ...     return fu.losses.softmax_cross_entropy(logits, example[1][None]).mean(), None
        >>> run = jax.jit(clipped_mean_gradient, static_argnums=0, static_argnames="examples_per_chunk")
        >>> whole, _ = run(objective, params, (x, y), 0.1)
        >>> chunked, _ = run(objective, params, (x, y), 0.1, examples_per_chunk=3)
        >>> bool(jnp.allclose(whole["1"]["bias"], chunked["1"]["bias"], atol=1e-7))
        True
    """
    count = _count(examples)
    first = jax.tree_util.tree_map(lambda leaf: leaf[0], examples)
    layers = fast_layers(objective, params, first) if fast else []
    if examples_per_chunk is None:
        examples_per_chunk = auto_examples_per_chunk(count, example_bytes(layers, first))
    if examples_per_chunk < 1:
        raise ValueError(f"examples_per_chunk must be >= 1, got {examples_per_chunk}")

    def clipped_sum(chunk: PyTree) -> tuple[PyTree, PyTree]:
        if layers:
            return _clipped_sum_fast(objective, params, chunk, clip_value, count, layers)
        return _clipped_sum_vmap(objective, params, chunk, clip_value, count)

    bounds = chunk_bounds(count, examples_per_chunk)
    if len(bounds) == 1:
        return clipped_sum(examples)
    return _sum_chunks(clipped_sum, examples, bounds)


def _sum_chunks(clipped_sum: Callable[[PyTree], tuple[PyTree, PyTree]], examples: PyTree,
                bounds: list[tuple[int, int]]) -> tuple[PyTree, PyTree]:
    """The chunks' ``clipped_sum`` added in order and their ``aux`` concatenated.

    The chunks of equal size run as one ``lax.scan``, so the program holds one chunk's computation
    however many chunks there are (unrolled, each chunk was traced and compiled again); a shorter
    last chunk runs once after it. The running sum starts at zero, so the total is
    ``((0 + s_0) + s_1) + ...``, the unrolled chunks' order: on the fast path the same bits (lenet_zhu,
    resnet20), where per-example convolution kernel gradients (``vmap``) compile differently in a
    loop body, the same to float rounding (3e-7 relative on lenet_zhu).
    """
    size = bounds[0][1] - bounds[0][0]
    full = sum(stop - start == size for start, stop in bounds)
    split = size * full

    def chunk_at(start: Array) -> PyTree:
        # Sliced in the body: slicing the equal chunks off beforehand copied the examples (12 MiB of
        # lenet_zhu's 1,024) whenever a shorter chunk was left.
        return jax.tree_util.tree_map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, start, size), examples)

    def step(total: PyTree, start: Array) -> tuple[PyTree, PyTree]:
        part, aux = clipped_sum(chunk_at(start))
        return jax.tree_util.tree_map(jnp.add, total, part), aux

    starts = jnp.arange(full) * size
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(lambda: clipped_sum(chunk_at(starts[0])))[0])
    # XLA:CPU runs a loop body's autodiff convolutions in a slow generic layout (convolutions.py).
    total, auxes = jax.lax.scan(convolutions.canonical(step) if cpu.is_cpu() else step, zeros, starts)
    auxes = jax.tree_util.tree_map(lambda leaf: leaf.reshape((split,) + leaf.shape[2:]), auxes)
    if split == _count(examples):
        return total, auxes
    part, aux = clipped_sum(jax.tree_util.tree_map(lambda leaf: leaf[split:], examples))
    return (jax.tree_util.tree_map(jnp.add, total, part),
            jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), auxes, aux))

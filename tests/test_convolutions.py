"""``fedjax_users.convolutions``: every convolution rewritten to XLA:CPU's canonical form computes the same.

The convolutions under test are those autodiff makes of a small strided convolutional net when an
attack differentiates its kernel gradient with respect to the input (as ``fedjax_users.attacks``
does through a user), alone and under ``jax.vmap``; the rewritten program must equal the plain one
to float rounding, including inside ``scan``, ``while_loop`` and ``cond``, and XLA:CPU must then
compile only canonical convolutions inside a loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_users import convolutions


def _net(params, x):
    """Two strided 'SAME' convolutions (NHWC, HWIO) and a dense layer, lenet_zhu's shape in small."""
    for kernel in params["convs"]:
        x = jax.nn.sigmoid(lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return x.reshape(x.shape[0], -1) @ params["dense"]


def _gradient_match(params, target, x):
    """An attack's objective: the distance of the kernel gradient at ``x`` to ``target``."""
    grads = jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(_net(p, x))[:, 1]))(params)
    return sum(jnp.sum((g - t) ** 2) for g, t in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(target)))


@pytest.fixture(scope="module")
def problem():
    keys = jax.random.split(jax.random.key(0), 5)
    params = {"convs": [0.3 * jax.random.normal(keys[0], (5, 5, 3, 4)), 0.3 * jax.random.normal(keys[1], (5, 5, 4, 4))],
              "dense": 0.3 * jax.random.normal(keys[2], (4 * 4 * 4, 3))}
    x = jax.random.uniform(keys[3], (1, 16, 16, 3))
    target = jax.tree_util.tree_map(lambda p: 0.1 * jnp.ones_like(p), params)
    return params, target, x, jax.random.uniform(keys[4], (3, 1, 16, 16, 3))


def _conv_equations(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                if hasattr(sub, "jaxpr"):
                    yield from _conv_equations(sub.jaxpr)


def test_each_convolution_of_a_second_order_gradient_equals_laxs(problem):
    params, target, x, xs = problem
    second = jax.grad(_gradient_match, argnums=2)
    batched = jax.vmap(second, in_axes=(None, None, 0))
    equations = [*_conv_equations(jax.make_jaxpr(second)(params, target, x).jaxpr),
                 *_conv_equations(jax.make_jaxpr(batched)(params, target, xs).jaxpr)]
    rng = np.random.default_rng(0)
    operands = [tuple(rng.standard_normal(v.aval.shape).astype(np.float32) for v in eqn.invars) for eqn in equations]
    # Every convolution in one program a side: the same comparisons, two compiles instead of one per
    # convolution and operand shape (which made this the default tier's slowest test).
    expected_all = jax.jit(lambda ops: [lax.conv_general_dilated_p.bind(a, b, **e.params)
                                        for (a, b), e in zip(ops, equations)])(operands)
    got_all = jax.jit(lambda ops: [convolutions.convolution(a, b, **e.params) for (a, b), e in zip(ops, equations)])(operands)
    swapped = grouped = 0
    for eqn, (lhs, rhs), expected, got in zip(equations, operands, expected_all, got_all):
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * float(jnp.abs(expected).max()))
        n = lhs.ndim - 2
        spec = eqn.params["dimension_numbers"]
        taps = np.prod([rhs.shape[a] for a in spec.rhs_spec[2:]])
        swapped += bool(taps > np.prod([lhs.shape[a] for a in spec.lhs_spec[2:]]) and eqn.params["window_strides"] == (1,) * n)
        grouped += eqn.params["feature_group_count"] > 1 or eqn.params["batch_group_count"] > 1
    # The forms the rewrite treats apart were among them: operands swapped, groups split.
    assert swapped >= 2 and grouped >= 2, (swapped, grouped)


def _numpy_convolution(x, w, strides, padding, lhs_dilation, rhs_dilation):
    """The convolution of NHWC ``x`` with HWIO ``w`` by its definition, in float64 (padding may be negative)."""
    dilated = np.zeros((x.shape[0], *[(s - 1) * d + 1 for s, d in zip(x.shape[1:3], lhs_dilation)], x.shape[3]))
    dilated[:, :: lhs_dilation[0], :: lhs_dilation[1]] = x
    for axis, (lo, hi) in enumerate(padding, start=1):
        dilated = np.take(dilated, range(max(-lo, 0), dilated.shape[axis] - max(-hi, 0)), axis=axis)
        dilated = np.pad(dilated, [(max(lo, 0), max(hi, 0)) if a == axis else (0, 0) for a in range(4)])
    span = [(k - 1) * d + 1 for k, d in zip(w.shape[:2], rhs_dilation)]
    out = np.zeros((x.shape[0], *[(n - k) // s + 1 for n, k, s in zip(dilated.shape[1:3], span, strides)], w.shape[3]))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            window = dilated[:, i * strides[0] : i * strides[0] + span[0] : rhs_dilation[0],
                             j * strides[1] : j * strides[1] + span[1] : rhs_dilation[1]]
            out[:, i, j] = np.einsum("nhwc,hwco->no", window, w)
    return out


@pytest.mark.parametrize("size, taps, strides, padding, lhs_dilation, rhs_dilation", [
    ((8, 8), (5, 5), (2, 2), ((2, 2), (2, 2)), (1, 1), (1, 1)),  # a strided layer
    ((5, 5), (8, 8), (1, 1), ((12, 13), (12, 13)), (1, 1), (2, 2)),  # swapped: more taps than positions
    ((4, 4), (5, 5), (1, 1), ((3, 2), (3, 2)), (2, 2), (1, 1)),  # swapped, the input dilated
    ((3, 4), (6, 5), (2, 1), ((4, 3), (2, 5)), (1, 2), (1, 1)),  # swapped, strided
    ((16, 16), (8, 8), (1, 1), ((2, 1), (2, 1)), (1, 1), (2, 2)),  # a kernel gradient: by gathered windows
    ((7, 9), (4, 5), (2, 1), ((1, -1), (0, 2)), (2, 1), (1, 2)),  # gathered windows, strided and dilated
    ((8, 8), (5, 5), (1, 1), ((2, 3), (2, 3)), (2, 2), (1, 1)),  # a strided layer's input gradient
    ((7, 6), (4, 3), (1, 1), ((1, 2), (3, -1)), (3, 2), (1, 1)),  # an input gradient, odd sizes
    ((3, 3), (2, 2), (1, 1), ((0, 0), (1, 1)), (3, 3), (1, 1)),  # an input gradient, a dilation wider than the kernel
    ((8, 8), (2, 3), (1, 1), ((-6, 0), (-5, 1)), (1, 1), (1, 1)),  # negative padding: XLA:CPU gets it wrong
    ((6, 7), (3, 2), (1, 2), ((-2, 3), (1, -1)), (2, 1), (1, 2)),  # negative padding, dilated
])
def test_a_convolution_in_any_layout_equals_its_definition(size, taps, strides, padding, lhs_dilation, rhs_dilation):
    rng = np.random.default_rng(sum(size) + sum(taps))
    x, w = rng.normal(size=(2, *size, 3)).astype(np.float32), rng.normal(size=(*taps, 3, 4)).astype(np.float32)
    expected = _numpy_convolution(x, w, strides, padding, lhs_dilation, rhs_dilation)
    # The operands in a layout of autodiff's kind: input as feature, height, width, batch; kernel as OIHW.
    params = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=lax.ConvDimensionNumbers((3, 0, 1, 2), (0, 1, 2, 3), (2, 3, 0, 1)),
                  feature_group_count=1, batch_group_count=1, precision=lax.Precision.HIGHEST,
                  preferred_element_type=None, out_sharding=None)
    got = jax.jit(lambda a, b: convolutions.convolution(a, b, **params))(np.transpose(x, (3, 1, 2, 0)),
                                                                         np.transpose(w, (3, 2, 0, 1)))
    np.testing.assert_allclose(np.transpose(got, (2, 0, 1, 3)), expected, rtol=1e-4, atol=1e-4)


def test_canonical_equals_the_plain_function_in_loops_and_branches(problem):
    params, target, x, _ = problem
    step = jax.grad(_gradient_match, argnums=2)

    def descend(x):
        def body(x, _):
            return x - 0.1 * step(params, target, x), None
        x = lax.scan(body, x, None, length=3)[0]
        x = lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] - 0.1 * step(params, target, c[1])), (0, x))[1]
        return lax.cond(jnp.sum(x) > 0, lambda x: step(params, target, x), lambda x: -x, x)

    plain, rewritten = jax.jit(descend)(x), jax.jit(convolutions.canonical(descend))(x)
    np.testing.assert_allclose(rewritten, plain, rtol=1e-5, atol=1e-6 * float(jnp.abs(plain).max()))
    assert not np.array_equal(plain, jax.jit(descend)(x + 0.01))  # the check sees a change of x


def _loop_convolutions(fun, params, target, x):
    """The dimension labels of the convolutions XLA compiles for a scan of steps along ``fun``."""
    program = jax.jit(lambda x: lax.scan(lambda x, _: (x - 0.1 * fun(params, target, x), None), x, None, length=2)[0])
    text = program.lower(x).compile().as_text()
    lines = [line for line in text.splitlines() if " convolution(" in line]
    return ["rhs_reversal" if "rhs_reversal" in line else line.split("dim_labels=")[1].split(",")[0] for line in lines]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's canonical form")
def test_inside_a_loop_xla_cpu_compiles_only_canonical_convolutions(problem):
    params, target, x, xs = problem
    second = jax.grad(_gradient_match, argnums=2)
    # Left to XLA, the kernel gradients' convolutions keep autodiff's layouts inside the loop.
    assert set(_loop_convolutions(second, params, target, x)) != {"b01f_01io->b01f"}
    for fun, x_ in ((second, x), (jax.vmap(second, in_axes=(None, None, 0)), xs)):
        labels = _loop_convolutions(convolutions.canonical(fun), params, target, x_)
        assert labels and set(labels) == {"b01f_01io->b01f"}, labels

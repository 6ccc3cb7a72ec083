"""``patches``: convolutions as im2col matmuls give the convolution, also under ``vmap`` and ``grad``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_users import models

from fedjax_users.strategy import patches

CONVS = {
    "strided-dilated-same": (nn.Conv(3, (3, 2), strides=(2, 1), kernel_dilation=(1, 2), padding="SAME"), (2, 7, 6, 4)),
    "explicit-asymmetric": (nn.Conv(5, (4, 4), strides=2, padding=[(2, 1), (0, 3)], use_bias=False), (3, 9, 8, 2)),
    "valid-1d": (nn.Conv(4, (3,), padding="VALID"), (2, 10, 3)),
    "extra-leading-axes": (nn.Conv(2, (3, 3), padding=1), (2, 3, 6, 6, 2)),
    "unbatched": (nn.Conv(2, (3, 3), padding="SAME"), (5, 5, 3)),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_conv_as_matmul_is_the_convolution(case):
    module, shape = CONVS[case]
    x = jax.random.normal(jax.random.key(0), shape)
    params = module.init(jax.random.key(1), x)["params"]
    want = module.apply({"params": params}, x)
    got = patches.conv_as_matmul(module, x, params["kernel"], params.get("bias"))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with patches.convolutions_as_matmuls():
        np.testing.assert_allclose(module.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_im2col_orders_patches_like_the_kernel():
    module = nn.Conv(3, (3, 2), strides=(2, 1), kernel_dilation=(1, 2), padding="SAME")
    x = jax.random.normal(jax.random.key(9), (2, 7, 6, 4))
    params = module.init(jax.random.key(10), x)["params"]
    cols = patches.im2col(module, x)
    assert cols.shape == (2, 4, 6, 3 * 2 * 4)
    via_patches = cols @ params["kernel"].reshape(-1, 3) + params["bias"]
    np.testing.assert_allclose(via_patches, module.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


class _Unsupported(nn.Module):
    """Layers the interceptor must leave alone: grouped, circular-padded, input-dilated."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), feature_group_count=2, padding="SAME", name="grouped")(x)
        x = nn.Conv(4, (3, 3), padding="CIRCULAR", name="circular")(x)
        return nn.Conv(4, (3, 3), input_dilation=2, padding=1, name="dilated_input")(x)


def test_unsupported_layers_run_as_convolutions():
    model = _Unsupported()
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 2))
    variables = model.init(jax.random.key(3), x)
    with patches.convolutions_as_matmuls():
        jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(variables)
        got = model.apply(variables, x)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 3
    np.testing.assert_array_equal(got, model.apply(variables, x))


def _model_and_side(name):
    # A ResNet of one block a stage at 8x8 has every kind of convolution resnet20 has (3x3, strided,
    # 1x1 shortcuts, BatchNorm between) at a fraction of its compile time; resnet20 itself runs in
    # the slower tier (make test-full).
    if name == "small-resnet":
        return models.resnets.ResNet(num_classes=10, stage_sizes=(1, 1), width=4), 8
    return models.get(name), 32


@pytest.mark.parametrize("name", ["lenet_zhu", "small-resnet", pytest.param("resnet20", marks=pytest.mark.slow)])
def test_per_user_gradients_match_under_vmap(name):
    # The situation the module exists for: users with their own kernels, vmapped, differentiated.
    model, side = _model_and_side(name)
    x = jax.random.normal(jax.random.key(4), (3, 2, side, side, 3))
    y = jnp.array([[1, 2], [3, 4], [5, 6]])
    variables = model.init(jax.random.key(5), x[0])
    users_params = jax.vmap(lambda s: jax.tree_util.tree_map(lambda p: p * (1 + 0.1 * s), variables["params"]))(
        jnp.arange(3.0)
    )
    stats = {"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {}

    def loss(params, xb, yb):
        logits = model.apply({"params": params, **stats}, xb, train=False)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    def per_user(as_matmuls):
        def grad(params, xb, yb):
            if as_matmuls:
                with patches.convolutions_as_matmuls():
                    return jax.grad(loss)(params, xb, yb)
            return jax.grad(loss)(params, xb, yb)

        fn = jax.jit(jax.vmap(grad))
        return fn(users_params, x, y), fn.lower(users_params, x, y).as_text()

    want, plain_text = per_user(False)
    got, matmul_text = per_user(True)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(want))
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-5 * scale), got, want)
    # Per-user kernels make vmap emit grouped convolutions; the matmul form has no convolution left.
    assert "feature_group_count = 3" in plain_text
    assert "convolution" not in matmul_text


def test_kernel_gradient_layout_keeps_both_autodiff_modes():
    # The kernel goes through a transpose behind an optimization barrier (for the layout of its
    # gradient): forward mode and second derivatives must still see the plain convolution.
    module, shape = CONVS["explicit-asymmetric"]
    x = jax.random.normal(jax.random.key(6), shape)
    kernel = module.init(jax.random.key(7), x)["params"]["kernel"]
    dk = jax.random.normal(jax.random.key(8), kernel.shape)

    def conv(k):
        return module.apply({"params": {"kernel": k}}, x)

    def as_matmul(k):
        return patches.conv_as_matmul(module, x, k, None)

    _, want = jax.jvp(conv, (kernel,), (dk,))
    _, got = jax.jvp(as_matmul, (kernel,), (dk,))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    second = lambda f: jax.grad(lambda k: jnp.sum(jax.grad(lambda k2: jnp.sum(jnp.sin(f(k2))))(k) ** 2))  # noqa: E731
    np.testing.assert_allclose(second(as_matmul)(kernel), second(conv)(kernel), rtol=1e-4, atol=1e-4)
    text = jax.jit(jax.grad(lambda k: jnp.sum(as_matmul(k)))).lower(kernel).as_text()
    assert "optimization_barrier" in text

"""``dtype`` / ``param_dtype`` reach every layer: float64 models need no casting of their variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_users as fu
from fedjax_users import models
from fedjax_users.batchnorm import BatchNorm

VISION_SHAPES = {"linear": 32, "MLP": 32, "lenet_zhu": 32, "ConvNetSmall": 8, "ConvNet": 32, "cnn6": 32,
                 "resnet18": 16, "resnet20": 8}
TEXT_MODELS = ("linear", "transformer3", "transformer3t")


def variable_shapes(model, example: jax.ShapeDtypeStruct):
    """``model.init``'s variables as shapes and dtypes (nothing computed)."""
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example)


def float_dtypes(tree) -> set:
    """The dtypes of ``tree``'s floating-point leaves."""
    return {jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def vision_example(name: str, dtype) -> jax.ShapeDtypeStruct:
    side = VISION_SHAPES[name]
    return jax.ShapeDtypeStruct((1, side, side, 3), dtype)


@pytest.mark.parametrize("name", sorted(VISION_SHAPES))
def test_float64_vision_models_have_float64_variables_and_logits(name):
    with jax.enable_x64(True):
        model = models.get(name, param_dtype=jnp.float64)
        example = vision_example(name, jnp.float64)
        variables = variable_shapes(model, example)
        logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, example)
    assert float_dtypes(variables) == {jnp.dtype(jnp.float64)}
    assert logits.dtype == jnp.float64


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_float64_text_models_have_float64_variables_and_logits(name):
    with jax.enable_x64(True):
        model = models.get(name, num_classes=50, modality="text", param_dtype=jnp.float64)
        example = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        variables = variable_shapes(model, example)
        logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, example)
    assert float_dtypes(variables) == {jnp.dtype(jnp.float64)}
    assert logits.dtype == jnp.float64


def test_default_models_are_unchanged():
    # The defaults are what parity was measured on: no dtype set anywhere, Flax's float32 kernels
    # even under x64 (so float64 inputs alone give a mixed model; param_dtype is the way out).
    assert models.get("resnet20") == models.resnets.ResNet(num_classes=10, num_channels=3, stage_sizes=(3, 3, 3), width=16)
    assert models.get("transformer3", num_classes=50, modality="text") == models.text.TransformerModel(50)
    with jax.enable_x64(True):
        variables = variable_shapes(models.get("resnet20"), vision_example("resnet20", jnp.float64))
    assert variables["params"]["stem"]["0"]["kernel"].dtype == jnp.float32
    assert variables["params"]["stem"]["1"]["scale"].dtype == jnp.float64  # BatchNorm follows its inputs


@pytest.mark.parametrize("name,modality", [("resnet20", "vision"), ("transformer3", "text")])
def test_dtype_sets_the_computation_dtype(name, modality):
    model = models.get(name, num_classes=10, modality=modality, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    example = vision_example(name, jnp.float32) if modality == "vision" else jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = variable_shapes(model, example)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, example)
    assert logits.dtype == jnp.bfloat16
    assert float_dtypes(variables) == {jnp.dtype(jnp.float32)}


def test_dtype_alone_keeps_float32_kernels_and_batchnorm_follows_its_inputs():
    model = models.get("resnet20", dtype=jnp.bfloat16)
    variables = variable_shapes(model, vision_example("resnet20", jnp.float32))
    assert variables["params"]["stem"]["0"]["kernel"].dtype == jnp.float32  # Flax's default param_dtype
    assert variables["params"]["stem"]["1"]["scale"].dtype == jnp.bfloat16  # after a bfloat16 convolution


def test_batchnorm_dtypes():
    x = jnp.ones((4, 3, 3, 2), jnp.float32)
    with jax.enable_x64(True):
        variables = BatchNorm(param_dtype=jnp.float64).init(jax.random.key(0), x, True)
        out, updates = BatchNorm(param_dtype=jnp.float64, dtype=jnp.float32).apply(
            variables, x, True, mutable=["batch_stats"]
        )
    assert float_dtypes(variables) == {jnp.dtype(jnp.float64)}
    assert float_dtypes(updates) == {jnp.dtype(jnp.float64)}  # the running statistics keep their dtype
    assert out.dtype == jnp.float32
    # Without either dtype the layer follows its inputs, as it always did.
    assert float_dtypes(BatchNorm().init(jax.random.key(0), x, True)) == {jnp.dtype(jnp.float32)}


def small_resnet(**dtypes):
    """A one-block ResNet: BatchNorm in a few milliseconds of compile."""
    return models.resnets.ResNet(stage_sizes=(1,), width=4, **dtypes)


BUILDERS = {
    "lenet_zhu": lambda **dtypes: models.get("lenet_zhu", **dtypes),
    "resnet": small_resnet,
}


@pytest.mark.parametrize("name,side,clip", [("lenet_zhu", 32, 0.0), ("lenet_zhu", 32, 1.0), ("resnet", 8, 1.0)])
def test_float64_model_gives_float64_gradients_from_local_gradient(name, side, clip):
    cfg = fu.UserConfig.from_dict(dict(
        user_type="local_gradient", num_data_points=3, provide_buffers=True,
        local_diff_privacy=dict(per_example_clipping=clip),
    ))
    rng = np.random.default_rng(0)
    inputs, labels = rng.standard_normal((3, side, side, 3)), np.array([0, 1, 2], np.int32)
    with jax.enable_x64(True):
        model = BUILDERS[name](param_dtype=jnp.float64)
        variables = jax.jit(model.init)(jax.random.key(1), jnp.asarray(inputs[:1]))
        # No server buffers: train mode, the user's own float64 statistics.
        payload = fu.ServerPayload(params=variables["params"], batch_stats=None)
        shared, _, state = fu.local_gradient(model, payload, fu.UserData(inputs=jnp.asarray(inputs), labels=labels),
                                             cfg, jax.random.key(2))
        assert float_dtypes(variables) == {jnp.dtype(jnp.float64)}
        assert float_dtypes(shared.gradients) == {jnp.dtype(jnp.float64)}
        assert not state or float_dtypes(state) == {jnp.dtype(jnp.float64)}
        # The same function as the float32 model: its gradient agrees to float32 resolution.
        model32 = BUILDERS[name]()
        params32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), variables["params"])
        shared32, _, _ = fu.local_gradient(model32, fu.ServerPayload(params=params32, batch_stats=None),
                                           fu.UserData(inputs=jnp.asarray(inputs, jnp.float32), labels=labels),
                                           cfg, jax.random.key(2))
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(shared.gradients))
    for got, want in zip(jax.tree_util.tree_leaves(shared32.gradients), jax.tree_util.tree_leaves(shared.gradients)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)

"""``param_dtype=float64`` makes the zoo's VGG, DenseNet, NFNet and Sequential ConvNets float64 throughout."""

import jax
import jax.numpy as jnp
import pytest

from fedjax_users import models

from test_dtypes import float_dtypes, variable_shapes

# name -> (table, channels, side): shapes each model takes, traced only (nothing computed).
SHAPES = {
    "VGG11": ("vision", 3, 32), "DenseNet121": ("vision", 3, 16), "nfnet": ("vision", 3, 16),
    "convnet-trivial": ("vision", 3, 8), "convnet_beyond": ("vision", 1, 28),
    "vgg11_bn": ("imagenet", 3, 32), "densenet121": ("imagenet", 3, 32),
}


# Tracing DenseNet's ~120 layers or NFNet's 60 convolutions alone takes tens of seconds here.
SLOW = ("DenseNet121", "densenet121", "nfnet")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in SLOW else n for n in SHAPES])
def test_float64_models_have_float64_variables_and_outputs(name):
    table, channels, side = SHAPES[name]
    with jax.enable_x64(True):
        model = models.get(name, num_channels=channels, modality=table, param_dtype=jnp.float64)
        example = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float64)
        variables = variable_shapes(model, example)
        out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, example)
    assert float_dtypes(variables) == {jnp.dtype(jnp.float64)}
    assert out.dtype == jnp.float64

"""``interop.order``: torch's parameter and buffer order found from the Flax model alone, against
``named_parameters()`` / ``named_buffers()`` of breaching's own models.

Most of the zoo creates its variables in torch's registration order; nfnet's block, the
transformers' model and encoder layer, and BERT's embeddings do not, and say so with
``torch_children`` (the tests below show each declaration is needed). A JAX-sorted tree is never
torch's order, which is why the order is computed at all.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

transformers = pytest.importorskip("transformers")  # before parity.reference stubs torchvision
torch = pytest.importorskip("torch")
reference = pytest.importorskip("parity.reference")

from fedjax_users import models  # noqa: E402
from fedjax_users.interop import order  # noqa: E402
from fedjax_users.models import nfnet, text  # noqa: E402


def _inputs(name: str, modality: str):
    if modality == "text":
        return jnp.zeros((1, 8), jnp.int32)
    size = 64 if modality == "imagenet" else 28 if name == "convnet_beyond" else 32  # convnet_beyond: 25-28 only
    return jnp.zeros((1, size, size, 3))


def _torch_model(name: str, modality: str) -> torch.nn.Module:
    if modality == "text":
        return reference.text_model(name, 50)
    if modality == "imagenet":
        return reference.vision_model(name, 10, (3, 64, 64), data_name="ImageNet")
    size = _inputs(name, modality).shape[1]
    return reference.vision_model(name, 10, (3, size, size))


def _flax_model(name: str, modality: str) -> nn.Module:
    return models.get(name, num_classes=50 if modality == "text" else 10, modality=modality)


def expected(flax_model: nn.Module, torch_model: torch.nn.Module, inputs) -> tuple[order.TorchOrder, dict]:
    """torch's own order (its names paired with the Flax tree), and the Flax variables' shapes."""
    variables = jax.eval_shape(flax_model.init, jax.random.key(0), inputs)
    return order.order_from_torch_names([n for n, _ in torch_model.named_parameters()],
                                        [n for n, _ in torch_model.named_buffers()],
                                        variables["params"], variables.get("batch_stats")), variables


# lenet_zhu and cnn6: plain; ConvNet and resnet20: BatchNorm buffers; nfnet: a block's own
# skip_gain and its shortcut registered late; LSTM: a tied weight; the transformers: declared orders
# and (transformer3f) a sinusoidal buffer.
REPRESENTATIVE = [("lenet_zhu", "vision"), ("cnn6", "vision"), ("ConvNet", "vision"), ("resnet20", "vision"),
                  ("nfnet", "vision"), ("LSTM", "text"), ("transformer3", "text"), ("transformer3f", "text")]


@pytest.mark.parametrize("name, modality", REPRESENTATIVE)
def test_order_from_the_flax_model_is_torchs(name, modality):
    flax_model, inputs = _flax_model(name, modality), _inputs(name, modality)
    want, variables = expected(flax_model, _torch_model(name, modality), inputs)
    assert order.torch_order(flax_model, inputs) == want
    # The order a JAX tree has after any transformation (keys sorted) is not torch's.
    assert list(traverse_util.flatten_dict(variables["params"])) != list(want.params)


@pytest.mark.parametrize("cls, name", [(nfnet.NFBlock, "nfnet"), (text.TransformerModel, "transformer3"),
                                       (text.TransformerEncoderLayer, "transformer3")])
def test_each_declared_order_is_needed(monkeypatch, cls, name):
    modality = "text" if name.startswith("transformer") else "vision"
    flax_model, inputs = _flax_model(name, modality), _inputs(name, modality)
    want, _ = expected(flax_model, _torch_model(name, modality), inputs)
    monkeypatch.delattr(cls, order.TORCH_CHILDREN)
    assert order.torch_order(flax_model, inputs) != want


def test_own_variables_first_then_declared_children_then_the_rest():
    class Child(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="inner")(x)

    class Parent(nn.Module):
        torch_children = ("a",)

        @nn.compact
        def __call__(self, x):
            x = Child(name="c")(x) + Child(name="b")(x) + Child(name="a")(x)
            return x * self.param("gain", nn.initializers.ones, ())

    found = order.torch_order(Parent(), jnp.zeros((1, 3)))
    assert found.torch_names("params") == ["gain", "a.inner.weight", "a.inner.bias", "c.inner.weight",
                                           "c.inner.bias", "b.inner.weight", "b.inner.bias"]
    assert found.batch_stats == ()


def test_torch_names_that_do_not_pair_are_named():
    variables = jax.eval_shape(models.get("lenet_zhu").init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="'head.weight' has no Flax counterpart"):
        order.order_from_torch_names(["head.weight"], [], variables["params"])
    with pytest.raises(ValueError, match="collection must be"):
        order.TorchOrder(params=()).paths("buffers")


@pytest.mark.slow
@pytest.mark.parametrize("name, task", [("gpt2", "causal-lm"), ("bert-base-uncased", "masked-lm"),
                                        ("bert-base-uncased", "classification")])
def test_order_of_the_hugging_face_models_is_torchs(name, task):
    reference.use_tiny_hf_cache()
    flax_model = models.get(name, num_classes=100, modality="text", task=task)
    inputs = jnp.zeros((1, 8), jnp.int32)
    want, _ = expected(flax_model, reference.hf_text_model(name, 100, task), inputs)
    assert order.torch_order(flax_model, inputs) == want


def _zoo() -> list[tuple[str, str]]:
    vision = [(n, "vision") for n in models.names("vision") if not n.endswith(("-4", "-8", "-10"))]
    return vision + [(n, "imagenet") for n in models.names("imagenet")] + [(n, "text") for n in models.names("text")]


@pytest.mark.heavy
@pytest.mark.parametrize("name, modality", _zoo())
def test_order_of_every_zoo_model_is_torchs(name, modality):
    flax_model, inputs = _flax_model(name, modality), _inputs(name, modality)
    want, _ = expected(flax_model, _torch_model(name, modality), inputs)
    assert order.torch_order(flax_model, inputs) == want

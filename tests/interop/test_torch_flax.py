"""torch <-> Flax conversion: pairing by name, layouts, dtypes, round trips and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedjax_users import interop, models
from fedjax_users.types import LocalHyperparams, Metadata, ServerPayload, SharedData
from parity import reference

SHAPE = (3, 32, 32)


def torch_model(name: str, seed: int = 0, num_classes: int = 10) -> torch.nn.Module:
    """breaching's model with random weights and non-default buffers."""
    torch.manual_seed(seed)
    model = reference.vision_model(name, num_classes, SHAPE)
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.copy_(torch.randint(1, 5, buffer.shape) if not buffer.is_floating_point()
                         else torch.rand(buffer.shape) + 0.5)
    return model


def template(name: str, num_classes: int = 10):
    """The Flax variables' structure and shapes (abstract: nothing is computed)."""
    flax_model = models.get(name, num_classes=num_classes)
    return jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def assert_same_tensors(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and torch.equal(a, e)


@pytest.mark.parametrize("name", ["lenet_zhu", "ConvNet", "resnet20"])
def test_torch_to_flax_to_torch_is_identity(name):
    source = torch_model(name, seed=0)
    variables = interop.variables_from_torch(source, template(name))
    target = torch_model(name, seed=1)
    interop.variables_to_torch(variables, target)
    expected, actual = source.state_dict(), target.state_dict()
    assert list(actual) == list(expected)
    assert_same_tensors(list(actual.values()), list(expected.values()))


def test_layouts_and_dtypes_follow_the_convention():
    model = torch_model("resnet20")
    variables = interop.variables_from_torch(model, template("resnet20"))
    params, stats = variables["params"], variables["batch_stats"]
    conv = model.model.layers[1][0].downsample[0].weight
    np.testing.assert_array_equal(
        params["layers"]["1"]["0"]["downsample"]["0"]["kernel"], conv.detach().permute(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(params["linear"]["kernel"], model.model.linear.weight.detach().T)
    np.testing.assert_array_equal(params["stem"]["1"]["scale"], model.model.stem[1].weight.detach())
    np.testing.assert_array_equal(stats["stem"]["1"]["var"], model.model.stem[1].running_var)
    tracked = stats["stem"]["1"]["num_batches_tracked"]
    assert tracked.dtype == jnp.int32
    assert int(tracked) == int(model.model.stem[1].num_batches_tracked)
    back = interop.buffers_to_torch_list(stats, model)
    assert back[2].dtype == torch.int64  # torch's dtype again


def test_unwrapped_torch_model_maps_to_the_same_variables():
    wrapped = torch_model("lenet_zhu")
    flax_template = template("lenet_zhu")
    from_wrapped = interop.variables_from_torch(wrapped, flax_template)
    from_bare = interop.variables_from_torch(wrapped.model, flax_template)  # names 'body.0.weight'
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_wrapped, from_bare)


def test_container_prefix_is_kept_when_flax_mirrors_it():
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(3, 2)

    outer = Outer()
    flax_template = {"params": {"model": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}}
    variables = interop.variables_from_torch(outer, flax_template)
    kernel = variables["params"]["model"]["kernel"]
    np.testing.assert_array_equal(kernel, outer.model.weight.detach().T)
    assert "batch_stats" not in variables


def test_tied_weights_are_one_flax_parameter():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Embedding(7, 4)
            self.decoder = torch.nn.Linear(4, 7)
            self.decoder.weight = self.encoder.weight

    tied = Tied()
    flax_template = {
        "params": {"encoder": {"embedding": jnp.zeros((7, 4))}, "decoder": {"bias": jnp.zeros(7)}}
    }
    variables = interop.variables_from_torch(tied, flax_template)
    embedding = variables["params"]["encoder"]["embedding"]
    np.testing.assert_array_equal(embedding, tied.encoder.weight.detach())
    grads = [torch.randn(7, 4), torch.randn(7)]
    tree = interop.grads_from_torch_list(grads, tied, flax_template)
    assert_same_tensors(interop.grads_to_torch_list(tree, tied), grads)


def test_payload_round_trip_with_and_without_buffers():
    model = torch_model("ConvNet")
    parameters, buffers = list(model.parameters()), list(model.buffers())
    payload = interop.payload_from_torch(parameters, buffers, model, template("ConvNet"))
    assert isinstance(payload, ServerPayload)
    back = interop.payload_to_torch(payload, model)
    assert_same_tensors(back["parameters"], [p.detach() for p in parameters])
    assert_same_tensors(back["buffers"], buffers)

    no_buffers = interop.payload_from_torch(parameters, None, model, payload)  # payload as template
    assert no_buffers.batch_stats is None
    assert interop.payload_to_torch(no_buffers, model)["buffers"] is None


def test_gradient_lists_round_trip_in_parameter_order():
    model = torch_model("resnet20")
    grads = [torch.randn(p.shape) for p in model.parameters()]
    tree = interop.grads_from_torch_list(grads, model, template("resnet20"))
    np.testing.assert_array_equal(tree["stem"]["0"]["kernel"], grads[0].permute(2, 3, 1, 0))
    assert_same_tensors(interop.grads_to_torch_list(tree, model), grads)


def test_float_dtypes_are_float32_unless_float64():
    model = torch_model("lenet_zhu").half()
    variables = interop.variables_from_torch(model, template("lenet_zhu"))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {np.dtype("float32")}
    with jax.enable_x64(True):
        double = interop.variables_from_torch(model.double(), template("lenet_zhu"))
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(double)} == {np.dtype("float64")}
    single = torch_model("lenet_zhu")
    interop.variables_to_torch(double, single)  # cast to the torch model's dtype
    assert {p.dtype for p in single.parameters()} == {torch.float32}


def single_step_dict(model):
    return dict(
        gradients=[torch.randn(p.shape) for p in model.parameters()],
        buffers=None,
        metadata=dict(num_data_points=2, labels=torch.tensor([1, 7]), local_hyperparams=None),
    )


def multi_step_dict(model):
    return dict(
        gradients=[torch.randn(p.shape) for p in model.parameters()],
        buffers=[b.clone() for b in model.buffers()],
        metadata=dict(
            num_data_points=4,
            labels=torch.tensor([3, 0, 3, 1]),
            local_hyperparams=dict(
                lr=1e-3,
                steps=2,
                data_per_step=2,
                labels=[torch.tensor([0, 3]), torch.tensor([1, 3])],
            ),
            data_key="inputs",
        ),
    )


def aggregate_dict(model):
    return dict(
        gradients=[torch.randn(p.shape) for p in model.parameters()],
        buffers=[b.clone() for b in model.buffers()],
        metadata=dict(
            num_data_points=8, labels=torch.arange(8), num_users=2, local_hyperparams=None
        ),
    )


def assert_same_structure(actual, expected) -> None:
    """Nested dicts/lists of tensors and plain values are equal, key for key."""
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected)
        for key in expected:
            assert_same_structure(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_structure(a, e)
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    else:
        assert actual == expected


@pytest.mark.parametrize("make", [single_step_dict, multi_step_dict, aggregate_dict])
def test_shared_data_round_trip(make):
    model = torch_model("resnet20")
    shared = make(model)
    ours = interop.shared_data_from_torch(shared, model, template("resnet20"))
    assert isinstance(ours, SharedData) and isinstance(ours.metadata, Metadata)
    assert ours.metadata.labels.dtype == jnp.int32
    assert (ours.batch_stats is None) == (shared["buffers"] is None)
    assert_same_structure(interop.shared_data_to_torch(ours, model), shared)


def test_shared_data_metadata_fields():
    model = torch_model("resnet20")
    ours = interop.shared_data_from_torch(multi_step_dict(model), model, template("resnet20"))
    hyper = ours.metadata.local_hyperparams
    assert isinstance(hyper, LocalHyperparams)
    assert (hyper.lr, hyper.steps, hyper.data_per_step) == (1e-3, 2, 2)
    np.testing.assert_array_equal(hyper.labels[1], [1, 3])
    assert ours.metadata.data_key == "inputs" and ours.metadata.num_users is None


def test_wrong_shape_names_both_sides():
    model = torch_model("lenet_zhu", num_classes=10)
    with pytest.raises(ValueError, match=r"'model\.fc\.0\.weight'.*params/fc/0/kernel.*shape"):
        interop.variables_from_torch(model, template("lenet_zhu", num_classes=5))


def test_wrong_shape_towards_torch_leaves_the_model_untouched():
    five_classes = torch_model("lenet_zhu", num_classes=5)
    five = interop.variables_from_torch(five_classes, template("lenet_zhu", num_classes=5))
    model = torch_model("lenet_zhu", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'model\.fc\.0\.weight'.*params/fc/0/kernel.*shape"):
        interop.variables_to_torch(five, model)
    assert_same_tensors(list(model.state_dict().values()), list(before.values()))


def test_torch_entry_without_flax_counterpart():
    flax_template = template("lenet_zhu")
    del flax_template["params"]["fc"]
    message = r"'model\.fc\.0\.weight' has no Flax counterpart.*params/fc/0"
    with pytest.raises(ValueError, match=message):
        interop.variables_from_torch(torch_model("lenet_zhu"), flax_template)
    flax_template = template("lenet_zhu")
    del flax_template["params"]["body"]["2"]["bias"]  # the module is there, the leaf is not
    message = r"'model\.body\.2\.bias' <-> Flax params/body/2/bias: no such"
    with pytest.raises(ValueError, match=message):
        interop.variables_from_torch(torch_model("lenet_zhu"), flax_template)


def test_torch_buffers_without_batch_stats():
    flax_template = template("resnet20")
    del flax_template["batch_stats"]
    with pytest.raises(ValueError, match=r"'model\.stem\.1\.running_mean'.*batch_stats/stem/1"):
        interop.variables_from_torch(torch_model("resnet20"), flax_template)


def test_flax_entry_without_torch_counterpart():
    flax_template = template("lenet_zhu")
    flax_template["params"]["extra"] = {"kernel": jnp.zeros((2, 2))}
    message = r"params/extra/kernel has no torch counterpart.*'extra\.weight'"
    with pytest.raises(ValueError, match=message):
        interop.variables_from_torch(torch_model("lenet_zhu"), flax_template)


def test_ambiguous_weight_is_rejected():
    flax_template = {"params": {"kernel": jnp.zeros((3, 2)), "scale": jnp.zeros(2)}}
    linear = torch.nn.Linear(3, 2, bias=False)
    with pytest.raises(ValueError, match=r"'weight'.*ambiguous.*kernel.*scale"):
        interop.variables_from_torch(linear, flax_template)


def test_list_lengths_must_match_the_torch_model():
    model = torch_model("lenet_zhu")
    grads = [torch.zeros(p.shape) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"none for torch 'model\.fc\.0\.bias'"):
        interop.grads_from_torch_list(grads[:-1], model, template("lenet_zhu"))
    with pytest.raises(ValueError, match=r"1 extra after the last one, 'model\.fc\.0\.bias'"):
        interop.grads_from_torch_list(grads + [torch.zeros(1)], model, template("lenet_zhu"))


def test_image_layout_helpers_round_trip():
    images = torch.randn(2, 3, 5, 4)
    nhwc = interop.nchw_to_nhwc(images)
    assert nhwc.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(nhwc[1, 2, 3], images[1, :, 2, 3])
    assert torch.equal(interop.nhwc_to_nchw(nhwc), images)

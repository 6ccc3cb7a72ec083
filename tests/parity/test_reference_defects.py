"""Pin the four defects of breaching 0.1.2's ``MultiUserAggregate`` (so a future fix is noticed).

fedjax_users computes the intended mean instead; these tests run the reference itself.
"""

import pytest

torch = pytest.importorskip("torch")
reference = pytest.importorskip("parity.reference")
omegaconf = pytest.importorskip("omegaconf")

SETUP = dict(device=torch.device("cpu"), dtype=torch.float32)


def _cfg(**changes):
    cfg = dict(
        user_type="multiuser_aggregate", user_range=[0, 3], num_data_points=2, provide_buffers=False,
        provide_labels=False, provide_num_data_points=True,
        local_diff_privacy=dict(gradient_noise=0.0, input_noise=0.0, distribution="laplacian",
                                per_example_clipping=0.0),
        num_local_updates=1, num_data_per_local_update_step=2, local_learning_rate=0.1,
        provide_local_hyperparams=False,
    )
    cfg.update(changes)
    return omegaconf.OmegaConf.create(cfg)


def _users_data(num_users, shape=(1, 4, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[dict(inputs=torch.randn((2,) + shape, generator=generator),
                  labels=torch.randint(0, 10, (2,), generator=generator))] for _ in range(num_users)]


def _aggregate(model, cfg, loaders):
    users = reference.users_module()
    return users.MultiUserAggregate(model, torch.nn.CrossEntropyLoss(), loaders, SETUP, cfg,
                                    user_indices=list(range(len(loaders))))


def _payload(model, buffers):
    return dict(parameters=[p.detach().clone() for p in model.parameters()], buffers=buffers)


def test_defect_1_running_formula_is_an_exponential_average_not_the_mean():
    torch.manual_seed(0)
    model = reference.vision_model("linear", shape=(1, 4, 4))
    loaders = _users_data(3)
    cfg = _cfg()
    shared, _ = _aggregate(model, cfg, loaders).compute_local_updates(_payload(model, []))
    users = reference.users_module()
    singles = []
    for loader in loaders:
        user = users.UserSingleStep(model, torch.nn.CrossEntropyLoss(), loader, SETUP, 0, cfg)
        singles.append(user.compute_local_updates(_payload(model, []))[0]["gradients"])
    for i, aggregated in enumerate(shared["gradients"]):
        per_user = [g[i] for g in singles]
        exponential = sum(w * g for w, g in zip((4 / 27, 6 / 27, 9 / 27), per_user))
        mean = sum(per_user) / 3
        torch.testing.assert_close(aggregated, exponential, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(aggregated, mean, rtol=1e-3, atol=1e-6)


def test_defect_2_payload_without_buffers_raises_type_error():
    model = reference.vision_model("linear", shape=(1, 4, 4))
    with pytest.raises(TypeError):
        _aggregate(model, _cfg(), _users_data(3)).compute_local_updates(_payload(model, None))


def test_defect_3_local_hyperparams_with_multi_step_users_crash():
    model = reference.vision_model("linear", shape=(1, 4, 4))
    cfg = _cfg(num_local_updates=2, num_data_per_local_update_step=1, provide_local_hyperparams=True)
    with pytest.raises((TypeError, RuntimeError)):
        _aggregate(model, cfg, _users_data(3)).compute_local_updates(_payload(model, []))


class _FloatBufferNet(torch.nn.Module):
    """A model whose only buffer is a float, so the aggregate reaches its buffer update."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 10)
        self.register_buffer("offset", torch.zeros(10))

    def forward(self, inputs, **kwargs):
        return self.linear(inputs.flatten(1)) + self.offset


def test_defect_4_users_sharing_buffers_raise_name_error():
    model = _FloatBufferNet()
    cfg = _cfg(num_local_updates=2, num_data_per_local_update_step=1, provide_buffers=True)
    buffers = [b.detach().clone() for b in model.buffers()]
    with pytest.raises(NameError, match="buffer_to_server"):
        _aggregate(model, cfg, _users_data(3)).compute_local_updates(_payload(model, buffers))


def test_defect_4_with_batchnorm_fails_earlier_on_the_integer_buffer():
    # With breaching's BatchNorm models the integer num_batches_tracked buffer breaks the
    # in-place float update before the undefined name is reached.
    model = reference.vision_model("resnet20", shape=(3, 8, 8))
    cfg = _cfg(num_local_updates=2, num_data_per_local_update_step=1, provide_buffers=True)
    buffers = [b.detach().clone() for b in model.buffers()]
    with pytest.raises(RuntimeError, match="can't be cast"):
        _aggregate(model, cfg, _users_data(3, shape=(3, 8, 8))).compute_local_updates(_payload(model, buffers))

"""The drop-in user (``fedjax_users.interop.breaching``) against breaching 0.1.2's own user classes.

Each comparison goes through ``parity_check.check_parity`` (the public parity function a
downstream project calls): gradients or parameter differences, buffers, metadata and true data of breaching's
``UserSingleStep`` / ``UserMultiStep`` (and the mean of its single users for an aggregate) against
the drop-in user on the same weights and data. lenet_zhu finds its Flax model by ``model.name`` and
breaching's CIFAR10 data config; a small BatchNorm model of the test's own passes ``flax_model=``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")
reference = pytest.importorskip("parity.reference")
omegaconf = pytest.importorskip("omegaconf")

from fedjax_users import InputError, InputTypeError  # noqa: E402
from fedjax_users.batchnorm import BatchNorm  # noqa: E402
from fedjax_users.interop import breaching as drop_in  # noqa: E402
from fedjax_users.interop import parity_check  # noqa: E402

SETUP = dict(device=torch.device("cpu"), dtype=torch.float32)
CLASSES = 3


class TorchBN(torch.nn.Module):
    """Conv -> BatchNorm -> ReLU -> mean pool -> Linear: a user's own BatchNorm model."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, CLASSES)

    def forward(self, inputs, **kwargs):
        return self.fc(torch.relu(self.bn(self.conv(inputs))).mean(dim=(2, 3)))


class FlaxBN(nn.Module):
    """The same model in Flax, with torch's names (``fedjax_users.interop`` pairs by name)."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None, momentum=0.1):
        x = nn.Conv(4, (3, 3), padding=[(1, 1), (1, 1)], name="conv")(x)
        x = nn.relu(BatchNorm(name="bn")(x, train, mask, momentum))
        return nn.Dense(CLASSES, name="fc")(jnp.mean(x, axis=(1, 2)))


class Loader(list):
    """A dataloader of one batch per user, with the ``name`` breaching's ``__repr__`` prints."""

    name = "synthetic"


def user_cfg(user_type: str, n: int = 4, **ldp):
    cfg = dict(user_type=user_type, user_idx=0, num_data_points=n, provide_labels=True, provide_buffers=True,
               provide_num_data_points=True,
               local_diff_privacy=dict(dict(gradient_noise=0.0, input_noise=0.0, distribution="gaussian",
                                            per_example_clipping=0.0), **ldp))
    if user_type != "local_gradient":
        cfg.update(num_local_updates=3 if user_type == "local_update" else 2, num_data_per_local_update_step=2,
                   local_learning_rate=1e-2, provide_local_hyperparams=True)
    if user_type == "multiuser_aggregate":
        cfg["user_range"] = [0, 2]
    return omegaconf.OmegaConf.create(cfg)


def make_model(kind: str):
    torch.manual_seed(0)
    if kind == "lenet_zhu":
        model = reference.vision_model("lenet_zhu")
        model.name = "lenet_zhu"  # as breaching's construct_model sets it
        return model, dict(cfg_data=reference.data_config("CIFAR10"))
    return TorchBN(), dict(flax_model=FlaxBN())


def make_data(kind: str, users: int = 1, n: int = 4, seed: int = 1):
    size = 32 if kind == "lenet_zhu" else 6
    generator = torch.Generator().manual_seed(seed)
    classes = 10 if kind == "lenet_zhu" else CLASSES
    return [dict(inputs=torch.randn((n, 3, size, size), generator=generator),
                 labels=torch.randint(0, classes, (n,), generator=generator)) for _ in range(users)]


def payload(model, buffers_sent: bool):
    return dict(parameters=[p.detach().clone() for p in model.parameters()],
                buffers=[b.detach().clone() for b in model.buffers()] if buffers_sent else None)


@pytest.mark.parametrize("kind,buffers_sent", [("lenet_zhu", False), ("bn", False), ("bn", True)])
@pytest.mark.parametrize("user_type", ["local_gradient", "local_update", "multiuser_aggregate"])
def test_drop_in_user_matches_breachings_user(kind, buffers_sent, user_type):
    model, options = make_model(kind)
    users = 2 if user_type == "multiuser_aggregate" else 1
    # A scripted loss, as breaching's construct_model returns it.
    report = parity_check.check_parity(reference.users_module().MultiUserAggregate if users > 1 else
                                       getattr(reference.users_module(),
                                               "UserSingleStep" if user_type == "local_gradient" else "UserMultiStep"),
                                       model, torch.jit.script(torch.nn.CrossEntropyLoss()), make_data(kind, users),
                                       user_cfg(user_type), buffers_sent=buffers_sent, name=f"{kind}/{user_type}",
                                       **options)
    assert report.passed and report.max_rel <= parity_check.FLOAT32_BOUND and not report.detail
    assert report.worst.startswith("gradients[")


@pytest.mark.parametrize("user_type", ["local_gradient", "local_update"])
def test_own_batchnorm_state_persists_across_queries_as_breachings(user_type):
    model, options = make_model("bn")
    data = make_data("bn")
    cls = "UserSingleStep" if user_type == "local_gradient" else "UserMultiStep"
    theirs = getattr(reference.users_module(), cls)(model, torch.nn.CrossEntropyLoss(), Loader(data), SETUP, 0,
                                                    user_cfg(user_type))
    ours = getattr(drop_in, cls)(model, torch.nn.CrossEntropyLoss(), Loader(data), SETUP, 0, user_cfg(user_type),
                                 **options)
    shared = []
    # Train mode twice (statistics accumulate), then the server's buffers (eval mode, which
    # overwrites the user's own), then train mode again from those.
    for buffers_sent in (False, False, True, False):
        (a, _), (b, _) = (user.compute_local_updates(payload(model, buffers_sent)) for user in (theirs, ours))
        for mine, their in zip(ours.model.buffers(), theirs.model.buffers()):
            assert torch.allclose(mine.double(), their.double(), rtol=1e-5, atol=1e-6)
        for mine, their in zip(b["gradients"], a["gradients"]):
            assert torch.allclose(mine, their, rtol=1e-4, atol=1e-6)
        shared.append(b)
    first, second = shared[0]["buffers"], shared[1]["buffers"]
    # The second query started from the first's statistics: num_batches_tracked went on counting,
    # and (momentum 0.1; a single-step user's cumulative average of the same batch stays put) the
    # multi-step user's running mean moved on.
    assert int(second[2]) == 2 * int(first[2])
    assert torch.allclose(first[0], second[0]) == (user_type == "local_gradient")
    assert ours.counted_queries == theirs.counted_queries == 4


def test_repr_counted_queries_and_attributes_are_breachings():
    model, options = make_model("bn")
    module = reference.users_module()
    defended = dict(gradient_noise=0.05, per_example_clipping=1.0)
    for cls, cfg in (("UserSingleStep", user_cfg("local_gradient", **defended)),
                     ("UserMultiStep", user_cfg("local_update", input_noise=0.1))):
        theirs = getattr(module, cls)(model, torch.nn.CrossEntropyLoss(), Loader(make_data("bn")), SETUP, 3, cfg)
        ours = getattr(drop_in, cls)(model, torch.nn.CrossEntropyLoss(), Loader(make_data("bn")), SETUP, 3, cfg,
                                     **options)
        assert repr(ours) == repr(theirs)
        assert (ours.user_idx, ours.num_data_points, ours.counted_queries) == (3, 4, 0)
        for _ in range(2):
            ours.compute_local_updates(payload(model, False))
        assert ours.counted_queries == 2
    loaders = [Loader([d]) for d in make_data("bn", users=2)]
    theirs = module.MultiUserAggregate(model, torch.nn.CrossEntropyLoss(), loaders, SETUP, user_cfg("multiuser_aggregate"),
                                       user_indices=[0, 1])
    ours = drop_in.MultiUserAggregate(model, torch.nn.CrossEntropyLoss(), loaders, SETUP,
                                      user_cfg("multiuser_aggregate"), user_indices=[0, 1], **options)
    assert repr(ours) == repr(theirs) and ours.user_idx == theirs.user_idx == "0_1"
    shared, true_data = ours.compute_local_updates(payload(model, False))
    assert shared["metadata"]["num_users"] == 2 and ours.counted_queries == 1
    # As breaching's loop leaves it: the last user's data unless all are asked for.
    assert torch.equal(true_data["data"], loaders[1][0]["inputs"])


def test_construct_user_builds_the_user_the_case_names():
    model, _ = make_model("lenet_zhu")
    loaders = [Loader([d]) for d in make_data("lenet_zhu", users=2)]
    for user_type, cls in (("local_gradient", drop_in.UserSingleStep), ("local_update", drop_in.UserMultiStep),
                           ("multiuser_aggregate", drop_in.MultiUserAggregate)):
        case = omegaconf.OmegaConf.create(dict(user=user_cfg(user_type), data=reference.data_config("CIFAR10")))
        user = drop_in.construct_user(model, torch.nn.CrossEntropyLoss(), case, SETUP, dataloaders=loaders)
        assert type(user) is cls
    shared, _ = user.compute_local_updates(payload(model, False))
    assert [g.shape for g in shared["gradients"]] == [p.shape for p in model.parameters()]


def test_unsupported_losses_are_named_before_any_computation():
    model, options = make_model("bn")
    with pytest.raises(InputTypeError, match="MSELoss has no JAX counterpart; supported: torch.nn.CrossEntropyLoss"):
        drop_in.UserSingleStep(model, torch.nn.MSELoss(), Loader(make_data("bn")), SETUP, 0,
                               user_cfg("local_gradient"), **options)
    with pytest.raises(InputError, match="label_smoothing"):
        drop_in.UserSingleStep(model, torch.nn.CrossEntropyLoss(label_smoothing=0.1), Loader(make_data("bn")),
                               SETUP, 0, user_cfg("local_gradient"), **options)


def test_a_model_without_a_name_asks_for_its_flax_model():
    model, _ = make_model("bn")
    user = drop_in.UserSingleStep(model, torch.nn.CrossEntropyLoss(), Loader(make_data("bn")), SETUP, 0,
                                  user_cfg("local_gradient"))
    with pytest.raises(InputError, match="flax_model="):
        user.compute_local_updates(payload(model, False))


def test_a_float64_miss_is_judged_by_the_references_own_float64_spread():
    # bound=0 forces a miss (the two frameworks round differently); the yardstick is then how far
    # the reference moves on inputs perturbed by a few float64 ulp. On this smooth model that is
    # ~1e-15: small enough that no real difference (1e-7 and up) could hide in it.
    model, options = make_model("bn")
    model = model.double()
    data = [{k: v.double() if v.is_floating_point() else v for k, v in d.items()} for d in make_data("bn")]
    with jax.enable_x64(True):
        judged = parity_check.check_parity(reference.users_module().UserMultiStep, model,
                                           torch.nn.CrossEntropyLoss(), data, user_cfg("local_update"), bound=0.0,
                                           **options)
        with pytest.raises(parity_check.ParityError):
            parity_check.check_parity(reference.users_module().UserMultiStep, model, torch.nn.CrossEntropyLoss(),
                                      data, user_cfg("local_update"), bound=0.0, adjudicate=False, **options)
    assert judged.passed and 0 < judged.max_rel <= 2 * judged.reference_spread
    assert judged.reference_spread < 1e-12 and judged.ours_vs_float64 is None


def test_check_parity_raises_with_the_worst_entry_over_the_bound():
    model, options = make_model("bn")
    with pytest.raises(parity_check.ParityError, match=r"at (gradients|buffers)\[\d\] (conv|bn|fc)\.") as caught:
        parity_check.check_parity(reference.users_module().UserMultiStep, model, torch.nn.CrossEntropyLoss(),
                                  make_data("bn"), user_cfg("local_update"), bound=0.0, adjudicate=False, **options)
    assert caught.value.report.max_rel > 0 and not caught.value.report.passed
